"""The DNS checks in the pipeline, on a fake zone and a fake clock: what is
looked up when, the DNSBL verdict after the greet wait, the DNSWL session
fact, the client name, the delayed client/HELO/sender verdicts, DNS failures."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from smtpguard.config import ConfigError, from_dict
from smtpguard.dns import DnsConfig, DnsResolver
from smtpguard.net import parse_ip
from smtpguard.pipeline import Pipeline
from smtpguard.session import Session
from smtpguard.store import MemoryStore
from smtpguard.verdict import Action, Verdict
from tests.unit.test_dns_checks import FakeZone
from tests.unit.test_pipeline import FakeClock

LISTED, DNSWL, GOOD, NO_PTR = "192.0.2.2", "192.0.2.3", "192.0.2.10", "192.0.2.12"

ZONE = {
    ("2.2.0.192.zen.test", "A"): ["127.0.0.2"],
    ("3.2.0.192.wl.test", "A"): ["127.0.5.2"],
    ("10.2.0.192.in-addr.arpa", "PTR"): ["mail.good.test"],
    ("mail.good.test", "A"): [GOOD],
    ("3.2.0.192.in-addr.arpa", "PTR"): ["wl.good.test"],
    ("wl.good.test", "A"): [DNSWL],
    ("mx.test", "MX"): ["10 mail.mx.test"],
    ("nullmx.test", "MX"): ["0 ."],
    ("spam.test.dbl.test", "A"): ["127.0.1.2"],
}
DNSBL = {"enabled": True, "sites": ["zen.test*2", "wl.test*-2"], "allowlist_threshold": -1}


def make(data: dict[str, Any] | None = None, zone: FakeZone | None = None) -> tuple[Pipeline, FakeZone, FakeClock]:
    clock = FakeClock()
    zone = zone or FakeZone(ZONE)
    resolver = DnsResolver(DnsConfig(), backend=zone, clock=clock)
    return Pipeline(from_dict(data or {}), MemoryStore(clock), clock, resolver), zone, clock


def session(ip: str) -> Session:
    return Session(parse_ip(ip), 40123, "198.51.100.1", 25)


async def connect(p: Pipeline, ip: str) -> Session:
    s = session(ip)
    assert (await p.on_connect(s, 1, 1)).action is Action.CONTINUE
    assert (await p.on_banner(s)).action is Action.CONTINUE
    return s


async def rcpt(p: Pipeline, s: Session, sender: str = "a@mx.test") -> Verdict:
    s.helo, s.sender = "client.example", sender
    v = await p.on_helo(s)
    if not v.final:
        v = await p.on_mail(s)
    return v if v.final else await p.on_rcpt(s, "bob@example.test")


def reply(v: Verdict) -> str:
    return str(v.reply) if v.reply else ""


async def test_lookups_start_at_connect_and_run_during_the_wait() -> None:
    zone = FakeZone(ZONE)
    zone.gate = asyncio.Event()
    p, _, _ = make({"dnsbl": DNSBL}, zone)
    s = session(GOOD)
    await p.on_connect(s, 1, 1)
    for _ in range(10):  # let the background task reach the (gated) backend
        await asyncio.sleep(0)
    assert {c[1] for c in zone.calls} == {"A", "PTR"}  # DNSBL and PTR asked before the banner, in parallel
    zone.gate.set()
    assert (await p.on_banner(s)).action is Action.CONTINUE
    assert s.client_name == "mail.good.test" and s.identity().name == "mail.good.test"


async def test_listed_client_is_rejected_at_every_rcpt(caplog: pytest.LogCaptureFixture) -> None:
    p, _, _ = make({"dnsbl": DNSBL})
    with caplog.at_level("INFO", logger="smtpguard"):
        s = await connect(p, LISTED)
    assert "DNSBL rank 2 for [192.0.2.2]:40123 (zen.test=127.0.0.2*2)" in caplog.text
    assert reply(await rcpt(p, s)) == "550 5.7.1 Service unavailable; client [192.0.2.2] blocked using zen.test"
    assert reply(await p.on_rcpt(s, "c@example.test")).startswith("550 5.7.1")


async def test_drop_acts_before_the_banner() -> None:
    p, _, _ = make({"dnsbl": {**DNSBL, "action": "drop"}})
    s = session(LISTED)
    await p.on_connect(s, 1, 1)
    v = await p.on_banner(s)
    assert (v.action, reply(v)) == (Action.DROP, "521 5.7.1 Service unavailable; client [192.0.2.2] "
                                                 "blocked using zen.test")


async def test_dnswl_is_a_session_fact_and_skips_the_protocol_tests() -> None:
    p, _, _ = make({"dnsbl": DNSBL})
    s = await connect(p, DNSWL)
    assert s.dnswl and not s.allowlisted and not s.todo
    # A non-SMTP command would fail the non_smtp test: DNSWL counts it as passed.
    assert (await p.on_command(s, b"GET / HTTP/1.0\r\n", "GET", b"", "")).action is Action.CONTINUE
    assert not s.delayed
    plain = await connect(p, GOOD)
    assert not plain.dnswl
    # Not cached (postscreen): the next connection is looked up, and DNSWL, again.
    await p.store.write_behind.wait()
    assert "dnsbl" not in await p.store.get_cache(DNSWL)
    assert (await connect(p, DNSWL)).dnswl


async def test_dnsbl_pass_is_cached_for_the_clamped_ttl_and_pass_old_skips_lookups() -> None:
    p, zone, clock = make({"dnsbl": {**DNSBL, "min_ttl": "60s", "max_ttl": "120s"}})
    s = await connect(p, GOOD)  # NXDOMAIN everywhere: negative TTL 300s, clamped to 120s
    assert "dnsbl" not in s.todo
    await p.store.write_behind.wait()
    assert (await p.store.get_cache(GOOD))["dnsbl"] == clock.now + 120
    zone.calls.clear()
    s = session(GOOD)
    await p.on_connect(s, 1, 1)
    assert "dnsbl" not in s.todo
    await p.on_banner(s)
    assert not any(name.endswith(("zen.test", "wl.test")) for name, _ in zone.calls)


async def test_allowlisted_client_gets_its_name_but_no_dnsbl_lookup(tmp_path: Any) -> None:
    table = tmp_path / "clients"
    table.write_text(f"{LISTED} OK\n")
    p, zone, _ = make({"dnsbl": DNSBL, "access": {"client_table": f"cidr:{table}"},
                       "client_name": {"enabled": True}})
    s = await connect(p, LISTED)
    assert not any(name.endswith("zen.test") for name, _ in zone.calls)
    assert (await p.on_rcpt(s, "bob@example.test")).action is Action.CONTINUE  # no client-name reject either


@pytest.mark.parametrize(("config", "ip", "expected"), [
    ({}, NO_PTR, "450 4.7.1 Client host rejected: cannot find your reverse hostname, [192.0.2.12]"),
    ({"reject_code": 550}, NO_PTR, "550 5.7.1 Client host rejected: cannot find your reverse hostname, [192.0.2.12]"),
    ({"require": "fcrdns"}, GOOD, ""),
])
async def test_client_name_check_is_answered_at_rcpt(config: dict[str, Any], ip: str, expected: str) -> None:
    p, _, _ = make({"client_name": {"enabled": True, **config}})
    s = await connect(p, ip)
    assert reply(await rcpt(p, s)) == expected


async def test_dns_failure_never_gives_5xx() -> None:
    broken = FakeZone(ZONE, broken={"12.2.0.192.in-addr.arpa", "2.2.0.192.zen.test", "slow.test"})
    p, _, _ = make({"dnsbl": DNSBL, "client_name": {"enabled": True, "reject_code": 550},
                    "sender_domain": {"enabled": True, "reject_code": 550}}, broken)
    s = await connect(p, NO_PTR)
    assert reply(await rcpt(p, s)).startswith("450 4.7.1 Client host rejected")
    p, _, _ = make({"dnsbl": DNSBL, "sender_domain": {"enabled": True, "reject_code": 550}}, broken)
    s = await connect(p, LISTED)  # its list did not answer: not listed
    assert reply(await rcpt(p, s, "a@slow.test")) == \
        "450 4.1.8 <a@slow.test>: Sender address rejected: Domain not found"
    s.reset_transaction()
    assert (await rcpt(p, s)).action is Action.CONTINUE


async def test_sender_and_helo_checks_are_delayed_to_rcpt() -> None:
    p, _, _ = make({"sender_domain": {"enabled": True},
                    "rhsbl": {"enabled": True, "helo_sites": ["dbl.test"]}})
    s = await connect(p, GOOD)
    assert reply(await rcpt(p, s, "a@nullmx.test")).startswith("550 5.7.27 <a@nullmx.test>")
    s.reset_transaction()
    s.helo = "spam.test"
    assert (await p.on_helo(s)).action is Action.CONTINUE
    s.sender = "a@mx.test"
    assert (await p.on_mail(s)).action is Action.CONTINUE
    assert reply(await p.on_rcpt(s, "bob@example.test")) == \
        "554 5.7.1 Service unavailable; Helo command [spam.test] blocked using dbl.test"


async def test_helo_hostname_check_runs_after_the_helo_syntax_checks() -> None:
    p, zone, _ = make({"helo_hostname": {"enabled": True}})
    s = await connect(p, GOOD)
    s.helo = "nowhere.test"
    assert (await p.on_helo(s)).action is Action.CONTINUE
    assert reply(s.delayed["helo"]) == "450 4.7.1 <nowhere.test>: Helo command rejected: Host not found"
    zone.calls.clear()
    s.helo = "[300.1.1.1]"  # invalid: refused by the syntax check, never looked up
    assert (await p.on_helo(s)).action is Action.CONTINUE
    assert reply(s.delayed["helo"]).startswith("501 5.5.2") and zone.calls == []


async def test_without_delay_reject_the_sender_domain_is_refused_at_mail() -> None:
    p, _, _ = make({"screen": {"delay_reject": False}, "sender_domain": {"enabled": True}})
    s = await connect(p, GOOD)
    s.sender = "a@nx.test"
    assert reply(await p.on_mail(s)) == "450 4.1.8 <a@nx.test>: Sender address rejected: Domain not found"


def session_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith(("dnsbl ", "names "))]


async def test_hangup_cancels_the_lookups() -> None:
    zone = FakeZone(ZONE)
    zone.gate = asyncio.Event()
    p, _, _ = make({"dnsbl": DNSBL}, zone)
    s = session(GOOD)
    await p.on_connect(s, 1, 1)
    assert len(session_tasks()) == 3  # 2 lists + the names
    p.on_disconnect(s)
    await asyncio.sleep(0)
    assert s.lookups is None and session_tasks() == []
    zone.gate.set()


async def test_finished_lookups_keep_their_answers_not_their_tasks() -> None:
    p, _, _ = make({"dnsbl": DNSBL})
    s = session(LISTED)
    await p.on_connect(s, 1, 1)
    for _ in range(10):
        await asyncio.sleep(0)
    assert session_tasks() == [] and s.lookups is not None  # done: only the answers are held
    assert (await p.on_banner(s)).action is Action.CONTINUE
    assert reply(await rcpt(p, s)).startswith("550 5.7.1")


async def test_a_list_slower_than_the_greet_wait_counts_as_not_listed(caplog: pytest.LogCaptureFixture) -> None:
    zone = FakeZone(ZONE)
    zone.gate = asyncio.Event()  # no answer until the wait is over
    p, _, _ = make({"dnsbl": DNSBL, "pregreet": {"greet_wait": "0.05s"}, "client_name": {"lookup": False}}, zone)
    s = session(LISTED)
    await p.on_connect(s, 1, 1)
    with caplog.at_level("INFO", logger="smtpguard"):
        assert (await p.on_banner(s)).action is Action.CONTINUE  # at the end of the wait, not later
    assert "DNSBL rank 0 for [192.0.2.2]:40123 (zen.test=lookup failed, wl.test=lookup failed)" in caplog.text
    assert not s.delayed
    await p.store.write_behind.wait()
    assert (await p.store.get_cache(LISTED))["dnsbl"] > 0  # a pass, for min_ttl
    zone.gate.set()


def test_client_name_check_needs_the_lookup() -> None:
    with pytest.raises(ConfigError, match=r"^client_name\.lookup: must be true when the check is enabled"):
        from_dict({"client_name": {"enabled": True, "lookup": False}})


def test_dns_checks_need_a_resolver() -> None:
    with pytest.raises(ValueError, match="sender_domain"):
        Pipeline(from_dict({"sender_domain": {"enabled": True}}))
