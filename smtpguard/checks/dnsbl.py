"""DNS allow/deny lists: postscreen's weighted DNSBL score, and smtpd's RHSBLs.

**Sites** are written as in ``postscreen_dnsbl_sites``:
``domain[=filter][*weight]``, e.g. ``zen.example=127.0.0.[2..11]*3`` or
``list.dnswl.example=127.0.[0..255].[1..3]*-2``.  The filter is Postfix's
ip_match pattern: four dot-separated fields, each a number 0..255 or a
``[...]`` list of ``;``-separated numbers and ``lo..hi`` ranges; the whole
pattern may also be wrapped in ``[]``.  Without a filter any A record counts;
without a weight the weight is 1; a negative weight allowlists.  Entries are
a TOML list, or one string separated by commas/whitespace exactly as in
main.cf.  A bad entry is reported with its position:
``dnsbl.sites: entry 2: bad filter "127.0.0.[x]": ...``.

**DNSBL score** (:func:`lookup_dnsbl`): the client address is reversed
(``1.2.3.4`` -> ``4.3.2.1``, IPv6 as 32 nibbles, IPv4-mapped IPv6 as IPv4)
and each *distinct* domain is asked for its A records once, all in parallel.
Every entry whose filter matches one of that domain's records adds its weight
once, so one list may appear several times with different filters and
weights (``zen=127.0.0.[10;11]*1, zen=127.0.0.[2..9]*4``).  A lookup that
fails (timeout, SERVFAIL) counts as "not listed", as in postscreen, and is
reported in :attr:`DnsblScore.failed`.  The session starts the lookups at
connect time and scores the answers in at the end of the greet wait
(:mod:`smtpguard.dnsscreen`, with :func:`score_answers`), so the check adds
no latency beyond the wait; a list that has not answered by then counts as
not listed, as in postscreen.

**Verdict** (:func:`dnsbl_result`): a total at or above ``threshold`` fails
with postscreen's ``550 5.7.1 Service unavailable; client [ip] blocked using
<domain>``, naming the entry with the largest weight (translated through
``reply_map``, postscreen_dnsbl_reply_map, to hide list passwords).  A total
at or below a *negative* ``allowlist_threshold`` passes with an allowlisting
verdict (postscreen_dnsbl_allowlist_threshold; its default 0 disables it).
The log reason is postscreen's ``DNSBL rank N for [ip]:port`` followed by
the entries that matched: ``(zen.example=127.0.0.2*3, ...)``.

The score's **TTL** (how long the allowlist cache may trust a pass) follows
postscreen 3.1+: for a positive total, the smallest TTL of the answers that
added positive weight; otherwise the smallest TTL of all other answers (a
failed lookup counts as 0); then clamped to ``min_ttl``..``max_ttl``.

**RHSBL** (:func:`check_rhsbl`): ``reject_rhsbl_helo``, ``_sender`` and
``_reverse_client``: ``<domain>.<site>`` is looked up for the HELO name, the
sender's domain or the client's reverse name, the sites in order, the first
listed one rejecting with smtpd's ``554 5.7.1 Service unavailable; Sender
address [a@b] blocked using <site>; <TXT reason>``.  As in smtpd, lookup
failures, address literals, numeric top-level domains and an ``unknown``
reverse name are not looked up or count as "not listed".  Weights make no
sense there and are refused.  Domains the ``override`` access table maps to
OK (the domain itself or, as with check_helo_access, a parent domain) are
exempt.
"""

from __future__ import annotations

import asyncio
import enum
import re
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..dns import DnsResult, Resolver, reversed_ip
from ..net import IPAddress, valid_hostname
from ..options import ConfigError, list_of, one_of, opt, parse_bool, parse_duration, parse_int, parse_str, warn
from ..tables import AccessKind, Table, check_access_spec, lookup_helo, parse_action
from ..verdict import ACTIONS, Action, Outcome, Reply, Result, ScreenTest, Verdict, verdict_for

# ---------------------------------------------------------------- filters

_Field = tuple[tuple[int, int], ...]  # (lo, hi) ranges; a number n is (n, n)


