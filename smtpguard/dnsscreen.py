"""Which DNS lookups a session makes, and when: the DNS checks' I/O edge.

The checks themselves live in :mod:`smtpguard.checks.dnsbl` (DNSBL/DNSWL
score, RHSBL), :mod:`smtpguard.checks.rdns` (client names) and
:mod:`smtpguard.checks.domains` (sender domain, HELO name); the
:class:`~smtpguard.pipeline.Pipeline` decides what their results mean for
the session.  :class:`DnsScreen` sits between the two: it asks the one
:class:`~smtpguard.dns.DnsResolver` of the process (injected, so tests can
pass a fake) at the right moments.

* **Connect** (:meth:`DnsScreen.start`): background tasks look up, in
  parallel, the client's DNSBL/DNSWL score (unless the allowlist cache
  still holds a DNSBL pass or the access table allowlisted the client) and
  its reverse and verified names (smtpd's peer name lookup, ``[client_name]
  lookup``), then ``reject_rhsbl_reverse_client`` on the reverse name.
  They run during the greet wait; :class:`Lookups` keeps the answers as
  they arrive.
* **Before the final 220** (:meth:`DnsScreen.collect`): the
  :class:`ConnectFindings`.  The DNSBL score counts the lists that answered
  by the end of the greet wait (postscreen's partial score); the client
  names are waited for (bounded by ``[dns] lifetime``), as smtpd would.
* **HELO** (:meth:`DnsScreen.helo_checks`): ``reject_unknown_helo_hostname``
  and ``reject_rhsbl_helo``, in parallel.
* **MAIL** (:meth:`DnsScreen.sender_checks`): ``reject_unknown_sender_domain``
  and ``reject_rhsbl_sender``, in parallel.

A session that ends early cancels its tasks (:meth:`Lookups.cancel`); the
resolver's shared queries go on for the other sessions waiting on them (and
fill its cache).

The screen knows nothing of the session: it is given the facts it needs
(client address, HELO name, sender) and hands back the :class:`Lookups`,
which the pipeline keeps in ``Session.lookups``.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .checks.dnsbl import DnsblConfig, DnsblScore, RhsblTarget, check_rhsbl, dnsbl_names, score_answers
from .checks.domains import check_helo_hostname, check_sender_domain
from .checks.rdns import ClientNames, lookup_client_names
from .config import Config
from .dns import TEMPFAIL, DnsResult, Resolver
from .net import IPAddress
from .tables import Table
from .verdict import Result

# Sections whose checks ask the DNS.
DNS_CHECKS = ("dnsbl", "rhsbl", "client_name", "sender_domain", "helo_hostname")


def wants_resolver(cfg: Config) -> bool:
    """Does this configuration ask the DNS at all?"""
    spf = cfg.greylist.enabled and cfg.greylist.spf_key
    return spf or cfg.client_name.lookup or any(getattr(cfg, name).enabled for name in DNS_CHECKS)


ClientFindings = tuple[ClientNames, Result | None]  # names, reverse-client RHSBL result


class Lookups:
    """A session's connect-time lookups (``Session.lookups``).  Answers are
    kept as they arrive and each task lets go of itself when done: thousands
    of sessions may sit in the greet wait, and a finished task would cost
    about 0.7 KB each."""

    __slots__ = ("answers", "client", "_dnsbl", "_client")

    def __init__(self) -> None:
        self.answers: dict[str, DnsResult[str]] = {}  # DNSBL site domain -> its answer, once in
        self.client: ClientFindings | None = None
        self._dnsbl: dict[str, asyncio.Task[None]] = {}  # lookups still running
        self._client: asyncio.Task[None] | None = None

    def ask_dnsbl(self, resolver: Resolver, config: DnsblConfig, ip: IPAddress) -> None:
        for domain, name in dnsbl_names(config, ip).items():
            self._dnsbl[domain] = asyncio.create_task(self._answer(resolver, domain, name), name=f"dnsbl {ip}")

    def ask_client(self, fetch: Callable[[], Awaitable[ClientFindings]], ip: IPAddress) -> None:
        self._client = asyncio.create_task(self._names(fetch), name=f"names {ip}")

    async def _answer(self, resolver: Resolver, domain: str, name: str) -> None:
        try:
            self.answers[domain] = await resolver.a(name)
        finally:
            del self._dnsbl[domain]

    async def _names(self, fetch: Callable[[], Awaitable[ClientFindings]]) -> None:
        try:
            self.client = await fetch()
        finally:
            self._client = None

    async def score(self, config: DnsblConfig, ip: IPAddress, timeout: float) -> DnsblScore:
        """The score once every list answered or after *timeout* seconds;
        a list that has not answered by then counts as not listed (as a
        failed one), like postscreen's partial score after the greet wait."""
        if self._dnsbl:
            await asyncio.wait(list(self._dnsbl.values()), timeout=timeout)
        return score_answers(config, ip, {s.domain: self.answers.get(s.domain, TEMPFAIL) for s in config.sites})

    async def names(self) -> ClientFindings | tuple[None, None]:
        """The client's names and reverse-client RHSBL result (waited for)."""
        if self._client is not None:
            await self._client
        return self.client or (None, None)

    def cancel(self) -> None:
        for task in (*self._dnsbl.values(), *([self._client] if self._client else [])):
            task.cancel()


