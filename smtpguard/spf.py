"""SPF (RFC 7208) for SPF-aware greylisting: pyspf, asking the process's resolver.

``[greylist] spf_key = true``: when the sender's SPF record authorizes the
client address (``pass``), the greylist triplet's client part is the
SPF-validated domain instead of the client network, so a sender's pool
retrying from another address (another /24) passes after one delay.

How it works
------------
The SPF evaluation itself is pyspf's (the library Debian's
postfix-policyd-spf-python uses): record parsing, macros, the RFC 7208
section 4.6.4 limits -- at most 10 DNS-querying terms (strict mode: the
11th is a ``permerror``), at most 2 void lookups, at most 10 MX and PTR
names -- and CNAME handling.  pyspf is synchronous and asks the DNS through
its module-level ``DNSLookup``; smtpguard never lets it: its ``DNSLookup``
is replaced by one that answers only from what this evaluation already got
and from the :class:`~smtpguard.dns.DnsResolver`'s cache (a synchronous
peek, :meth:`~smtpguard.dns.DnsResolver.cached`).  A question neither can
answer stops the evaluation (:class:`_Missing`); :func:`evaluate` then asks
the resolver (async: its cache, in-flight de-duplication and concurrency
bound apply) and runs the evaluation again from the start.  So no thread
and no blocking socket is involved; a domain whose answers are all cached
is evaluated once, without an ``await``; an uncached one costs one
evaluation per answer fetched (a few hundred microseconds each, against the
milliseconds of the DNS round trip itself).

Failures are never a reason to refuse mail: a DNS question without a
usable answer (timeout, SERVFAIL) is pyspf's ``temperror``, and so is an
evaluation that exceeds :data:`LIFETIME` or :data:`MAX_ROUNDS`; anything but
``pass`` means "no SPF pass", and the recipient is greylisted as usual by
its client network.

Outside :func:`evaluate` (another user of pyspf in the same process),
``DNSLookup`` behaves as pyspf's own.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import spf as pyspf  # type: ignore[import-untyped]  # pyspf ships no type information

from .dns import DnsResult, MxRecord, Status

#: the whole evaluation, all lookups included (RFC 7208 4.6.4 suggests at least 20 s)
LIFETIME = 20.0
#: evaluations (answers fetched) at most; the 4.6.4 limits keep real records far below
MAX_ROUNDS = 150

_QTYPES = frozenset({"A", "AAAA", "MX", "PTR", "TXT"})


class SpfResolver(Protocol):
    """What :func:`evaluate` needs; :class:`~smtpguard.dns.DnsResolver` is one."""

    async def query(self, name: str, rdtype: str) -> DnsResult[str]: ...

    def cached(self, name: str, rdtype: str) -> DnsResult[str] | None: ...


@dataclass(frozen=True)
class SpfResult:
    """pyspf's result (``pass``, ``fail``, ``softfail``, ``neutral``,
    ``none``, ``permerror``, ``temperror``) for *domain* (the sender's
    domain; the HELO name for the null sender)."""

    result: str
    domain: str
    explanation: str = ""
    mechanism: str = ""  # the top-level term that decided, e.g. "ip4:192.0.2.0/24", "+all"

    @property
    def passed(self) -> bool:
        """A pass worth keying a triplet on: not one from the record's own
        ``all`` (``v=spf1 +all`` lets every address of the Internet pass)."""
        return self.result == "pass" and self.mechanism.lstrip("+").lower() != "all"


class _Missing(Exception):
    """The evaluation needs an answer it does not have yet."""

    def __init__(self, key: tuple[str, str]) -> None:
        super().__init__(key)
        self.key = key


_Answer = list[tuple[tuple[str, str], Any]]
_Source = Callable[[str, str], _Answer]
_SOURCE: contextvars.ContextVar[_Source | None] = contextvars.ContextVar("smtpguard_spf_source", default=None)
_PYSPF_LOOKUP = pyspf.DNSLookup


def _dns_lookup(name: str, qtype: str, strict: Any = True, timeout: Any = None) -> _Answer:
    source = _SOURCE.get()
    if source is None:
        return _PYSPF_LOOKUP(name, qtype, strict, timeout)  # type: ignore[no-any-return]
    return source(name, qtype)


pyspf.DNSLookup = _dns_lookup


def _value(qtype: str, text: str) -> Any:
    """Our resolver's text form -> what pyspf's dnspython driver returns."""
    if qtype == "MX":
        mx = MxRecord.parse(text)
        return mx.preference, mx.host
    if qtype == "TXT":
        return [text.encode("utf-8", "surrogateescape")]  # one record: its strings, joined
    return text


def _answer(name: str, qtype: str, result: DnsResult[str]) -> _Answer:
    if result.status is Status.TEMPFAIL:
        raise pyspf.TempError(f"DNS {qtype} lookup of {name}: no usable answer")
    return [((name, qtype), _value(qtype, text)) for text in result.answers]


def _run(ip: str, sender: str, helo: str, fetched: dict[tuple[str, str], DnsResult[str]],
         resolver: SpfResolver) -> SpfResult:
    """One evaluation from the start, answering from *fetched* and the
    resolver's cache; raises :class:`_Missing`."""

    def source(name: str, qtype: str) -> _Answer:
        key = (name.rstrip(".").lower(), qtype)
        if qtype not in _QTYPES:  # type SPF (99): only asked in pyspf's harsh mode
            return []
        result = fetched.get(key) or resolver.cached(*key)
        if result is None:
            raise _Missing(key)
        return _answer(name, qtype, result)

    query = pyspf.query(i=ip, s=sender, h=helo, strict=True)
    token = _SOURCE.set(source)
    try:
        result, _code, explanation = query.check()
    finally:
        _SOURCE.reset(token)
    return SpfResult(result, str(query.o).lower(), explanation, str(query.mechanism or ""))


async def evaluate(resolver: SpfResolver, ip: str, sender: str, helo: str) -> SpfResult:
    """The SPF result for MAIL FROM *sender* (``""``: the null sender, then
    the HELO identity) from client *ip*.  Never raises."""
    domain = (sender.rpartition("@")[2] if sender else helo).lower()
    fetched: dict[tuple[str, str], DnsResult[str]] = {}
    try:
        async with asyncio.timeout(LIFETIME):
            for _ in range(MAX_ROUNDS):
                try:
                    return _run(ip, sender, helo, fetched, resolver)
                except _Missing as missing:
                    fetched[missing.key] = await resolver.query(*missing.key)
    except TimeoutError:
        return SpfResult("temperror", domain, f"SPF evaluation took more than {LIFETIME:g}s")
    except Exception as exc:  # pyspf on input it does not expect: no SPF pass, never a crash
        return SpfResult("temperror", domain, f"SPF evaluation failed: {exc!r}")
    return SpfResult("temperror", domain, f"SPF evaluation needed more than {MAX_ROUNDS} answers")