def _octet(text: str, pattern: str) -> int:
    if not text.isdigit() or int(text) > 255:
        raise ValueError(f'bad filter "{pattern}": need a number 0..255, got "{text}"')
    return int(text)


def _parse_field(text: str, pattern: str) -> _Field:
    if not (text.startswith("[") and text.endswith("]")):
        n = _octet(text, pattern)
        return ((n, n),)
    ranges = []
    for member in text[1:-1].split(";"):
        lo, dots, hi = member.partition("..")
        low, high = _octet(lo, pattern), _octet(hi if dots else lo, pattern)
        if low > high:
            raise ValueError(f'bad filter "{pattern}": empty range "{member}"')
        ranges.append((low, high))
    return tuple(ranges)


def _wrapped(pattern: str) -> bool:
    """True when the whole pattern is inside one pair of brackets, which
    ip_match strips: ``[127.0.0.[2..3]]``."""
    depth = 0
    for i, ch in enumerate(pattern):
        depth += (ch == "[") - (ch == "]")
        if depth == 0:
            return i == len(pattern) - 1 and i > 0
    return False


@dataclass(frozen=True)
class Filter:
    """A parsed ip_match pattern such as ``127.0.[0..255].[1;3..5]``."""

    text: str
    fields: tuple[_Field, _Field, _Field, _Field]

    @classmethod
    def parse(cls, pattern: str) -> Filter:
        body = pattern[1:-1] if _wrapped(pattern) else pattern
        parts = re.split(r"\.(?![^\[]*\])", body)  # dots outside [...]
        if len(parts) != 4:
            raise ValueError(f'bad filter "{pattern}": need four fields like 127.0.0.[2..11]')
        a, b, c, d = (_parse_field(p, pattern) for p in parts)
        return cls(pattern, (a, b, c, d))

    def matches(self, address: str) -> bool:
        octets = address.split(".")
        if len(octets) != 4 or not all(o.isdigit() for o in octets):
            return False
        return all(any(lo <= int(o) <= hi for lo, hi in ranges) for o, ranges in zip(octets, self.fields, strict=True))


# ---------------------------------------------------------------- sites


@dataclass(frozen=True)
class Site:
    """One ``domain=filter*weight`` entry."""

    domain: str
    filter: Filter | None = None
    weight: int = 1

    def __str__(self) -> str:
        text = self.domain + (f"={self.filter.text}" if self.filter else "")
        return text + (f"*{self.weight}" if self.weight != 1 else "")

    def match(self, result: DnsResult[str]) -> str | None:
        """The first A record of *result* this entry accepts, if any."""
        for address in result.answers:
            if self.filter is None or self.filter.matches(address):
                return address
        return None


def parse_site(value: Any) -> Site:
    """``domain[=filter][*weight]`` as in postscreen_dnsbl_sites."""
    text = parse_str(value).strip()
    rest, star, weight_text = text.partition("*")
    weight = 1
    if star:
        if not re.fullmatch(r"[+-]?\d+", weight_text):
            raise ValueError(f'bad weight "{weight_text}" in "{text}": expected an integer like 3 or -2')
        weight = int(weight_text)
    domain, eq, pattern = rest.partition("=")
    if not valid_hostname(domain):
        raise ValueError(f'bad domain "{domain}" in "{text}"')
    return Site(domain.lower(), Filter.parse(pattern) if eq else None, weight)


def parse_rhsbl_site(value: Any) -> Site:
    """Like :func:`parse_site`, without a weight (reject_rhsbl_* domain=filter)."""
    if "*" in parse_str(value):
        raise ValueError(f'"{value}": RHSBL entries take no weight')
    return parse_site(value)


def sites_of(item: Callable[[Any], Site]) -> Callable[[Any], tuple[Site, ...]]:
    """Parser for a list of sites: a TOML list, or a main.cf-style string
    separated by commas and whitespace; errors name the entry's position."""
    parse_list = list_of(item)

    def parse(value: Any) -> tuple[Site, ...]:
        return parse_list([e for e in re.split(r"[\s,]+", value) if e] if isinstance(value, str) else value)

    return parse


def parse_signed_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {value!r}")
    return value


