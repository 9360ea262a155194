"""SPF-aware greylisting ([greylist] spf_key): pyspf over smtpguard's own
resolver, on a fake zone and a fake clock (no sockets, no sleeping)."""

from __future__ import annotations

from typing import Any

import pytest
import spf as pyspf

from smtpguard.config import from_dict
from smtpguard.dns import DnsConfig, DnsResolver
from smtpguard.net import parse_ip
from smtpguard.pipeline import Pipeline
from smtpguard.session import Session
from smtpguard.spf import evaluate
from smtpguard.store import MemoryStore
from smtpguard.verdict import Action
from tests.unit.test_dns_checks import FakeZone
from tests.unit.test_pipeline import FakeClock

ZONE: dict[tuple[str, str], list[str]] = {
    # A pool in two /24s, behind an include and an a: mechanism.
    ("pool.test", "TXT"): ["v=spf1 include:_spf.pool.test -all", "google-site-verification=x"],
    ("_spf.pool.test", "TXT"): ["v=spf1 ip4:192.0.2.0/24 a:out.pool.test -all"],
    ("out.pool.test", "A"): ["198.51.100.9"],
    ("soft.test", "TXT"): ["v=spf1 ip4:203.0.113.0/24 ~all"],
    ("mx.test", "TXT"): ["v=spf1 mx -all"],
    ("mx.test", "MX"): ["10 mail.mx.test"],
    ("mail.mx.test", "A"): ["192.0.2.25"],
    # 11 DNS-querying terms: RFC 7208 4.6.4 makes that a permerror.
    ("many.test", "TXT"): ["v=spf1 " + " ".join(f"a:h{i}.many.test" for i in range(11)) + " ip4:192.0.2.0/24 -all"],
    **{(f"h{i}.many.test", "A"): ["203.0.113.1"] for i in range(11)},
    # Three void lookups (names that do not exist): over the limit of 2.
    ("void.test", "TXT"): ["v=spf1 a:v1.void.test a:v2.void.test a:v3.void.test ip4:192.0.2.0/24 -all"],
    ("broken.test", "TXT"): ["v=spf1 include:down.test -all"],
    ("helo.pool.test", "TXT"): ["v=spf1 ip4:192.0.2.0/24 -all"],
    ("open.test", "TXT"): ["v=spf1 +all"],
}


def resolver(zone: FakeZone | None = None) -> tuple[DnsResolver, FakeZone]:
    zone = zone or FakeZone(ZONE, broken=["down.test"])
    return DnsResolver(DnsConfig(), backend=zone, clock=FakeClock()), zone


@pytest.mark.parametrize(("ip", "sender", "result"), [
    ("192.0.2.7", "a@pool.test", "pass"),  # ip4: in the include
    ("198.51.100.9", "a@pool.test", "pass"),  # a: in the include
    ("203.0.113.5", "a@pool.test", "fail"),  # -all
    ("192.0.2.7", "a@soft.test", "softfail"),  # ~all
    ("192.0.2.25", "a@mx.test", "pass"),
    ("192.0.2.26", "a@mx.test", "fail"),
    ("192.0.2.7", "a@none.test", "none"),  # no record
    ("192.0.2.7", "a@many.test", "permerror"),  # the 10-lookup limit
    ("192.0.2.7", "a@void.test", "permerror"),  # the void-lookup limit
    ("192.0.2.7", "a@broken.test", "temperror"),  # DNS failure: no pass, never an error
    ("192.0.2.7", "", "pass"),  # the null sender: the HELO identity
    ("192.0.2.7", "a@open.test", "pass"),
])
async def test_evaluate(ip: str, sender: str, result: str) -> None:
    r, _ = resolver()
    found = await evaluate(r, ip, sender, "helo.pool.test")
    assert found.result == result, found
    assert found.domain == (sender.rpartition("@")[2] if sender else "helo.pool.test")
    # A pass by the record's own "+all" (every address passes) is no reason to key by domain.
    assert found.passed is (result == "pass" and sender != "a@open.test")


