"""``smtpguard greylist allow|delete|clients`` on a memory store and a fake
clock, checked against the greylist decision itself (issue 14: a /8 covered
only a /24, a /25 a whole /24, ``delete ADDRESS`` found nothing, a manual
allow expired after max_age)."""

from __future__ import annotations

import dataclasses
import io
import json

import pytest

from smtpguard.admin import Admin
from smtpguard.checks.greylist import GreylistConfig, check_greylist
from smtpguard.config import Config
from smtpguard.net import parse_ip
from smtpguard.store import ClientNet, MemoryStore
from smtpguard.verdict import Outcome

T0 = 1_700_000_000.0
DAY = 86400.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def setup(auto: int = 5) -> tuple[Admin, MemoryStore, Clock, io.StringIO]:
    clock = Clock()
    store = MemoryStore(clock)
    cfg = dataclasses.replace(Config(), greylist=GreylistConfig(enabled=True, use_default_client_allowlist=False,
                                                                auto_allowlist_clients=auto))
    out = io.StringIO()
    return Admin(store, cfg, out, False, clock), store, clock, out


async def greylisted(admin: Admin, ip: str) -> bool:
    result, _ = await check_greylist(admin.store, admin.cfg.greylist, parse_ip(ip), "unknown", "a@sender.test",
                                     "b@example.test", admin.clock())
    return result.outcome is Outcome.FAIL


@pytest.mark.parametrize(("what", "stored", "inside", "outside"), [
    ("10.0.0.0/8", "10.0.0.0/8", ["10.5.6.7", "10.255.0.1"], ["11.0.0.1"]),
    ("192.0.2.128/25", "192.0.2.128/25", ["192.0.2.200"], ["192.0.2.100"]),
    ("100.64.9.7", "100.64.9.7/32", ["100.64.9.7"], ["100.64.9.8"]),
    ("10.1.2.3/16", "10.1.0.0/16", ["10.1.200.1"], ["10.2.0.1"]),  # host bits cleared, prefix kept
    ("2001:db8::/32", "2001:db8::/32", ["2001:db8:ffff::1"], ["2001:db9::1"]),
    ("::ffff:198.51.100.0/120", "198.51.100.0/24", ["198.51.100.9"], ["198.51.101.9"]),
])
async def test_allow_stores_exactly_the_network_given(what: str, stored: str, inside: list[str],
                                                      outside: list[str]) -> None:
    admin, store, _, out = setup()
    assert await admin.greylist_allow(what) == 0
    assert out.getvalue().split() == ["ALLOWED", "UNTIL", stored, "never"]
    assert [k for k, _ in await store.list_allowed()] == [stored]
    for ip in inside:
        assert not await greylisted(admin, ip), ip
    for ip in outside:
        assert await greylisted(admin, ip), ip


async def test_allow_does_not_expire_unless_ttl_and_works_without_the_auto_allowlist() -> None:
    admin, _, clock, out = setup(auto=0)
    await admin.greylist_allow("10.0.0.0/8")
    await admin.greylist_allow("172.16.0.0/12", ttl=3600)
    assert "172.16.0.0/12" in out.getvalue() and "never" in out.getvalue()
    assert not await greylisted(admin, "10.9.9.9") and not await greylisted(admin, "172.20.0.1")
    clock.now += 3601
    assert await greylisted(admin, "172.20.0.1")  # its TTL is over
    clock.now += 400 * DAY  # far past max_age (35d)
    assert not await greylisted(admin, "10.9.9.9")


async def test_delete_an_address_finds_the_network_holding_it() -> None:
    admin, store, _, out = setup()
    await admin.greylist_allow("100.64.9.7")
    await admin.greylist_allow("10.0.0.0/8")
    await admin.greylist_allow("10.5.0.0/16")
    assert await admin.greylist_delete("100.64.9.7") == 0
    assert await admin.greylist_delete("10.5.6.7") == 0  # the most specific first
    assert await admin.greylist_delete("10.5.6.7") == 0
    assert await admin.greylist_delete("10.5.6.7") == 1
    assert out.getvalue().splitlines()[-4:] == ["deleted: 100.64.9.7/32", "deleted: 10.5.0.0/16",
                                                "deleted: 10.0.0.0/8", "not found: 10.5.6.7"]
    assert await store.list_allowed() == []
    assert await greylisted(admin, "100.64.9.7")


async def test_delete_a_network_a_triplet_or_an_auto_allowlist_entry() -> None:
    admin, store, clock, out = setup()
    await admin.greylist_allow("192.0.2.128/25")
    assert await admin.greylist_delete("192.0.2.128/25") == 0
    await store.put_client("198.51.100.0", ClientNet(5, clock.now, clock.now + DAY))
    assert await admin.greylist_delete("198.51.100.77") == 0  # the auto-allowlist network holding it
    await greylisted(admin, "203.0.113.5")
    assert await admin.greylist_delete("203.0.113.0/a@sender.test/b@example.test") == 0
    assert out.getvalue().splitlines() == [
        "ALLOWED         UNTIL", "192.0.2.128/25  never", "deleted: 192.0.2.128/25", "deleted: 198.51.100.0",
        "deleted: 203.0.113.0/a@sender.test/b@example.test"]


async def test_clients_lists_operator_networks_and_json() -> None:
    admin, store, clock, out = setup()
    admin.as_json = True
    await admin.greylist_allow("10.0.0.0/8")
    await admin.greylist_allow("192.0.2.7", ttl=60)
    await store.put_client("198.51.100.0", ClientNet(5, clock.now, clock.now + DAY))
    out.seek(0)
    out.truncate()
    assert await admin.greylist_clients(100) == 0
    doc = json.loads(out.getvalue())
    assert [(d["network"], d["manual"], d["expires"]) for d in doc] == [
        ("10.0.0.0/8", True, None), ("192.0.2.7/32", True, T0 + 60), ("198.51.100.0", False, T0 + DAY)]


async def test_allow_refuses_what_is_not_an_address() -> None:
    admin, store, _, out = setup()
    assert await admin.greylist_allow("mail.example.org") == 2
    assert "expected an IP address or network" in out.getvalue() and await store.list_allowed() == []