def parse_reply_map(value: Any) -> tuple[tuple[str, str], ...]:
    """A TOML table ``{"secret.zen.example" = "zen.example"}``."""
    if not isinstance(value, Mapping) or not all(isinstance(v, str) for v in value.values()):
        raise ValueError(f'expected a table like {{"real.dnsbl.domain" = "name to show"}}, got {value!r}')
    return tuple((str(k).lower(), v) for k, v in value.items())


_REPLY_FIELDS = {"client_address", "rbl_domain", "rank"}


def parse_reply_template(value: Any) -> str:
    """Reply text with ``$client_address``, ``$rbl_domain`` and ``$rank``."""
    text = parse_str(value)
    template = string.Template(text)
    if not template.is_valid() or set(template.get_identifiers()) - _REPLY_FIELDS:
        raise ValueError(f'bad reply "{text}": the only variables are $client_address, $rbl_domain and $rank')
    return text


# ---------------------------------------------------------------- DNSBL


@dataclass(frozen=True)
class DnsblConfig:
    """``[dnsbl]``: postscreen's weighted DNSBL/DNSWL test."""

    enabled: bool = field(default=False, metadata=opt(parse_bool, "postscreen_dnsbl_sites non-empty"))
    action: str = field(default="enforce", metadata=opt(one_of(*ACTIONS), "postscreen_dnsbl_action"))
    sites: tuple[Site, ...] = field(default=(), metadata=opt(sites_of(parse_site), "postscreen_dnsbl_sites"))
    # Sites turn the test on, as a non-empty postscreen_dnsbl_sites does; an
    # explicit enabled = false keeps it off, with a warning (validate).
    threshold: int = field(default=1, metadata=opt(parse_int, "postscreen_dnsbl_threshold"))
    allowlist_threshold: int = field(default=0, metadata=opt(parse_signed_int, "postscreen_dnsbl_allowlist_threshold"))
    min_ttl: float = field(default=60.0, metadata=opt(parse_duration, "postscreen_dnsbl_min_ttl"))
    max_ttl: float = field(default=3600.0, metadata=opt(parse_duration, "postscreen_dnsbl_max_ttl"))
    reply: str = field(
        default="Service unavailable; client [$client_address] blocked using $rbl_domain",
        metadata=opt(parse_reply_template, "postscreen's fixed reply text"),
    )
    reply_map: tuple[tuple[str, str], ...] = field(
        default=(), metadata=opt(parse_reply_map, "postscreen_dnsbl_reply_map")
    )

    @staticmethod
    def imply(values: dict[str, Any]) -> None:
        """``sites`` without ``enabled``: on (postscreen's semantics)."""
        if values.get("sites") and "enabled" not in values:
            values["enabled"] = True

    def validate(self) -> None:
        if self.enabled and not self.sites:
            raise ConfigError("sites", "at least one domain=filter*weight entry is needed when enabled")
        if self.sites and not self.enabled:
            warn("false, so the sites are not looked up (postscreen looks them up whenever "
                 "postscreen_dnsbl_sites is set); remove it to turn the test on", "enabled")
        if self.threshold < 1:
            raise ConfigError("threshold", "must be at least 1")
        if self.allowlist_threshold > 0:
            raise ConfigError("allowlist_threshold", "must be negative (or 0 to disable allowlisting)")
        if not 0 < self.min_ttl <= self.max_ttl:
            raise ConfigError("min_ttl", f"must be greater than 0 and at most max_ttl ({self.max_ttl:g}s)")

    def reply_name(self, domain: str) -> str:
        """The name to show for *domain* in replies (postscreen_dnsbl_reply_map)."""
        return dict(self.reply_map).get(domain, domain)


@dataclass(frozen=True)
class Hit:
    """A site entry that matched, and the A record it matched."""

    site: Site
    address: str

    def __str__(self) -> str:
        return f"{self.site.domain}={self.address}*{self.site.weight}"