async def test_answers_come_from_the_resolver_cache() -> None:
    """Every question goes through smtpguard's resolver (never pyspf's own
    DNS); a domain evaluated before is answered from the cache."""
    r, zone = resolver()
    assert (await evaluate(r, "198.51.100.9", "a@pool.test", "h")).passed
    asked = list(zone.calls)
    assert asked == [("pool.test", "TXT"), ("_spf.pool.test", "TXT"), ("out.pool.test", "A")]
    assert (await evaluate(r, "198.51.100.9", "b@pool.test", "h")).passed
    assert zone.calls == asked  # all cached


def test_pyspf_outside_an_evaluation_keeps_its_own_lookup() -> None:
    assert pyspf.DNSLookup.__module__ == "smtpguard.spf"
    source = pyspf.DNSLookup.__globals__["_SOURCE"]
    assert source.get() is None  # so _dns_lookup hands pyspf's own driver the question


# ------------------------------------------------------------------ in the pipeline

def make(extra: dict[str, Any] | None = None) -> tuple[Pipeline, FakeClock, MemoryStore, FakeZone]:
    clock = FakeClock()
    store = MemoryStore(clock)
    zone = FakeZone(ZONE, broken=["down.test"])
    grey = {"enabled": True, "use_default_client_allowlist": False, "spf_key": True, **(extra or {})}
    p = Pipeline(from_dict({"greylist": grey}), store, clock, DnsResolver(DnsConfig(), backend=zone, clock=clock))
    return p, clock, store, zone


async def attempt(p: Pipeline, ip: str, sender: str, rcpt: str = "bob@example.test") -> Action:
    s = Session(parse_ip(ip), 40000, "198.51.100.1", 25)
    await p.on_connect(s, 1, 1)
    s.helo, s.sender = "out.example", sender
    assert (await p.on_rcpt(s, rcpt)).action is Action.CONTINUE
    return (await p.on_greylist(s, rcpt)).action


async def test_a_pool_retrying_from_another_network_passes_after_one_delay() -> None:
    p, clock, store, _ = make()
    assert await attempt(p, "192.0.2.7", "news@pool.test") is Action.DEFER
    assert [k for k, _ in await store.list_triplets()] == ["pool.test/news@pool.test/bob@example.test"]
    clock.now += 301
    # The retry comes from another /24 of the pool, which SPF also authorizes.
    assert await attempt(p, "198.51.100.9", "news@pool.test") is Action.CONTINUE


async def test_no_spf_pass_is_greylisted_by_client_network() -> None:
    p, clock, store, _ = make()
    for sender in ("a@soft.test", "a@pool.test", "a@broken.test"):  # softfail, fail, temperror
        assert await attempt(p, "198.51.100.50", sender) is Action.DEFER
    clock.now += 301
    assert await attempt(p, "198.51.100.77", "a@soft.test") is Action.CONTINUE  # same /24
    assert await attempt(p, "192.0.2.77", "a@soft.test") is Action.DEFER  # another /24: a new triplet
    keys = {k for k, _ in await store.list_triplets()}
    assert keys == {"198.51.100.0/a@soft.test/bob@example.test", "198.51.100.0/a@pool.test/bob@example.test",
                    "198.51.100.0/a@broken.test/bob@example.test", "192.0.2.0/a@soft.test/bob@example.test"}


async def test_spf_key_off_by_default_and_not_asked_for_allowlisted_recipients() -> None:
    p, _, store, zone = make({"spf_key": False})
    assert await attempt(p, "192.0.2.7", "news@pool.test") is Action.DEFER
    assert zone.calls == [] and [k for k, _ in await store.list_triplets()] == [
        "192.0.2.0/news@pool.test/bob@example.test"]
    p, _, _, zone = make()
    assert await attempt(p, "192.0.2.7", "news@pool.test", rcpt="postmaster@example.test") is Action.CONTINUE
    assert zone.calls == []
