"""Asynchronous DNS lookups with a cache, for the screening checks.

How it works: :class:`DnsResolver` answers ``a``/``aaaa``/``txt``/``ptr``/
``mx`` questions with a small typed value, :class:`DnsResult` -- a
:class:`Status` (``OK``, ``NXDOMAIN``, ``NODATA`` or ``TEMPFAIL``), the
answers and their TTL.  Callers never see a dnspython exception: a timeout,
a SERVFAIL/REFUSED from every nameserver or a network error all come back
as ``TEMPFAIL``, which the checks treat as "don't know" (never as a reason
for a permanent rejection).

A question goes through three layers:

1. The **cache**: a bounded LRU keyed by (name, type).  Positive answers stay
   for their TTL (the smallest TTL along a CNAME chain); NXDOMAIN and NODATA
   for the RFC 2308 negative TTL taken from the SOA in the reply (the smaller
   of the SOA's TTL and its MINIMUM field), capped at ``negative_ttl``, or for
   ``negative_ttl`` itself when the reply carries no SOA.  Temporary failures
   are never cached; each one is logged (``warning: DNS lookup error for
   NAME/TYPE ...``) and counted (``smtpguard_dns_errors_total{type,error}``).  Expiry
   uses an injected clock, so tests control time.  The TTL handed out is
   what remains of it, like a caching resolver does.
2. **In-flight de-duplication**: when two sessions ask the same question at
   the same time, the second awaits the first one's query instead of sending
   its own.  The shared query runs as its own task behind
   :func:`asyncio.shield`, so a session that hangs up (and is cancelled) does
   not cancel it for the others.
3. The **backend** that actually asks: by default :class:`DnspythonBackend`
   over ``dns.asyncresolver`` (UDP with TCP fallback), at most
   ``max_in_flight`` queries at once.  ``timeout`` bounds one try at one
   nameserver, ``lifetime`` the whole question including the wait for a free
   slot; both are enforced without blocking the event loop.  Tests inject a
   fake :class:`Backend` instead.

Checks depend on the :class:`Resolver` protocol, not on this class, so unit
tests may also hand them any object with its methods.

Answers are text: addresses as printed by :mod:`ipaddress`, host names
without the trailing dot (the root is ``"."``), a TXT record's strings
joined; MX answers are :class:`MxRecord` pairs, where ``0 .`` is RFC 7505's
null MX ("this domain accepts no mail").
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

from .metrics import METRICS
from .net import IPAddress
from .options import ConfigError, list_of, opt, parse_duration, parse_hostport, parse_int

log = logging.getLogger("smtpguard")

T = TypeVar("T")
U = TypeVar("U")


class Status(enum.Enum):
    """How a DNS question was answered."""

    OK = "ok"  # at least one record of the type asked for
    NXDOMAIN = "nxdomain"  # the name does not exist
    NODATA = "nodata"  # the name exists, but has no record of that type
    TEMPFAIL = "tempfail"  # no usable answer: timeout, SERVFAIL, no nameserver

    @property
    def definite(self) -> bool:
        """A real answer (positive or negative), not a failure to get one."""
        return self is not Status.TEMPFAIL


@dataclass(frozen=True)
class DnsResult(Generic[T]):
    """One answered question: status, answers (empty unless ``OK``), TTL."""

    status: Status
    answers: tuple[T, ...] = ()
    ttl: int = 0  # seconds this answer may still be relied on

    @property
    def ok(self) -> bool:
        return self.status is Status.OK

    def map(self, convert: Callable[[T], U]) -> DnsResult[U]:
        return DnsResult(self.status, tuple(convert(a) for a in self.answers), self.ttl)


TEMPFAIL: DnsResult[Any] = DnsResult(Status.TEMPFAIL)


@dataclass(frozen=True)
class MxRecord:
    """An MX answer; ``host`` has no trailing dot and is ``"."`` for the root."""

    preference: int
    host: str

    @property
    def is_null(self) -> bool:
        """RFC 7505 null MX: ``0 .``."""
        return self.preference == 0 and self.host == "."

    @classmethod
    def parse(cls, text: str) -> MxRecord:
        """From the backend's text form ``"10 mx.example.com"``."""
        preference, host = text.split(None, 1)
        return cls(int(preference), host)