@dataclass(frozen=True)
class ConnectFindings:
    """What the connect-time lookups found (None: not looked up)."""

    names: ClientNames | None = None
    dnsbl: DnsblScore | None = None
    reverse_rhsbl: Result | None = None  # reject_rhsbl_reverse_client


class DnsScreen:
    def __init__(self, cfg: Config, resolver: Resolver | None, rhsbl_override: Table | None = None) -> None:
        enabled = [name for name in DNS_CHECKS if getattr(cfg, name).enabled]
        if enabled and resolver is None:
            raise ValueError(f"DNS checks enabled ({', '.join(enabled)}) but no resolver given")
        self.cfg = cfg
        self.resolver = resolver
        self.override = rhsbl_override

    def start(self, ip: IPAddress, allowlisted: bool, dnsbl: bool) -> Lookups | None:
        """At connect: start the lookups for client *ip* (None: none to
        make); the DNSBL score when *dnsbl* (``dnsbl`` is among the
        session's tests still to do: not PASS OLD, not allowlisted)."""
        names = self.cfg.client_name.lookup
        resolver = self.resolver
        if resolver is None or not (names or dnsbl):
            return None
        lookups = Lookups()
        if dnsbl:
            lookups.ask_dnsbl(resolver, self.cfg.dnsbl, ip)
        if names:
            lookups.ask_client(functools.partial(self._client, resolver, ip, allowlisted), ip)
        return lookups

    async def collect(self, pending: Lookups | None, ip: IPAddress, dnsbl: bool, deadline: float) -> ConnectFindings:
        """Before the final 220: what the connect-time lookups *pending*
        found; the DNSBL score (when *dnsbl*) counts the lists that answered
        by *deadline* (``time.monotonic()``, the end of the greet wait)."""
        if pending is None:
            return ConnectFindings()
        try:
            score = None
            if dnsbl:
                score = await pending.score(self.cfg.dnsbl, ip, max(0.0, deadline - time.monotonic()))
            names, reverse_rhsbl = await pending.names()
        finally:
            pending.cancel()
        return ConnectFindings(names, score, reverse_rhsbl)

    async def _client(self, resolver: Resolver, ip: IPAddress, allowlisted: bool) -> ClientFindings:
        names = await lookup_client_names(resolver, ip)
        rhsbl = self.cfg.rhsbl
        if allowlisted or not (rhsbl.enabled and rhsbl.reverse_client_sites):
            return names, None
        return names, await check_rhsbl(resolver, rhsbl, RhsblTarget.REVERSE_CLIENT, names.reverse_name, self.override)

    async def helo_checks(self, helo: str | None) -> list[Result]:
        """reject_unknown_helo_hostname and reject_rhsbl_helo for *helo*."""
        cfg = self.cfg
        if self.resolver is None or helo is None:
            return []
        checks: list[Awaitable[Result]] = []
        if cfg.helo_hostname.enabled:
            checks.append(check_helo_hostname(self.resolver, cfg.helo_hostname, helo))
        if cfg.rhsbl.enabled and cfg.rhsbl.helo_sites:
            checks.append(check_rhsbl(self.resolver, cfg.rhsbl, RhsblTarget.HELO, helo, self.override))
        return list(await asyncio.gather(*checks))

    async def sender_checks(self, sender: str | None) -> list[Result]:
        """reject_unknown_sender_domain and reject_rhsbl_sender for *sender*."""
        cfg = self.cfg
        if self.resolver is None or not sender:  # the null sender has no domain
            return []
        checks: list[Awaitable[Result]] = []
        if cfg.sender_domain.enabled:
            checks.append(check_sender_domain(self.resolver, cfg.sender_domain, sender))
        if cfg.rhsbl.enabled and cfg.rhsbl.sender_sites:
            checks.append(check_rhsbl(self.resolver, cfg.rhsbl, RhsblTarget.SENDER, sender, self.override))
        return list(await asyncio.gather(*checks))