@dataclass(frozen=True)
class DnsblScore:
    """A client's combined DNSBL score and how it came about."""

    ip: str  # normalised: IPv4-mapped IPv6 as IPv4
    total: int = 0
    hits: tuple[Hit, ...] = ()  # in site order
    failed: tuple[str, ...] = ()  # domains whose lookup failed (counted as not listed)
    ttl: int = 0  # seconds, clamped to min_ttl..max_ttl

    @property
    def top(self) -> Hit | None:
        """The hit with the largest weight (the first one on a tie), which
        postscreen names in its reply."""
        best: Hit | None = None
        for hit in self.hits:
            if best is None or hit.site.weight > best.site.weight:
                best = hit
        return best


def score_answers(config: DnsblConfig, ip: IPAddress, answers: Mapping[str, DnsResult[str]]) -> DnsblScore:
    """Combine the A lookups *answers* (keyed by site domain) into a score."""
    hits = []
    for site in config.sites:
        address = site.match(answers[site.domain])
        if address is not None:
            hits.append(Hit(site, address))
    total = sum(h.site.weight for h in hits)
    listing = {h.site.domain for h in hits if h.site.weight > 0}
    if total > 0:
        ttls = [r.ttl for d, r in answers.items() if d in listing]
    else:
        ttls = [r.ttl for d, r in answers.items() if d not in listing]
    ttl = min(max(min(ttls, default=0), config.min_ttl), config.max_ttl)
    failed = tuple(d for d, r in answers.items() if not r.status.definite)
    return DnsblScore(str(ip), total, tuple(hits), failed, int(ttl))


def dnsbl_names(config: DnsblConfig, ip: IPAddress) -> dict[str, str]:
    """The question for each distinct site domain: ``{domain: "4.3.2.1.domain"}``."""
    reverse = reversed_ip(ip)
    return {site.domain: f"{reverse}.{site.domain}" for site in config.sites}


async def lookup_dnsbl(resolver: Resolver, config: DnsblConfig, ip: IPAddress) -> DnsblScore:
    """Look *ip* up in every configured list, in parallel, and score it."""
    names = dnsbl_names(config, ip)
    results = await asyncio.gather(*(resolver.a(name) for name in names.values()))
    return score_answers(config, ip, dict(zip(names, results, strict=True)))


def dnsbl_result(dnsbl: DnsblScore, config: DnsblConfig, peer: str | None = None) -> Result:
    """Turn a score into the check's result; *peer* is ``[ip]:port`` for the log."""
    details = [str(h) for h in dnsbl.hits] + [f"{d}=lookup failed" for d in dnsbl.failed]
    reason = f"DNSBL rank {dnsbl.total} for {peer or f'[{dnsbl.ip}]'}"
    reason += f" ({', '.join(details)})" if details else ""
    top = dnsbl.top
    if dnsbl.total >= config.threshold and top is not None:
        text = string.Template(config.reply).substitute(
            client_address=dnsbl.ip, rbl_domain=config.reply_name(top.site.domain), rank=dnsbl.total
        )
        return Result(ScreenTest.DNSBL, Outcome.FAIL, reason, verdict_for(config.action, Reply(550, "5.7.1", text)))
    if config.allowlist_threshold < 0 and dnsbl.total <= config.allowlist_threshold:
        return Result(ScreenTest.DNSBL, Outcome.PASS, f"{reason}, allowlisted", Verdict(Action.PASS))
    return Result(ScreenTest.DNSBL, Outcome.PASS, reason)


# ---------------------------------------------------------------- RHSBL


class RhsblTarget(enum.Enum):
    """What is looked up; the value is smtpd's ``$rbl_class``."""

    HELO = "Helo command"  # reject_rhsbl_helo
    SENDER = "Sender address"  # reject_rhsbl_sender
    REVERSE_CLIENT = "Unverified Client host"  # reject_rhsbl_reverse_client