def is_null_mx(records: Iterable[MxRecord]) -> bool:
    """True when the MX set is exactly one null MX (RFC 7505 section 3)."""
    records = tuple(records)
    return len(records) == 1 and records[0].is_null


class Resolver(Protocol):
    """What the checks need from a resolver; :class:`DnsResolver` is one."""

    async def a(self, name: str) -> DnsResult[str]: ...

    async def aaaa(self, name: str) -> DnsResult[str]: ...

    async def txt(self, name: str) -> DnsResult[str]: ...

    async def ptr(self, ip: IPAddress) -> DnsResult[str]: ...

    async def mx(self, name: str) -> DnsResult[MxRecord]: ...

    async def query(self, name: str, rdtype: str) -> DnsResult[str]: ...

    def cached(self, name: str, rdtype: str) -> DnsResult[str] | None: ...


class Backend(Protocol):
    """Asks one question for real; ``rdtype`` is ``"A"``, ``"MX"``, ...

    Returns the result, answers in text form (MX as ``"PREF HOST"``) and
    ``ttl`` set for a positive answer, plus, for a negative answer, the
    reply's SOA-derived negative TTL (``None`` without an SOA).  Must not
    raise: failures are ``TEMPFAIL``.
    """

    async def query(self, name: str, rdtype: str) -> tuple[DnsResult[str], int | None]: ...


# ---------------------------------------------------------------- addresses


def reversed_ip(addr: IPAddress) -> str:
    """The reversed-address labels used below ``in-addr.arpa``/``ip6.arpa``
    and DNSBL zones: ``1.2.3.4`` -> ``4.3.2.1``; IPv6 as 32 reversed nibbles
    (an IPv4-mapped IPv6 address is IPv4 once :func:`~smtpguard.net.parse_ip`
    parsed it)."""
    if isinstance(addr, ipaddress.IPv4Address):
        return ".".join(reversed(str(addr).split(".")))
    return ".".join(reversed(addr.exploded.replace(":", "")))


def reverse_name(ip: IPAddress) -> str:
    """The PTR question for *ip*: ``4.3.2.1.in-addr.arpa`` / ``....ip6.arpa``."""
    zone = "in-addr.arpa" if ip.version == 4 else "ip6.arpa"
    return f"{reversed_ip(ip)}.{zone}"


# ---------------------------------------------------------------- config


def parse_nameserver(value: Any) -> tuple[str, int]:
    """``IP``, ``IP:PORT`` or ``[IPv6]:PORT`` (a bare IPv6 uses port 53)."""
    if not isinstance(value, str):
        raise ValueError(f"expected a nameserver address like 192.0.2.53 or 127.0.0.1:5353, got {value!r}")
    try:
        return str(ipaddress.ip_address(value)), 53
    except ValueError:
        pass
    hostport = parse_hostport(value)
    try:
        return str(ipaddress.ip_address(hostport.host)), hostport.port
    except ValueError:
        raise ValueError(f'nameserver must be an IP address, got "{value}"') from None


