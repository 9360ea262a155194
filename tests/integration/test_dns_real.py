"""The resolver and the DNS-based checks against a real dnsmasq.

One dnsmasq per test (``dns_server`` fixture) serves the records below;
unknown names are NXDOMAIN, and ``slow.test`` is forwarded to a port that
never answers, so its lookups time out.  The resolver is smtpguard's own
:class:`~smtpguard.dns.DnsResolver` with short timeouts.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable

import pytest

from smtpguard.checks.dnsbl import (
    DnsblConfig,
    RhsblConfig,
    RhsblTarget,
    check_rhsbl,
    dnsbl_result,
    lookup_dnsbl,
)
from smtpguard.checks.domains import (
    HeloHostnameConfig,
    SenderDomainConfig,
    check_helo_hostname,
    check_sender_domain,
)
from smtpguard.checks.rdns import ClientNameConfig, NameStatus, check_client_names, lookup_client_names
from smtpguard.config import load_section
from smtpguard.dns import DnsConfig, DnsResolver, MxRecord, Status
from smtpguard.net import parse_ip
from smtpguard.verdict import Action, Outcome, Reply
from tests.lab import DnsServer

pytestmark = pytest.mark.dns

LISTED = "192.0.2.66"  # on zen.test (127.0.0.2, with TXT) and bl.test (127.0.0.4)
ALLOWED = "192.0.2.77"  # on wl.test (127.0.5.2, weight -2) and bl.test
GOOD = "192.0.2.10"  # PTR mail.good.test -> A 192.0.2.10
FORGED = "192.0.2.11"  # PTR forged.test -> A 198.51.100.1
NO_PTR = "192.0.2.12"
GOOD_V6 = "2001:db8::25"  # PTR v6.good.test -> AAAA 2001:db8::25

RECORDS = [
    "--local-ttl=300",
    "--host-record=66.2.0.192.zen.test,127.0.0.2",
    "--txt-record=66.2.0.192.zen.test,Listed: see https://zen.test/66",
    "--host-record=66.2.0.192.bl.test,127.0.0.4",
    "--host-record=77.2.0.192.bl.test,127.0.0.4",
    "--host-record=77.2.0.192.wl.test,127.0.5.2",
    "--host-record=mail.good.test,192.0.2.10",
    "--ptr-record=11.2.0.192.in-addr.arpa,forged.test",
    "--host-record=forged.test,198.51.100.1",
    "--host-record=v6.good.test,2001:db8::25",
    "--mx-host=mx.test,mail.mx.test,10",
    "--host-record=a-only.test,192.0.2.20",
    "--mx-host=nullmx.test,.,0",
    "--txt-record=txt-only.test,v=spf1 -all",
    "--host-record=spam.test.dbl.test,127.0.1.2",
    "--txt-record=spam.test.dbl.test,spam domain",
]

TIMEOUT = 0.5  # per try; LIFETIME bounds a whole question
LIFETIME = 1.0

SITES = ["zen.test=127.0.0.[2..11]*2", "bl.test", "wl.test=127.0.[0..255].[1..3]*-2", "slow.test*5"]


@pytest.fixture
def server(dns_server: Callable[..., DnsServer]) -> DnsServer:
    return dns_server(RECORDS, timeout_zones=["slow.test"])


@pytest.fixture
def resolver(server: DnsServer) -> DnsResolver:
    return DnsResolver(DnsConfig(nameservers=((server.address, server.port),), timeout=TIMEOUT, lifetime=LIFETIME))


def dnsbl_config(**kw: object) -> DnsblConfig:
    return load_section(DnsblConfig, {"enabled": True, "sites": SITES, **kw}, "dnsbl")


def queries(server: DnsServer, name: str) -> int:
    """How many queries for *name* dnsmasq logged."""
    return len(re.findall(rf"query\[\w+\] {re.escape(name)} from", server.log()))


# ---------------------------------------------------------------- the resolver


@pytest.mark.asyncio
async def test_answers_and_statuses(resolver: DnsResolver) -> None:
    a = await resolver.a("mail.good.test")
    assert (a.status, a.answers, a.ttl) == (Status.OK, ("192.0.2.10",), 300)
    assert (await resolver.aaaa("mail.good.test")).status is Status.NODATA
    assert (await resolver.a("nowhere.test")).status is Status.NXDOMAIN
    assert (await resolver.ptr(parse_ip(GOOD))).answers == ("mail.good.test",)
    assert (await resolver.ptr(parse_ip("::ffff:" + GOOD))).answers == ("mail.good.test",)
    assert (await resolver.txt("66.2.0.192.zen.test")).answers == ("Listed: see https://zen.test/66",)
    assert (await resolver.mx("mx.test")).answers == (MxRecord(10, "mail.mx.test"),)
    assert (await resolver.mx("nullmx.test")).answers == (MxRecord(0, "."),)


@pytest.mark.asyncio
async def test_a_zone_that_never_answers_is_a_tempfail_within_the_lifetime(resolver: DnsResolver) -> None:
    started = time.monotonic()
    result = await resolver.a("x.slow.test")
    assert result.status is Status.TEMPFAIL
    assert LIFETIME - 0.1 <= time.monotonic() - started < LIFETIME + 0.5


@pytest.mark.asyncio
async def test_refused_is_a_tempfail(dns_server: Callable[..., DnsServer]) -> None:
    server = dns_server([], nxdomain_by_default=False)  # no upstream: REFUSED
    resolver = DnsResolver(DnsConfig(nameservers=((server.address, server.port),), timeout=TIMEOUT, lifetime=LIFETIME))
    started = time.monotonic()
    assert (await resolver.a("elsewhere.example")).status is Status.TEMPFAIL
    assert time.monotonic() - started < TIMEOUT


@pytest.mark.asyncio
async def test_cache_and_in_flight_sharing(server: DnsServer, resolver: DnsResolver) -> None:
    results = await asyncio.gather(*(resolver.a("a-only.test") for _ in range(20)))
    assert {r.answers for r in results} == {("192.0.2.20",)}
    await resolver.a("A-ONLY.test.")
    await resolver.a("nowhere.test")
    await resolver.a("nowhere.test")
    assert (queries(server, "a-only.test"), queries(server, "nowhere.test")) == (1, 1)


# ---------------------------------------------------------------- DNSBL


@pytest.mark.asyncio
async def test_listed_client(resolver: DnsResolver) -> None:
    config = dnsbl_config(threshold=3)
    score = await lookup_dnsbl(resolver, config, parse_ip(LISTED))
    result = dnsbl_result(score, config, f"[{LISTED}]:40000")
    assert (score.total, score.failed) == (3, ("slow.test",))
    assert result.outcome is Outcome.FAIL and result.verdict.action is Action.REJECT
    # postscreen's reply names the heaviest list and carries no TXT text
    assert result.verdict.reply == Reply(550, "5.7.1", f"Service unavailable; client [{LISTED}] blocked using zen.test")
    assert result.reason == (
        f"DNSBL rank 3 for [{LISTED}]:40000 (zen.test=127.0.0.2*2, bl.test=127.0.0.4*1, slow.test=lookup failed)"
    )


@pytest.mark.asyncio
async def test_listed_ipv4_mapped_client(resolver: DnsResolver) -> None:
    score = await lookup_dnsbl(resolver, dnsbl_config(), parse_ip("::ffff:" + LISTED))
    assert (score.ip, score.total) == (LISTED, 3)


@pytest.mark.asyncio
async def test_dnswl_client_with_negative_weight(resolver: DnsResolver) -> None:
    config = dnsbl_config(allowlist_threshold=-1)
    score = await lookup_dnsbl(resolver, config, parse_ip(ALLOWED))
    result = dnsbl_result(score, config)
    assert score.total == -1
    assert (result.outcome, result.verdict.action) == (Outcome.PASS, Action.PASS)
    assert score.ttl == 60  # slow.test failed: the pass is trusted for min_ttl only


@pytest.mark.asyncio
async def test_dnsbl_lookups_run_in_parallel(resolver: DnsResolver) -> None:
    config = dnsbl_config(sites=[*SITES, "slow.test=127.0.0.3", "slow2.slow.test"])
    started = time.monotonic()
    await lookup_dnsbl(resolver, config, parse_ip("192.0.2.99"))
    assert time.monotonic() - started < LIFETIME + 0.5  # two slow lists cost one lifetime, not two


# ---------------------------------------------------------------- client names


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("ip", "reverse", "name", "name_status"),
    [
        (GOOD, "mail.good.test", "mail.good.test", NameStatus.OK),
        (GOOD_V6, "v6.good.test", "v6.good.test", NameStatus.OK),
        (FORGED, "forged.test", "unknown", NameStatus.FORGED),
        (NO_PTR, "unknown", "unknown", NameStatus.PERM),
    ],
)
async def test_client_names(resolver: DnsResolver, ip: str, reverse: str, name: str, name_status: NameStatus) -> None:
    names = await lookup_client_names(resolver, parse_ip(ip))
    assert (names.reverse_name, names.name, names.name_status) == (reverse, name, name_status)


@pytest.mark.asyncio
async def test_client_without_ptr_is_deferred(resolver: DnsResolver) -> None:
    result = check_client_names(await lookup_client_names(resolver, parse_ip(NO_PTR)), ClientNameConfig(enabled=True))
    assert result.verdict.action is Action.DEFER
    assert result.verdict.reply == Reply(
        450, "4.7.1", f"Client host rejected: cannot find your reverse hostname, [{NO_PTR}]"
    )


@pytest.mark.asyncio
async def test_client_whose_ptr_does_not_resolve_back(resolver: DnsResolver) -> None:
    names = await lookup_client_names(resolver, parse_ip(FORGED))
    assert check_client_names(names, ClientNameConfig(enabled=True)).outcome is Outcome.PASS
    config = ClientNameConfig(enabled=True, require="fcrdns", reject_code=550)
    result = check_client_names(names, config)
    assert result.verdict.action is Action.REJECT
    assert result.verdict.reply == Reply(550, "5.7.25", f"Client host rejected: cannot find your hostname, [{FORGED}]")


@pytest.mark.asyncio
async def test_client_with_fcrdns(resolver: DnsResolver) -> None:
    names = await lookup_client_names(resolver, parse_ip(GOOD))
    result = check_client_names(names, ClientNameConfig(enabled=True, require="fcrdns", reject_code=550))
    assert (result.outcome, result.verdict.action) == (Outcome.PASS, Action.CONTINUE)


# ---------------------------------------------------------------- sender domain and HELO


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("sender", "outcome", "action", "reply"),
    [
        ("a@mx.test", Outcome.PASS, Action.CONTINUE, None),
        ("a@a-only.test", Outcome.PASS, Action.CONTINUE, None),
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
            "a@nowhere.test",
            Outcome.FAIL,
            Action.DEFER,
            Reply(450, "4.1.8", "<a@nowhere.test>: Sender address rejected: Domain not found"),
        ),
        (
            "a@txt-only.test",
            Outcome.FAIL,
            Action.DEFER,
            Reply(450, "4.1.8", "<a@txt-only.test>: Sender address rejected: Domain not found"),
        ),
        (
            "a@x.slow.test",
            Outcome.SKIP,
            Action.DEFER,
            Reply(450, "4.1.8", "<a@x.slow.test>: Sender address rejected: Domain not found"),
        ),
    ],
)
async def test_sender_domain(
    resolver: DnsResolver, sender: str, outcome: Outcome, action: Action, reply: Reply | None
) -> None:
    config = SenderDomainConfig(reject_code=550) if action is Action.REJECT else SenderDomainConfig()
    started = time.monotonic()
    result = await check_sender_domain(resolver, config, sender)
    assert (result.outcome, result.verdict.action, result.verdict.reply) == (outcome, action, reply)
    assert time.monotonic() - started < 2 * LIFETIME + 0.5  # MX, then A+AAAA


@pytest.mark.asyncio
async def test_dns_timeout_never_rejects_for_good(resolver: DnsResolver) -> None:
    config = SenderDomainConfig(reject_code=550)
    result = await check_sender_domain(resolver, config, "a@x.slow.test")
    assert result.verdict.action is Action.DEFER and result.verdict.reply is not None
    assert result.verdict.reply.code == 450
    skip = await check_sender_domain(resolver, SenderDomainConfig(on_dns_error="skip"), "a@x.slow.test")
    assert skip.verdict.action is Action.CONTINUE


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("helo", "outcome"),
    [("mail.good.test", Outcome.PASS), ("mx.test", Outcome.PASS), ("nowhere.test", Outcome.FAIL)],
)
async def test_helo_hostname(resolver: DnsResolver, helo: str, outcome: Outcome) -> None:
    result = await check_helo_hostname(resolver, HeloHostnameConfig(enabled=True), helo)
    assert result.outcome is outcome


# ---------------------------------------------------------------- RHSBL


@pytest.mark.asyncio
async def test_rhsbl_sender_with_txt_reason(resolver: DnsResolver) -> None:
    config = load_section(RhsblConfig, {"enabled": True, "sender_sites": ["dbl.test=127.0.1.[2..99]"]}, "rhsbl")
    result = await check_rhsbl(resolver, config, RhsblTarget.SENDER, "bob@spam.test")
    assert result.verdict.reply == Reply(
        554, "5.7.1", "Service unavailable; Sender address [bob@spam.test] blocked using dbl.test; spam domain"
    )
    clean = await check_rhsbl(resolver, config, RhsblTarget.SENDER, "bob@mx.test")
    assert clean.outcome is Outcome.PASS