@dataclass(frozen=True)
class RhsblConfig:
    """``[rhsbl]``: smtpd's reject_rhsbl_helo/_sender/_reverse_client."""

    enabled: bool = field(default=False, metadata=opt(parse_bool, ""))
    action: str = field(default="enforce", metadata=opt(one_of(*ACTIONS), "warn_if_reject when ignore"))
    helo_sites: tuple[Site, ...] = field(default=(), metadata=opt(sites_of(parse_rhsbl_site), "reject_rhsbl_helo"))
    sender_sites: tuple[Site, ...] = field(default=(), metadata=opt(sites_of(parse_rhsbl_site), "reject_rhsbl_sender"))
    reverse_client_sites: tuple[Site, ...] = field(
        default=(), metadata=opt(sites_of(parse_rhsbl_site), "reject_rhsbl_reverse_client")
    )
    override: str = field(default="", metadata=opt(parse_str, "check_*_access table with OK before reject_rhsbl_*"))

    def validate(self) -> None:
        if self.enabled and not (self.helo_sites or self.sender_sites or self.reverse_client_sites):
            raise ConfigError("sender_sites", "no helo_sites, sender_sites or reverse_client_sites given")
        check_access_spec("override", self.override)

    def sites_for(self, target: RhsblTarget) -> tuple[Site, ...]:
        return {
            RhsblTarget.HELO: self.helo_sites,
            RhsblTarget.SENDER: self.sender_sites,
            RhsblTarget.REVERSE_CLIENT: self.reverse_client_sites,
        }[target]


_TXT_LIMIT = 500  # smtpd's RBL_TXT_LIMIT


def _rhsbl_domain(target: RhsblTarget, what: str) -> str | None:
    """The domain to look up, or None when smtpd would not look it up."""
    domain = (what.rpartition("@")[2] if target is RhsblTarget.SENDER else what).rstrip(".").lower()
    if target is RhsblTarget.REVERSE_CLIENT and domain == "unknown":
        return None
    # Like smtpd: no address literals, no numeric top-level domain (some
    # RHSBLs answer "No IP queries" for those), nothing invalid.
    return domain if valid_hostname(domain) and not domain.rpartition(".")[2].isdigit() else None


def _exempt(table: Table, domain: str) -> str | None:
    """The override entry for *domain* (or a parent domain) if it is OK."""
    value = lookup_helo(table, domain)  # check_domain_access: name, then parents
    try:
        return value if value is not None and parse_action(value).kind is AccessKind.OK else None
    except ValueError:
        return None


async def check_rhsbl(
    resolver: Resolver,
    config: RhsblConfig,
    target: RhsblTarget,
    what: str,
    override: Table | None = None,
) -> Result:
    """Look *what* (HELO name, sender address or reverse client name) up in
    the target's RHSBL sites; *override* is the ``override`` table opened
    with :func:`smtpguard.tables.open_access_table`."""
    check = f"rhsbl_{target.name.lower()}"
    sites = config.sites_for(target)
    domain = _rhsbl_domain(target, what)
    if not sites:
        return Result(check, Outcome.SKIP, "no sites configured")
    if domain is None:
        return Result(check, Outcome.SKIP, f"no domain to look up in <{what}>")
    exempt = _exempt(override, domain) if override is not None else None
    if exempt is not None:
        return Result(check, Outcome.SKIP, f"{domain} exempt by override: {exempt}")
    names = list(dict.fromkeys(f"{domain}.{site.domain}" for site in sites))
    results = dict(zip(names, await asyncio.gather(*(resolver.a(n) for n in names)), strict=True))
    for site in sites:
        name = f"{domain}.{site.domain}"
        address = site.match(results[name])
        if address is not None:
            return await _rhsbl_listed(resolver, config, target, what, site, name, address)
    failed = [n for n, r in results.items() if not r.status.definite]
    reason = f"{domain} not listed" + (f" (lookup failed: {', '.join(failed)})" if failed else "")
    return Result(check, Outcome.PASS, reason)


async def _rhsbl_listed(
    resolver: Resolver, config: RhsblConfig, target: RhsblTarget, what: str, site: Site, name: str, address: str
) -> Result:
    txt = await resolver.txt(name)
    reason = " / ".join(txt.answers)[:_TXT_LIMIT]
    text = f"Service unavailable; {target.value} [{what}] blocked using {site.domain}"
    reply = Reply(554, "5.7.1", text + (f"; {reason}" if reason else ""))
    log = f"{name} listed: {address}" + (f' "{reason}"' if reason else "")
    return Result(f"rhsbl_{target.name.lower()}", Outcome.FAIL, log, verdict_for(config.action, reply))