@dataclass(frozen=True)
class DnsConfig:
    """``[dns]``: which nameservers to ask, how long to wait, what to cache.

    ``timeout`` (one try at one nameserver) defaults to resolv.conf's 5s;
    ``lifetime`` (the whole question, retries included) to 10s, Postfix's
    ``postscreen_dnsbl_timeout``: a DNSBL that takes longer counts as not
    listed.  With the default 6s greet wait most answers are in long before
    the wait ends; a lifetime above the greet wait only delays clients whose
    DNS is slow.
    """

    nameservers: tuple[tuple[str, int], ...] = field(
        default=(), metadata=opt(list_of(parse_nameserver), "/etc/resolv.conf nameserver (empty: use it)")
    )
    timeout: float = field(default=5.0, metadata=opt(parse_duration, "resolv.conf options timeout"))
    lifetime: float = field(default=10.0, metadata=opt(parse_duration, "postscreen_dnsbl_timeout"))
    cache_size: int = field(default=10000, metadata=opt(parse_int, ""))
    negative_ttl: float = field(default=300.0, metadata=opt(parse_duration, "RFC 2308 negative caching cap"))
    max_in_flight: int = field(default=200, metadata=opt(parse_int, ""))

    def validate(self) -> None:
        if self.timeout <= 0:
            raise ConfigError("timeout", "must be greater than 0")
        if self.lifetime < self.timeout:
            raise ConfigError("lifetime", f"must be at least timeout ({self.timeout:g}s)")
        if self.max_in_flight < 1:
            raise ConfigError("max_in_flight", "must be at least 1")


# ---------------------------------------------------------------- backend


def _soa_ttl(response: dns.message.Message | None) -> int | None:
    """RFC 2308 negative TTL from the SOA in a reply's authority section."""
    if response is None:
        return None
    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
            return int(min(rrset.ttl, rrset[0].minimum))
    return None


def _rdata_text(rdata: Any) -> str:
    rdtype = rdata.rdtype
    if rdtype == dns.rdatatype.TXT:
        return b"".join(rdata.strings).decode("utf-8", "replace")
    if rdtype == dns.rdatatype.MX:
        return f"{rdata.preference} {_host_text(rdata.exchange)}"
    if rdtype == dns.rdatatype.PTR:
        return _host_text(rdata.target)
    return str(rdata.to_text())


def _host_text(name: dns.name.Name) -> str:
    text = name.to_text(omit_final_dot=True)
    return text or "."


