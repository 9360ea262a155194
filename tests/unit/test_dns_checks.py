"""Unit tests for smtpguard.dns and the DNS-based checks (no network).

The resolver under test is the real :class:`DnsResolver` over a fake
backend (:class:`FakeZone`), so the cache, de-duplication and concurrency
bound are exercised exactly as in production, with a fake clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import dns.message
import dns.rdata
import pytest

from smtpguard.checks.dnsbl import (
    DnsblConfig,
    Filter,
    RhsblConfig,
    RhsblTarget,
    check_rhsbl,
    dnsbl_result,
    lookup_dnsbl,
    parse_site,
    score_answers,
)
from smtpguard.checks.domains import (
    HeloHostnameConfig,
    SenderDomainConfig,
    check_helo_hostname,
    check_sender_domain,
)
from smtpguard.checks.rdns import ClientNameConfig, NameStatus, check_client_names, lookup_client_names
from smtpguard.config import ConfigError, load_section
from smtpguard.dns import (
    DnsConfig,
    DnsResolver,
    DnsResult,
    MxRecord,
    Status,
    _rdata_text,
    _soa_ttl,
    is_null_mx,
    reverse_name,
    reversed_ip,
)
from smtpguard.net import parse_ip, valid_hostname
from smtpguard.tables import open_access_table
from smtpguard.verdict import Action, Outcome, Reply

# ---------------------------------------------------------------- fakes


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeZone:
    """A :class:`smtpguard.dns.Backend` answering from a dict.

    ``records[(name, type)]`` is a list of answer texts; a name with records
    of other types only answers NODATA, an unknown name NXDOMAIN (with the
    SOA negative TTL ``soa``), a name in ``broken`` TEMPFAIL.  ``gate``, when
    set, holds every query until it is opened.
    """

    def __init__(
        self,
        records: dict[tuple[str, str], list[str]] | None = None,
        *,
        ttl: int = 300,
        soa: int | None = None,
        broken: Iterable[str] = (),
    ) -> None:
        self.records = records or {}
        self.ttl = ttl
        self.soa = soa
        self.broken = set(broken)
        self.calls: list[tuple[str, str]] = []
        self.gate: asyncio.Event | None = None
        self.active = 0
        self.peak = 0

    async def query(self, name: str, rdtype: str) -> tuple[DnsResult[str], int | None]:
        self.calls.append((name, rdtype))
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            if self.gate is not None:
                await self.gate.wait()
        finally:
            self.active -= 1
        if name in self.broken:
            return DnsResult(Status.TEMPFAIL), None
        if (name, rdtype) in self.records:
            return DnsResult(Status.OK, tuple(self.records[(name, rdtype)]), self.ttl), None
        known = any(n == name for n, _ in self.records)
        return DnsResult(Status.NODATA if known else Status.NXDOMAIN), self.soa


def resolver(zone: FakeZone, clock: Clock | None = None, **config: object) -> DnsResolver:
    return DnsResolver(DnsConfig(**config), backend=zone, clock=clock or Clock())  # type: ignore[arg-type]


def ok(*answers: str, ttl: int = 300) -> DnsResult[str]:
    return DnsResult(Status.OK, answers, ttl)


NX = DnsResult[str](Status.NXDOMAIN, (), 300)
FAILED = DnsResult[str](Status.TEMPFAIL)

# ---------------------------------------------------------------- query names


def test_reversed_ipv4() -> None:
    assert reversed_ip(parse_ip("192.0.2.1")) == "1.2.0.192"
    assert reverse_name(parse_ip("192.0.2.1")) == "1.2.0.192.in-addr.arpa"


def test_reversed_ipv6_nibbles() -> None:
    assert reversed_ip(parse_ip("2001:db8::1")) == "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2"
    assert reverse_name(parse_ip("2001:db8::1")).endswith(".8.b.d.0.1.0.0.2.ip6.arpa")


def test_ipv4_mapped_ipv6_is_ipv4() -> None:
    assert reversed_ip(parse_ip("::ffff:192.0.2.1")) == "1.2.0.192"
    assert reverse_name(parse_ip("::ffff:192.0.2.1")) == "1.2.0.192.in-addr.arpa"


def test_not_an_ip_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        reversed_ip(parse_ip("mail.example.com"))


@pytest.mark.asyncio
async def test_dnsbl_asks_each_domain_once_with_reversed_address() -> None:
    zone = FakeZone()
    config = DnsblConfig(sites=tuple(parse_site(s) for s in ("zen.test*2", "zen.test=127.0.0.4", "bl.test")))
    await lookup_dnsbl(resolver(zone), config, parse_ip("::ffff:192.0.2.1"))
    assert sorted(zone.calls) == [("1.2.0.192.bl.test", "A"), ("1.2.0.192.zen.test", "A")]


@pytest.mark.asyncio
async def test_dnsbl_ipv6_query_name() -> None:
    zone = FakeZone()
    config = DnsblConfig(sites=(parse_site("v6.test"),))
    await lookup_dnsbl(resolver(zone), config, parse_ip("2001:db8::2"))
    assert zone.calls == [(f"{reversed_ip(parse_ip('2001:db8::2'))}.v6.test", "A")]


def test_valid_hostname() -> None:
    assert valid_hostname("mail.example.com")
    assert valid_hostname("_spf.example.com")
    assert valid_hostname("host.123")
    assert not valid_hostname("192.0.2.1")
    assert not valid_hostname("mail.example.com.")
    assert not valid_hostname("-bad.example")
    assert not valid_hostname("a..b")
    assert not valid_hostname("x" * 64 + ".example")


def test_valid_hostname_waivers() -> None:
    """What a caller may waive: ``_`` (our own names), the lengths and the
    all-numeric rule (settings and allowlist entries)."""
    assert not valid_hostname("_spf.example.com", underscore=False)
    assert valid_hostname("x" * 64 + ".example", lengths=False)
    assert valid_hostname("192.0.2.1", numeric=True)
    assert not valid_hostname("-bad.example", underscore=False, lengths=False, numeric=True)


# ---------------------------------------------------------------- filters and sites


@pytest.mark.parametrize(
    ("pattern", "address", "expected"),
    [
        ("127.0.0.2", "127.0.0.2", True),
        ("127.0.0.2", "127.0.0.3", False),
        ("127.0.0.[2..11]", "127.0.0.11", True),
        ("127.0.0.[2..11]", "127.0.0.12", False),
        ("127.0.0.[2;4;6..8]", "127.0.0.7", True),
        ("127.0.0.[2;4;6..8]", "127.0.0.5", False),
        ("127.0.[0..255].[1;3]", "127.0.9.3", True),
        ("127.0.[0..255].[1;3]", "127.0.9.2", False),
        ("[127.0.0.2]", "127.0.0.2", True),
        ("[127.0.0.[2;3]]", "127.0.0.3", True),
        ("127.0.0.2", "not-an-address", False),
    ],
)
def test_filter_matches(pattern: str, address: str, expected: bool) -> None:
    assert Filter.parse(pattern).matches(address) is expected


@pytest.mark.parametrize(
    ("pattern", "problem"),
    [
        ("127.0.0.[x]", "need a number 0..255"),
        ("127.0.0.256", "need a number 0..255"),
        ("127.0.0", "need four fields"),
        ("127.0.0.2.1", "need four fields"),
        ("127.0.0.[5..2]", "empty range"),
        ("127.0.0.[2", "need a number 0..255"),
        ("127.0.0.[]", "need a number 0..255"),
        ("127.0.0.3[6..9]", "need a number 0..255"),
    ],
)
def test_bad_filters(pattern: str, problem: str) -> None:
    with pytest.raises(ValueError) as exc:
        Filter.parse(pattern)
    assert str(exc.value).startswith(f'bad filter "{pattern}": ') and problem in str(exc.value)


def test_parse_site_forms() -> None:
    assert parse_site("zen.test") == parse_site("ZEN.test*1")
    site = parse_site("list.dnswl.test=127.0.[0..255].[1..3]*-2")
    assert (site.domain, site.weight, str(site)) == ("list.dnswl.test", -2, "list.dnswl.test=127.0.[0..255].[1..3]*-2")
    assert parse_site("zen.test*+3").weight == 3


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("zen.test*x", 'bad weight "x"'),
        ("zen.test*1.5", 'bad weight "1.5"'),
        ("zen..test", 'bad domain "zen..test"'),
        ("=127.0.0.2", 'bad domain ""'),
    ],
)
def test_bad_sites(entry: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_site(entry)


def test_config_error_names_the_bad_entry() -> None:
    with pytest.raises(ConfigError) as exc:
        load_section(DnsblConfig, {"sites": ["zen.test*2", "bl.test=127.0.0.[x]"]}, "dnsbl")
    assert str(exc.value).startswith('dnsbl.sites: entry 2: bad filter "127.0.0.[x]"')


def test_sites_as_main_cf_string() -> None:
    config = load_section(DnsblConfig, {"sites": "zen.test*2, bl.test=127.0.0.[2;3]\n  wl.test*-1"}, "dnsbl")
    assert [str(s) for s in config.sites] == ["zen.test*2", "bl.test=127.0.0.[2;3]", "wl.test*-1"]
    with pytest.raises(ConfigError, match=r"^dnsbl\.sites: entry 3: bad weight"):
        load_section(DnsblConfig, {"sites": "a.test, b.test  c.test*z"}, "dnsbl")


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"enabled": True}, "dnsbl.sites"),
        ({"threshold": 0}, "dnsbl.threshold"),
        ({"allowlist_threshold": 2}, "dnsbl.allowlist_threshold"),
        ({"min_ttl": "2h"}, "dnsbl.min_ttl"),
        ({"reply": "blocked by $list"}, "dnsbl.reply"),
        ({"reply_map": ["x"]}, "dnsbl.reply_map"),
    ],
)
def test_dnsbl_config_validation(table: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_section(DnsblConfig, table, "dnsbl")
    assert exc.value.key == key


# ---------------------------------------------------------------- scoring


def config_for(sites: str, **kw: object) -> DnsblConfig:
    defaults: dict[str, object] = {"min_ttl": 1.0, "max_ttl": 86400.0}
    defaults.update(kw)
    return DnsblConfig(enabled=True, sites=tuple(parse_site(s) for s in sites.split(", ")), **defaults)  # type: ignore[arg-type]


ZEN_REPLY = ok("127.0.0.2", "127.0.0.4", "127.0.0.10", ttl=60)


@pytest.mark.parametrize(
    ("sites", "reply", "total"),
    [  # the cases of Postfix's postscreen_dnsbl_test.c, single site
        ("zen.test", ZEN_REPLY, 1),
        ("zen.test, zen.test", ZEN_REPLY, 2),
        ("zen.test", NX, 0),
        ("zen.test*3, zen.test", ZEN_REPLY, 4),
        ("zen.test, zen.test*3", ZEN_REPLY, 4),
        ("zen.test=127.0.0.10*3, zen.test", ZEN_REPLY, 4),
        ("zen.test=127.0.0.[1..255]*3, zen.test=127.0.0.3*-1", ok("127.0.0.3", "127.0.0.10"), 2),
        ("zen.test=127.0.0.[1..255]*3, zen.test=127.0.0.3*-1", ok("127.0.0.10"), 3),
        ("zen.test=127.0.0.5", ZEN_REPLY, 0),
    ],
)
def test_score_single_list(sites: str, reply: DnsResult[str], total: int) -> None:
    assert score_answers(config_for(sites), parse_ip("10.2.3.4"), {"zen.test": reply}).total == total


@pytest.mark.parametrize(
    ("sites", "zen", "foo", "total", "ttl"),
    [  # Postfix's multi-site cases: the TTL comes from the answers that decided
        ("zen.test, foo.test", ok("127.0.0.10", ttl=60), ok("127.0.0.10", ttl=60), 2, 60),
        ("zen.test, foo.test", ok("127.0.0.10", ttl=61), DnsResult(Status.NXDOMAIN, (), 62), 1, 61),
        ("zen.test, foo.test", DnsResult(Status.NXDOMAIN, (), 61), ok("127.0.0.10", ttl=62), 1, 62),
        ("zen.test, foo.test", DnsResult(Status.NXDOMAIN, (), 61), DnsResult(Status.NXDOMAIN, (), 62), 0, 61),
        ("zen.test=127.0.[0..255].[1..3]*-2, foo.test", ok("127.0.5.2", ttl=61), ok("127.0.0.10", ttl=62), -1, 61),
    ],
)
def test_score_two_lists(sites: str, zen: DnsResult[str], foo: DnsResult[str], total: int, ttl: int) -> None:
    result = score_answers(config_for(sites), parse_ip("10.2.3.4"), {"zen.test": zen, "foo.test": foo})
    assert (result.total, result.ttl) == (total, ttl)


def test_ttl_is_clamped() -> None:
    config = config_for("zen.test", min_ttl=60.0, max_ttl=3600.0)
    assert score_answers(config, parse_ip("10.0.0.1"), {"zen.test": ok("127.0.0.2", ttl=5)}).ttl == 60
    assert score_answers(config, parse_ip("10.0.0.1"), {"zen.test": ok("127.0.0.2", ttl=86400)}).ttl == 3600
    assert score_answers(config, parse_ip("10.0.0.1"), {"zen.test": DnsResult(Status.NODATA, (), 900)}).ttl == 900


def test_failed_lookup_counts_as_not_listed_and_is_reported() -> None:
    config = config_for("zen.test*2, slow.test*5", min_ttl=60.0)
    result = score_answers(config, parse_ip("10.0.0.1"), {"zen.test": NX, "slow.test": FAILED})
    assert (result.total, result.failed, result.ttl) == (0, ("slow.test",), 60)
    assert dnsbl_result(result, config).reason == "DNSBL rank 0 for [10.0.0.1] (slow.test=lookup failed)"


def test_listed_client_is_rejected_naming_the_heaviest_list() -> None:
    config = config_for("bl.test, zen.test=127.0.0.[2..11]*3, wl.test*-1", threshold=3)
    score = score_answers(
        config, parse_ip("::ffff:192.0.2.1"), {"bl.test": ok("127.0.0.2"), "zen.test": ok("127.0.0.4"), "wl.test": NX}
    )
    result = dnsbl_result(score, config, "[192.0.2.1]:4711")
    assert result.outcome is Outcome.FAIL
    assert result.verdict.action is Action.REJECT
    assert result.verdict.reply == Reply(550, "5.7.1", "Service unavailable; client [192.0.2.1] blocked using zen.test")
    assert result.reason == "DNSBL rank 4 for [192.0.2.1]:4711 (bl.test=127.0.0.2*1, zen.test=127.0.0.4*3)"


def test_reply_map_and_reply_template() -> None:
    config = config_for(
        "secret.zen.test*2",
        reply_map=(("secret.zen.test", "zen.test"),),
        reply="Blocked: [$client_address] is on $rbl_domain (rank $rank)",
    )
    result = dnsbl_result(score_answers(config, parse_ip("10.0.0.9"), {"secret.zen.test": ok("127.0.0.2")}), config)
    assert result.verdict.reply is not None
    assert result.verdict.reply.text == "Blocked: [10.0.0.9] is on zen.test (rank 2)"


def test_below_threshold_passes() -> None:
    config = config_for("zen.test, bl.test", threshold=2)
    score = score_answers(config, parse_ip("10.0.0.1"), {"zen.test": ok("127.0.0.2"), "bl.test": NX})
    result = dnsbl_result(score, config)
    assert (result.outcome, result.verdict.action) == (Outcome.PASS, Action.CONTINUE)


@pytest.mark.parametrize(("threshold", "action"), [(-2, Action.PASS), (-3, Action.CONTINUE), (0, Action.CONTINUE)])
def test_allowlist_threshold(threshold: int, action: Action) -> None:
    config = config_for("wl.test*-2", allowlist_threshold=threshold)
    result = dnsbl_result(score_answers(config, parse_ip("10.0.0.1"), {"wl.test": ok("127.0.0.2")}), config)
    assert (result.outcome, result.verdict.action) == (Outcome.PASS, action)


@pytest.mark.parametrize(
    ("action", "expected"),
    [("ignore", Action.CONTINUE), ("drop", Action.DROP), ("tempfail", Action.DEFER), ("enforce", Action.REJECT)],
)
def test_dnsbl_actions(action: str, expected: Action) -> None:
    config = config_for("zen.test", action=action)
    result = dnsbl_result(score_answers(config, parse_ip("10.0.0.1"), {"zen.test": ok("127.0.0.2")}), config)
    assert (result.outcome, result.verdict.action) == (Outcome.FAIL, expected)


# ---------------------------------------------------------------- RHSBL


def rhsbl(**kw: object) -> RhsblConfig:
    return load_section(RhsblConfig, {"enabled": True, **kw}, "rhsbl")


@pytest.mark.asyncio
async def test_rhsbl_sender_listed_with_txt_reason() -> None:
    zone = FakeZone(
        {
            ("spam.test.dbl.test", "A"): ["127.0.1.2"],
            ("spam.test.dbl.test", "TXT"): ["listed for spam"],
        }
    )
    config = rhsbl(sender_sites=["other.test", "dbl.test=127.0.1.[2..99]"])
    result = await check_rhsbl(resolver(zone), config, RhsblTarget.SENDER, "bob@Spam.Test")
    assert result.check == "rhsbl_sender" and result.outcome is Outcome.FAIL
    assert result.verdict.reply == Reply(
        554, "5.7.1", "Service unavailable; Sender address [bob@Spam.Test] blocked using dbl.test; listed for spam"
    )


@pytest.mark.asyncio
async def test_rhsbl_helo_filter_mismatch_and_failure_pass() -> None:
    zone = FakeZone({("bot.test.dbl.test", "A"): ["127.0.1.255"]}, broken=["bot.test.slow.test"])
    config = rhsbl(helo_sites=["dbl.test=127.0.1.[2..99]", "slow.test"])
    result = await check_rhsbl(resolver(zone), config, RhsblTarget.HELO, "bot.test")
    assert result.outcome is Outcome.PASS
    assert "lookup failed: bot.test.slow.test" in result.reason


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("target", "what"),
    [
        (RhsblTarget.SENDER, "<>"),
        (RhsblTarget.SENDER, "bob@[192.0.2.1]"),
        (RhsblTarget.HELO, "[192.0.2.1]"),
        (RhsblTarget.HELO, "host.123"),
        (RhsblTarget.REVERSE_CLIENT, "unknown"),
    ],
)
async def test_rhsbl_not_looked_up(target: RhsblTarget, what: str) -> None:
    zone = FakeZone()
    config = rhsbl(helo_sites=["dbl.test"], sender_sites=["dbl.test"], reverse_client_sites=["dbl.test"])
    result = await check_rhsbl(resolver(zone), config, target, what)
    assert result.outcome is Outcome.SKIP and zone.calls == []


@pytest.mark.asyncio
async def test_rhsbl_override_exempts_parent_domain() -> None:
    zone = FakeZone({("mail.friend.test.dbl.test", "A"): ["127.0.1.2"]})
    config = rhsbl(reverse_client_sites=["dbl.test"])
    table = open_access_table("inline:{friend.test=OK, mail.foe.test=REJECT}")
    result = await check_rhsbl(resolver(zone), config, RhsblTarget.REVERSE_CLIENT, "mail.friend.test", table)
    assert result.outcome is Outcome.SKIP and "friend.test" in result.reason and zone.calls == []
    other = open_access_table("inline:{mail.friend.test=DUNNO}")
    listed = await check_rhsbl(resolver(zone), config, RhsblTarget.REVERSE_CLIENT, "mail.friend.test", other)
    assert listed.outcome is Outcome.FAIL


def test_rhsbl_override_spec_is_checked() -> None:
    with pytest.raises(ConfigError, match=r"^rhsbl\.override: "):
        rhsbl(sender_sites=["dbl.test"], override="texthash:/nonexistent/override")


def test_rhsbl_refuses_weights() -> None:
    with pytest.raises(ConfigError, match=r"^rhsbl\.helo_sites: entry 1: .*no weight"):
        rhsbl(helo_sites=["dbl.test*2"])


# ---------------------------------------------------------------- client names

PTR_ZONE = {
    ("1.2.0.192.in-addr.arpa", "PTR"): ["mail.good.test"],
    ("mail.good.test", "A"): ["192.0.2.1"],
    ("2.2.0.192.in-addr.arpa", "PTR"): ["forged.test"],
    ("forged.test", "A"): ["198.51.100.7"],
    ("3.2.0.192.in-addr.arpa", "PTR"): ["192.0.2.3"],
    ("4.2.0.192.in-addr.arpa", "PTR"): ["gone.test"],
    ("5.2.0.192.in-addr.arpa", "PTR"): ["slow.test"],
    ("6.2.0.192.in-addr.arpa", "PTR"): ["first.test", "second.test"],
    ("second.test", "A"): ["192.0.2.6"],
    (reverse_name(parse_ip("2001:db8::25")), "PTR"): ["v6.good.test"],
    ("v6.good.test", "AAAA"): ["2001:db8:0::25"],
    ("v6.good.test", "A"): ["192.0.2.25"],
}


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("ip", "reverse", "reverse_status", "name", "name_status"),
    [
        ("192.0.2.1", "mail.good.test", NameStatus.OK, "mail.good.test", NameStatus.OK),
        ("::ffff:192.0.2.1", "mail.good.test", NameStatus.OK, "mail.good.test", NameStatus.OK),
        ("192.0.2.2", "forged.test", NameStatus.OK, "unknown", NameStatus.FORGED),
        ("192.0.2.3", "unknown", NameStatus.PERM, "unknown", NameStatus.PERM),
        ("192.0.2.4", "gone.test", NameStatus.OK, "unknown", NameStatus.FORGED),
        ("192.0.2.5", "slow.test", NameStatus.OK, "unknown", NameStatus.TEMP),
        ("192.0.2.6", "first.test", NameStatus.OK, "second.test", NameStatus.OK),
        ("192.0.2.7", "unknown", NameStatus.PERM, "unknown", NameStatus.PERM),
        ("192.0.2.8", "unknown", NameStatus.TEMP, "unknown", NameStatus.TEMP),
        ("2001:db8::25", "v6.good.test", NameStatus.OK, "v6.good.test", NameStatus.OK),
    ],
)
async def test_client_names(
    ip: str, reverse: str, reverse_status: NameStatus, name: str, name_status: NameStatus
) -> None:
    zone = FakeZone(PTR_ZONE, broken=["slow.test", "8.2.0.192.in-addr.arpa"])
    names = await lookup_client_names(resolver(zone), parse_ip(ip))
    assert (names.reverse_name, names.reverse_status, names.name, names.name_status) == (
        reverse,
        reverse_status,
        name,
        name_status,
    )


@pytest.mark.asyncio
async def test_fcrdns_asks_only_the_client_address_family() -> None:
    zone = FakeZone(PTR_ZONE)
    await lookup_client_names(resolver(zone), parse_ip("2001:db8::25"))
    assert ("v6.good.test", "A") not in zone.calls and ("v6.good.test", "AAAA") in zone.calls


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("ip", "config", "action", "reply"),
    [
        ("192.0.2.1", {"require": "fcrdns"}, Action.CONTINUE, None),
        (
            "192.0.2.7",
            {},
            Action.DEFER,
            Reply(450, "4.7.1", "Client host rejected: cannot find your reverse hostname, [192.0.2.7]"),
        ),
        (
            "192.0.2.7",
            {"reject_code": 550},
            Action.REJECT,
            Reply(550, "5.7.1", "Client host rejected: cannot find your reverse hostname, [192.0.2.7]"),
        ),
        ("192.0.2.2", {}, Action.CONTINUE, None),  # has a PTR: fine for "reverse"
        (
            "192.0.2.2",
            {"require": "fcrdns", "reject_code": 554},
            Action.REJECT,
            Reply(554, "5.7.25", "Client host rejected: cannot find your hostname, [192.0.2.2]"),
        ),
        (
            "192.0.2.5",
            {"require": "fcrdns", "reject_code": 550},
            Action.DEFER,
            Reply(450, "4.7.25", "Client host rejected: cannot find your hostname, [192.0.2.5]"),
        ),
        ("192.0.2.5", {"require": "fcrdns", "on_dns_error": "skip"}, Action.CONTINUE, None),
        ("192.0.2.2", {"require": "fcrdns", "action": "ignore"}, Action.CONTINUE, None),
        ("192.0.2.7", {"action": "drop", "reject_code": 550}, Action.DROP, None),
    ],
)
async def test_client_name_check(ip: str, config: dict[str, object], action: Action, reply: Reply | None) -> None:
    names = await lookup_client_names(resolver(FakeZone(PTR_ZONE, broken=["slow.test"])), parse_ip(ip))
    result = check_client_names(names, load_section(ClientNameConfig, {"enabled": True, **config}, "client_name"))
    assert result.verdict.action is action
    if reply is not None:
        assert result.verdict.reply == reply


def test_client_name_config_rejects_bad_code() -> None:
    with pytest.raises(ConfigError, match=r"^client_name\.reject_code: expected a reply code"):
        load_section(ClientNameConfig, {"reject_code": 250}, "client_name")


# ---------------------------------------------------------------- sender domain and HELO name

DOMAINS = {
    ("mx.test", "MX"): ["10 mail.mx.test"],
    ("a-only.test", "A"): ["192.0.2.10"],
    ("aaaa-only.test", "AAAA"): ["2001:db8::10"],
    ("nullmx.test", "MX"): ["0 ."],
    ("nullmx.test", "A"): ["192.0.2.11"],
    ("badmx.test", "MX"): ["0 .", "10 mail.badmx.test"],
    ("txt-only.test", "TXT"): ["v=spf1 -all"],
}


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("sender", "outcome", "action", "reply"),
    [
        ("a@mx.test", Outcome.PASS, Action.CONTINUE, None),
        ("a@a-only.test", Outcome.PASS, Action.CONTINUE, None),
        ("a@aaaa-only.test.", Outcome.PASS, Action.CONTINUE, None),
        (
            "a@nullmx.test",
            Outcome.FAIL,
            Action.REJECT,
            Reply(
                550,
                "5.7.27",
                "<a@nullmx.test>: Sender address rejected: Domain nullmx.test does not accept mail (nullMX)",
            ),
        ),
        (
            "a@badmx.test",
            Outcome.FAIL,
            Action.DEFER,
            Reply(450, "4.1.8", "<a@badmx.test>: Sender address rejected: Malformed DNS server reply"),
        ),
        (
            "a@nx.test",
            Outcome.FAIL,
            Action.DEFER,
            Reply(450, "4.1.8", "<a@nx.test>: Sender address rejected: Domain not found"),
        ),
        (
            "a@txt-only.test",
            Outcome.FAIL,
            Action.DEFER,
            Reply(450, "4.1.8", "<a@txt-only.test>: Sender address rejected: Domain not found"),
        ),
        (
            "a@slow.test",
            Outcome.SKIP,
            Action.DEFER,
            Reply(450, "4.1.8", "<a@slow.test>: Sender address rejected: Domain not found"),
        ),
        ("", Outcome.SKIP, Action.CONTINUE, None),
        ("postmaster", Outcome.SKIP, Action.CONTINUE, None),
        ("a@[192.0.2.1]", Outcome.SKIP, Action.CONTINUE, None),
    ],
)
async def test_sender_domain(sender: str, outcome: Outcome, action: Action, reply: Reply | None) -> None:
    zone = FakeZone(DOMAINS, broken=["slow.test"])
    result = await check_sender_domain(resolver(zone), SenderDomainConfig(), sender)
    assert (result.outcome, result.verdict.action, result.verdict.reply) == (outcome, action, reply)


@pytest.mark.asyncio
async def test_sender_domain_mx_tempfail_but_address_passes() -> None:
    class MxBroken(FakeZone):
        async def query(self, name: str, rdtype: str) -> tuple[DnsResult[str], int | None]:
            if rdtype == "MX":
                return DnsResult(Status.TEMPFAIL), None
            return await super().query(name, rdtype)

    result = await check_sender_domain(resolver(MxBroken(DOMAINS)), SenderDomainConfig(), "a@a-only.test")
    assert result.outcome is Outcome.PASS
    result = await check_sender_domain(resolver(MxBroken(DOMAINS)), SenderDomainConfig(), "a@txt-only.test")
    assert (result.outcome, result.verdict.action) == (Outcome.SKIP, Action.DEFER)


@pytest.mark.asyncio
async def test_sender_domain_nxdomain_does_not_ask_for_addresses() -> None:
    zone = FakeZone(DOMAINS)
    await check_sender_domain(resolver(zone), SenderDomainConfig(), "a@nx.test")
    assert zone.calls == [("nx.test", "MX")]


@pytest.mark.asyncio
async def test_sender_domain_permanent_code_and_dns_error_policy() -> None:
    zone = FakeZone(DOMAINS, broken=["slow.test"])
    config = load_section(SenderDomainConfig, {"reject_code": 550, "on_dns_error": "skip"}, "sender_domain")
    result = await check_sender_domain(resolver(zone), config, "a@nx.test")
    assert result.verdict.reply == Reply(550, "5.1.8", "<a@nx.test>: Sender address rejected: Domain not found")
    assert result.verdict.action is Action.REJECT
    result = await check_sender_domain(resolver(zone), config, "a@slow.test")
    assert (result.outcome, result.verdict.action) == (Outcome.SKIP, Action.CONTINUE)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("helo", "outcome", "action"),
    [
        ("a-only.test", Outcome.PASS, Action.CONTINUE),
        ("aaaa-only.test", Outcome.PASS, Action.CONTINUE),
        ("mx.test", Outcome.PASS, Action.CONTINUE),
        ("nullmx.test", Outcome.PASS, Action.CONTINUE),
        ("txt-only.test", Outcome.FAIL, Action.DEFER),
        ("nx.test", Outcome.FAIL, Action.DEFER),
        ("slow.test", Outcome.SKIP, Action.DEFER),
        ("[192.0.2.1]", Outcome.SKIP, Action.CONTINUE),
    ],
)
async def test_helo_hostname(helo: str, outcome: Outcome, action: Action) -> None:
    zone = FakeZone(DOMAINS, broken=["slow.test"])
    result = await check_helo_hostname(resolver(zone), HeloHostnameConfig(enabled=True), helo)
    assert (result.outcome, result.verdict.action) == (outcome, action)
    if action is Action.DEFER:
        assert result.verdict.reply == Reply(450, "4.7.1", f"<{helo}>: Helo command rejected: Host not found")


@pytest.mark.asyncio
async def test_helo_nxdomain_does_not_ask_for_mx() -> None:
    zone = FakeZone(DOMAINS)
    await check_helo_hostname(resolver(zone), HeloHostnameConfig(enabled=True), "nx.test")
    assert sorted(zone.calls) == [("nx.test", "A"), ("nx.test", "AAAA")]


def test_domain_check_defaults_follow_postfix() -> None:
    assert (SenderDomainConfig().enabled, SenderDomainConfig().reject_code) == (False, 450)
    assert (HeloHostnameConfig().enabled, HeloHostnameConfig().reject_code) == (False, 450)


# ---------------------------------------------------------------- the resolver


@pytest.mark.asyncio
async def test_positive_answers_are_cached_for_their_ttl() -> None:
    clock = Clock()
    zone = FakeZone({("host.test", "A"): ["192.0.2.1"]}, ttl=60)
    r = resolver(zone, clock)
    assert (await r.a("host.test")).answers == ("192.0.2.1",)
    clock.now += 59
    again = await r.a("HOST.test.")
    assert (again.answers, again.ttl, len(zone.calls)) == (("192.0.2.1",), 1, 1)
    clock.now += 1
    await r.a("host.test")
    assert len(zone.calls) == 2


@pytest.mark.asyncio
@pytest.mark.parametrize(("soa", "negative_ttl", "kept"), [(30, 300.0, 30), (3600, 300.0, 300), (None, 120.0, 120)])
async def test_negative_answers_are_cached(soa: int | None, negative_ttl: float, kept: int) -> None:
    clock = Clock()
    zone = FakeZone({("host.test", "A"): ["192.0.2.1"]}, soa=soa)
    r = resolver(zone, clock, negative_ttl=negative_ttl)
    first = await r.a("nx.test")
    nodata = await r.mx("host.test")
    assert (first.status, first.ttl, nodata.status) == (Status.NXDOMAIN, kept, Status.NODATA)
    clock.now += kept - 1
    await r.a("nx.test")
    await r.mx("host.test")
    assert len(zone.calls) == 2
    clock.now += 1
    await r.a("nx.test")
    assert len(zone.calls) == 3


@pytest.mark.asyncio
async def test_failures_are_not_cached() -> None:
    zone = FakeZone(broken=["slow.test"])
    r = resolver(zone)
    assert (await r.a("slow.test")).status is Status.TEMPFAIL
    assert (await r.a("slow.test")).status is Status.TEMPFAIL
    assert len(zone.calls) == 2


@pytest.mark.asyncio
async def test_cache_is_a_bounded_lru() -> None:
    zone = FakeZone({(f"h{i}.test", "A"): [f"192.0.2.{i}"] for i in range(4)})
    r = resolver(zone, cache_size=2)
    for name in ("h0.test", "h1.test", "h0.test", "h2.test"):  # h1 is the least recently used
        await r.a(name)
    zone.calls.clear()
    await r.a("h0.test")
    await r.a("h2.test")
    await r.a("h1.test")
    assert zone.calls == [("h1.test", "A")]


@pytest.mark.asyncio
async def test_cache_size_zero_disables_the_cache() -> None:
    zone = FakeZone({("h.test", "A"): ["192.0.2.1"]})
    r = resolver(zone, cache_size=0)
    await r.a("h.test")
    await r.a("h.test")
    assert len(zone.calls) == 2


@pytest.mark.asyncio
async def test_identical_questions_in_flight_share_one_query() -> None:
    zone = FakeZone({("h.test", "A"): ["192.0.2.1"]})
    zone.gate = asyncio.Event()
    r = resolver(zone)
    first = asyncio.create_task(r.a("h.test"))
    second = asyncio.create_task(r.a("H.TEST"))
    third = asyncio.create_task(r.aaaa("h.test"))
    await asyncio.sleep(0.01)
    first.cancel()  # a session that hangs up does not cancel the others' query
    zone.gate.set()
    assert (await second).answers == ("192.0.2.1",)
    assert (await third).status is Status.NODATA
    assert sorted(zone.calls) == [("h.test", "A"), ("h.test", "AAAA")]
    with pytest.raises(asyncio.CancelledError):
        await first


@pytest.mark.asyncio
async def test_queries_in_flight_are_bounded() -> None:
    zone = FakeZone()
    zone.gate = asyncio.Event()
    r = resolver(zone, max_in_flight=3)
    tasks = [asyncio.create_task(r.a(f"h{i}.test")) for i in range(10)]
    await asyncio.sleep(0.01)
    assert zone.active == 3
    zone.gate.set()
    await asyncio.gather(*tasks)
    assert (zone.peak, len(zone.calls)) == (3, 10)


@pytest.mark.asyncio
async def test_lifetime_bounds_a_hanging_query() -> None:
    zone = FakeZone({("h.test", "A"): ["192.0.2.1"]})
    zone.gate = asyncio.Event()  # never opened
    r = resolver(zone, timeout=0.05, lifetime=0.05)
    assert (await asyncio.wait_for(r.a("h.test"), 1)).status is Status.TEMPFAIL


@pytest.mark.asyncio
async def test_mx_records_and_null_mx() -> None:
    zone = FakeZone({("m.test", "MX"): ["10 mx1.m.test", "20 mx2.m.test"], ("null.test", "MX"): ["0 ."]})
    r = resolver(zone)
    mx = await r.mx("m.test")
    assert mx.answers == (MxRecord(10, "mx1.m.test"), MxRecord(20, "mx2.m.test"))
    assert not is_null_mx(mx.answers)
    assert is_null_mx((await r.mx("null.test")).answers)
    assert not is_null_mx([MxRecord(0, "."), MxRecord(10, "mx.test")])


@pytest.mark.asyncio
async def test_empty_name_is_nxdomain_without_a_query() -> None:
    zone = FakeZone()
    assert (await resolver(zone).a(".")).status is Status.NXDOMAIN
    assert zone.calls == []


@pytest.mark.parametrize(
    ("entry", "parsed"),
    [
        ("192.0.2.53", ("192.0.2.53", 53)),
        ("127.0.0.1:5353", ("127.0.0.1", 5353)),
        ("::1", ("::1", 53)),
        ("[::1]:5353", ("::1", 5353)),
    ],
)
def test_nameserver_syntax(entry: str, parsed: tuple[str, int]) -> None:
    assert load_section(DnsConfig, {"nameservers": [entry]}, "dns").nameservers == (parsed,)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"nameservers": ["127.0.0.1", "ns.example:53"]}, "dns.nameservers: entry 2: nameserver must be an IP"),
        ({"nameservers": ["127.0.0.1:0"]}, "dns.nameservers: entry 1: port must be"),
        ({"timeout": "10s", "lifetime": "5s"}, "dns.lifetime: must be at least timeout"),
        ({"max_in_flight": 0}, "dns.max_in_flight: must be at least 1"),
    ],
)
def test_dns_config_errors(table: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=f"^{message}"):
        load_section(DnsConfig, table, "dns")


def test_reply_parsing_helpers() -> None:
    """The dnspython backend's SOA negative TTL (RFC 2308) and answer texts."""
    reply = dns.message.from_text(
        """id 1
opcode QUERY
rcode NXDOMAIN
flags QR AA RD RA
;QUESTION
nx.example. IN A
;AUTHORITY
example. 900 IN SOA ns.example. admin.example. 1 7200 3600 86400 120
"""
    )
    assert _soa_ttl(reply) == 120
    assert _soa_ttl(None) is None
    txt = dns.rdata.from_text("IN", "TXT", '"v=spf1 " "-all"')
    mx = dns.rdata.from_text("IN", "MX", "0 .")
    ptr = dns.rdata.from_text("IN", "PTR", "mail.example.")
    assert [_rdata_text(r) for r in (txt, mx, ptr)] == ["v=spf1 -all", "0 .", "mail.example"]
