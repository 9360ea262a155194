"""Which DNS lookups a session makes, and when: the DNS checks' I/O edge.

The checks themselves live in :mod:`smtpguard.checks.dnsbl` (DNSBL/DNSWL
score, RHSBL), :mod:`smtpguard.checks.rdns` (client names) and
:mod:`smtpguard.checks.domains` (sender domain, HELO name); the
:class:`~smtpguard.pipeline.Pipeline` decides what their results mean for
the session.  :class:`DnsScreen` sits between the two: it asks the one
:class:`~smtpguard.dns.DnsResolver` of the process (injected, so tests can
pass a fake) at the right moments.

* **Connect** (:meth:`DnsScreen.start`): background tasks look up, in
  parallel, the client's DNSBL/DNSWL score (unless the
  allowlist cache still holds a DNSBL pass or the access table allowlisted
  the client) and its reverse and verified names (smtpd's peer name lookup,
  ``[client_name] lookup``), then ``reject_rhsbl_reverse_client`` on the
  reverse name.  It runs during the greet wait.
* **Before the final 220** (:meth:`DnsScreen.collect`): the
  :class:`ConnectFindings`.  The DNSBL score counts the lists that answered
  by the end of the greet wait (postscreen's partial score); the client
  names are waited for (bounded by ``[dns] lifetime``), as smtpd would.
* **HELO** (:meth:`DnsScreen.helo_checks`): ``reject_unknown_helo_hostname``
  and ``reject_rhsbl_helo``, in parallel.
* **MAIL** (:meth:`DnsScreen.sender_checks`): ``reject_unknown_sender_domain``
  and ``reject_rhsbl_sender``, in parallel.

A session that ends early cancels its tasks (:meth:`DnsScreen.forget`); the
resolver's shared queries go on for the other sessions waiting on them (and
fill its cache).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from dataclasses import dataclass

from .checks.dnsbl import DnsblScore, RhsblTarget, check_rhsbl, collect_dnsbl, start_dnsbl
from .checks.domains import check_helo_hostname, check_sender_domain
from .checks.rdns import ClientNames, lookup_client_names
from .config import Config
from .dns import DnsResult, Resolver
from .session import Session
from .tables import Table
from .verdict import Result

# Sections whose checks ask the DNS.
DNS_CHECKS = ("dnsbl", "rhsbl", "client_name", "sender_domain", "helo_hostname")


def wants_resolver(cfg: Config) -> bool:
    """Does this configuration ask the DNS at all?"""
    return cfg.client_name.lookup or any(getattr(cfg, name).enabled for name in DNS_CHECKS)


@dataclass(frozen=True)
class Lookups:
    """A session's connect-time lookups in progress (``Session.lookups``)."""

    dnsbl: dict[str, asyncio.Task[DnsResult[str]]]  # site domain -> its A lookup
    client: asyncio.Task[tuple[ClientNames, Result | None]] | None  # names, reverse-client RHSBL

    def cancel(self) -> None:
        for task in (*self.dnsbl.values(), *([self.client] if self.client else [])):
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

    def start(self, s: Session, dnsbl: bool) -> None:
        """At connect: start the lookups (*dnsbl*: the DNSBL score too)."""
        names = self.cfg.client_name.lookup
        resolver = self.resolver
        if resolver is None or not (names or dnsbl):
            return
        s.lookups = Lookups(
            start_dnsbl(resolver, self.cfg.dnsbl, s.client_ip) if dnsbl else {},
            asyncio.create_task(self._client(resolver, s.client_ip), name=f"names {s.client_ip}") if names else None,
        )

    async def collect(self, s: Session, deadline: float) -> ConnectFindings:
        """Before the final 220: what the connect-time lookups found; the
        DNSBL score counts the lists that answered by *deadline*
        (``time.monotonic()``, the end of the greet wait)."""
        pending, s.lookups = s.lookups, None
        if pending is None:
            return ConnectFindings()
        try:
            score = None
            if pending.dnsbl:
                timeout = max(0.0, deadline - time.monotonic())
                score = await collect_dnsbl(self.cfg.dnsbl, s.client_ip, pending.dnsbl, timeout)
            names, reverse_rhsbl = await pending.client if pending.client else (None, None)
        finally:
            pending.cancel()
        return ConnectFindings(names, score, reverse_rhsbl)

    def forget(self, s: Session) -> None:
        """The session ended: stop waiting for its lookups."""
        pending, s.lookups = s.lookups, None
        if pending is not None:
            pending.cancel()

    async def _client(self, resolver: Resolver, ip: str) -> tuple[ClientNames, Result | None]:
        names = await lookup_client_names(resolver, ip)
        rhsbl = self.cfg.rhsbl
        if not (rhsbl.enabled and rhsbl.reverse_client_sites):
            return names, None
        return names, await check_rhsbl(resolver, rhsbl, RhsblTarget.REVERSE_CLIENT, names.reverse_name, self.override)

    async def helo_checks(self, s: Session) -> list[Result]:
        """reject_unknown_helo_hostname and reject_rhsbl_helo for ``s.helo``."""
        cfg, helo = self.cfg, s.helo
        if self.resolver is None or helo is None:
            return []
        checks: list[Awaitable[Result]] = []
        if cfg.helo_hostname.enabled:
            checks.append(check_helo_hostname(self.resolver, cfg.helo_hostname, helo))
        if cfg.rhsbl.enabled and cfg.rhsbl.helo_sites:
            checks.append(check_rhsbl(self.resolver, cfg.rhsbl, RhsblTarget.HELO, helo, self.override))
        return list(await asyncio.gather(*checks))

    async def sender_checks(self, s: Session) -> list[Result]:
        """reject_unknown_sender_domain and reject_rhsbl_sender for ``s.sender``."""
        cfg, sender = self.cfg, s.sender
        if self.resolver is None or not sender:  # the null sender has no domain
            return []
        checks: list[Awaitable[Result]] = []
        if cfg.sender_domain.enabled:
            checks.append(check_sender_domain(self.resolver, cfg.sender_domain, sender))
        if cfg.rhsbl.enabled and cfg.rhsbl.sender_sites:
            checks.append(check_rhsbl(self.resolver, cfg.rhsbl, RhsblTarget.SENDER, sender, self.override))
        return list(await asyncio.gather(*checks))