class DnspythonBackend:
    """:class:`Backend` over ``dns.asyncresolver`` (nameservers from the
    config, else from /etc/resolv.conf; no search list, no dnspython cache)."""

    def __init__(self, config: DnsConfig) -> None:
        if config.nameservers:
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = [dns.nameserver.Do53Nameserver(ip, port) for ip, port in config.nameservers]
        else:
            try:
                resolver = dns.asyncresolver.Resolver()
            except dns.exception.DNSException as exc:
                raise ConfigError("dns.nameservers", f"none given and none usable in /etc/resolv.conf: {exc}") from None
        resolver.timeout = config.timeout
        resolver.lifetime = config.lifetime
        resolver.cache = None
        self._resolver = resolver

    async def query(self, name: str, rdtype: str) -> tuple[DnsResult[str], int | None]:
        try:
            answer = await self._resolver.resolve(name, rdtype, search=False, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN as exc:
            # dnspython leaves NXDOMAIN.responses() unannotated (a dict of Name -> Message).
            responses = list(exc.responses().values())  # type: ignore[no-untyped-call]
            return DnsResult(Status.NXDOMAIN), _soa_ttl(responses[0] if responses else None)
        except (dns.name.EmptyLabel, dns.name.LabelTooLong, dns.name.NameTooLong, UnicodeError):
            # Not representable in the DNS, so it cannot exist.  Not cached.
            return DnsResult(Status.NXDOMAIN), 0
        except (dns.exception.DNSException, OSError):
            # Timeout, every nameserver SERVFAIL/REFUSED, malformed reply, ...
            return TEMPFAIL, None
        if answer.rrset is None:
            return DnsResult(Status.NODATA), _soa_ttl(answer.response)
        answers = tuple(_rdata_text(rd) for rd in answer.rrset)
        return DnsResult(Status.OK, answers, int(answer.chaining_result.minimum_ttl)), None


# ---------------------------------------------------------------- resolver

_Key = tuple[str, str]


class DnsResolver:
    """Caching, de-duplicating, bounded resolver; see the module docstring."""

    def __init__(
        self,
        config: DnsConfig,
        *,
        backend: Backend | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._backend = backend if backend is not None else DnspythonBackend(config)
        self._clock = clock
        self._cache: OrderedDict[_Key, tuple[float, DnsResult[str]]] = OrderedDict()
        self._inflight: dict[_Key, asyncio.Task[DnsResult[str]]] = {}
        self._slots = asyncio.Semaphore(config.max_in_flight)
        self._failures: dict[tuple[str, str], Any] = {}  # (rdtype, error) -> metric child
        METRICS.init_dns()

    async def a(self, name: str) -> DnsResult[str]:
        return await self._lookup(name, "A")

    async def aaaa(self, name: str) -> DnsResult[str]:
        return await self._lookup(name, "AAAA")

    async def txt(self, name: str) -> DnsResult[str]:
        return await self._lookup(name, "TXT")

    async def ptr(self, ip: IPAddress) -> DnsResult[str]:
        """PTR names for *ip*."""
        return await self._lookup(reverse_name(ip), "PTR")

    async def mx(self, name: str) -> DnsResult[MxRecord]:
        return (await self._lookup(name, "MX")).map(MxRecord.parse)

    async def query(self, name: str, rdtype: str) -> DnsResult[str]:
        """Any question by name and type (``"TXT"``, ``"PTR"`` of a reverse
        name, ...); answers in the backend's text form (MX ``"PREF HOST"``)."""
        return await self._lookup(name, rdtype)

    def cached(self, name: str, rdtype: str) -> DnsResult[str] | None:
        """The cached answer to that question, without asking; None when
        it is not in the cache."""
        return self._cached((name.rstrip(".").lower(), rdtype))

    async def _lookup(self, name: str, rdtype: str) -> DnsResult[str]:
        key = (name.rstrip(".").lower(), rdtype)
        if not key[0]:
            return DnsResult(Status.NXDOMAIN)
        cached = self._cached(key)
        if cached is not None:
            return cached
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.create_task(self._fetch(key))
            self._inflight[key] = task
            task.add_done_callback(lambda _: self._inflight.pop(key, None))
        return await asyncio.shield(task)

    async def _fetch(self, key: _Key) -> DnsResult[str]:
        """Ask the backend in a free slot, all within ``lifetime``; cache."""
        start = self._clock()
        error = "servfail"  # the backend's TEMPFAIL: SERVFAIL, REFUSED, no nameserver
        try:
            async with asyncio.timeout(self._config.lifetime):
                async with self._slots:
                    result, soa_ttl = await self._backend.query(*key)
        except TimeoutError:
            result, soa_ttl, error = TEMPFAIL, None, "timeout"
        METRICS.dns_query_seconds.labels(type=key[1]).observe(max(0.0, self._clock() - start))
        if not result.status.definite:
            self._failed(key, error)
            return result
        if not result.ok:
            negative = self._config.negative_ttl
            result = DnsResult(result.status, (), int(negative if soa_ttl is None else min(soa_ttl, negative)))
        self._store(key, result)
        return result

    def _failed(self, key: _Key, error: str) -> None:
        """Log and count a question that got no answer (once per query sent,
        not per session waiting for it), as Postfix's dnsblog does."""
        name, rdtype = key
        counter = self._failures.get((rdtype, error))
        if counter is None:
            counter = self._failures[(rdtype, error)] = METRICS.dns_errors.labels(type=rdtype, error=error)
        counter.inc()
        log.warning("DNS lookup error for %s/%s: no usable answer (timeout, SERVFAIL or REFUSED)", name, rdtype)

    def _cached(self, key: _Key) -> DnsResult[str] | None:
        entry = self._cache.get(key)
        if entry is None:
            return None
        expires, result = entry
        now = self._clock()
        if now >= expires:
            del self._cache[key]
            return None
        self._cache.move_to_end(key)
        return DnsResult(result.status, result.answers, int(expires - now))

    def _store(self, key: _Key, result: DnsResult[str]) -> None:
        if result.ttl <= 0 or self._config.cache_size == 0:
            return
        self._cache[key] = (self._clock() + result.ttl, result)
        self._cache.move_to_end(key)
        while len(self._cache) > self._config.cache_size:
            self._cache.popitem(last=False)
