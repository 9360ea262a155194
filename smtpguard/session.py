"""Per-connection facts: who the client is and what it said.  No I/O.

A :class:`Session` is created by the listener at connect time and filled in
by the session machine (:mod:`smtpguard.machine`) as commands arrive; checks read it, the log lines are
built from it, and the relay's XCLIENT identity is derived from it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from . import logs
from .dnsscreen import Lookups
from .net import IPAddress
from .relay import ClientIdentity
from .spf import SpfResult
from .verdict import Result, ScreenTest, Verdict


@dataclass(slots=True)  # slots: one per connection, thousands may be idle
class Session:
    client_ip: IPAddress  # parsed once, at accept (smtpguard.net.parse_ip)
    client_port: int
    server_ip: str
    server_port: int
    started: float = field(default_factory=time.monotonic)
    client_name: str = "unknown"  # verified reverse name (Postfix's "unknown")
    helo: str | None = None
    esmtp: bool = False
    tls: str | None = None  # after STARTTLS: "TLSv1.3 with cipher ... (256/256 bits)"
    # The current transaction.
    sender: str | None = None
    mail_params: tuple[str, ...] = ()
    rcpts: list[str] = field(default_factory=list)  # accepted by Postfix
    # Counters and findings.
    errors: int = 0
    commands: int = 0
    results: list[Result] = field(default_factory=list)
    # Screening state (see smtpguard.pipeline).
    allowlisted: bool = False  # the client access table said OK/PERMIT
    # DNSBL score <= dnsbl.allowlist_threshold (DNSWL): the postscreen tests and
    # greylisting count as passed; smtpd-style restrictions still apply.
    dnswl: bool = False
    lookups: Lookups | None = None  # connect-time DNS lookups in progress (smtpguard.dnsscreen)
    todo: frozenset[ScreenTest] = frozenset()  # cacheable tests still to pass
    failed: set[ScreenTest] = field(default_factory=set)  # tests failed in this session
    delayed: dict[str, Verdict] = field(default_factory=dict)  # phase -> reject kept for RCPT
    screened: bool = False  # a recipient passed screening: the screening phase is over
    advertised: bool = False  # the client got our EHLO reply (PIPELINING)
    spf: tuple[tuple[str, str], SpfResult] | None = None  # (sender, helo) -> its SPF result (greylist.spf_key)
    stress: bool = False  # connected under stress: the [stress] values apply (smtpguard.stress)

    @property
    def proto(self) -> str:
        return "ESMTP" if self.esmtp else "SMTP"

    @property
    def client_addr(self) -> str:
        """The client's address as text, as Postfix writes it (``192.0.2.7``, ``2001:db8::7``)."""
        return str(self.client_ip)

    @property
    def in_transaction(self) -> bool:
        return self.sender is not None

    @property
    def peer(self) -> str:
        """``[a]:p`` as postscreen writes the client."""
        return logs.endpoint(self.client_addr, self.client_port)

    @property
    def who(self) -> str:
        """``name[a]:p`` as smtpd writes the client."""
        return logs.client(self.client_name, self.client_addr, self.client_port)

    def identity(self) -> ClientIdentity:
        name = None if self.client_name == "unknown" else self.client_name
        return ClientIdentity(self.client_addr, self.client_port, name, self.helo, self.proto)

    def reset_transaction(self) -> None:
        self.delayed.pop("mail", None)
        self.sender = None
        self.mail_params = ()
        self.rcpts = []
