"""The allowlist cache's hot set (smtpguard.hotset): PASS OLD answered from
memory, on each store: expiry, the hot TTL, invalidation by ``smtpguard
cache delete`` (the real command, another process's view of the store), and
two nodes sharing one Redis.  Fake clocks; no sleeping."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from smtpguard.config import from_dict
from smtpguard.hotset import CHECK_INTERVAL, HOT_SIZE, HOT_TTL, HotSet
from smtpguard.pipeline import Pipeline
from smtpguard.session import Session
from smtpguard.store import Store, open_store
from tests.integration import test_store_contract as contract
from tests.integration.test_store_contract import T0, FakeClock

IP = "192.0.2.7"
DAY = 86400.0
store_url = contract.store_url  # the fixture: memory://, SQLite, Redis


class Node:
    """One smtpguard's pipeline on *store*, counting the store's cache reads."""

    def __init__(self, store: Store, clock: FakeClock) -> None:
        self.store, self.clock = store, clock
        self.pipeline = Pipeline(from_dict({"pipelining": {"enabled": True}}), store, clock)
        self.reads = 0
        get_cache = store.get_cache

        async def counted(ip: str) -> dict[str, float]:
            self.reads += 1
            return await get_cache(ip)

        store.get_cache = counted  # type: ignore[method-assign]

    async def pass_old(self, ip: str = IP) -> bool:
        s = Session(ip, 40123, "198.51.100.1", 25)
        await self.pipeline.on_connect(s, 1, 1)
        self.pipeline.on_disconnect(s)
        return not s.todo

    async def passes(self, ip: str = IP, ttl: float = DAY, first: float | None = None) -> None:
        """The client passed every test here (first to expire after *first*)."""
        now = self.clock()
        tests = {t: now + ttl for t in self.pipeline._cacheable}
        if first is not None:
            tests["pregreet"] = now + first
        await self.store.put_cache(ip, tests)


@pytest_asyncio.fixture
async def node(store_url: str) -> AsyncIterator[Node]:
    clock = FakeClock()
    store = await open_store(store_url, clock)
    yield Node(store, clock)
    await store.close()


async def test_pass_old_is_answered_from_memory_until_the_first_test_expires(node: Node) -> None:
    assert not await node.pass_old() and node.reads == 1  # a new client: the store, every time
    assert not await node.pass_old() and node.reads == 2
    await node.passes(first=5.0)  # pregreet expires in 5 s, the others in a day
    assert await node.pass_old() and node.reads == 3  # read once ...
    for _ in range(3):
        assert await node.pass_old()
    assert node.reads == 3  # ... then answered from memory
    node.clock.now += 5.0  # the store's own expiry: never answered longer
    assert not await node.pass_old() and node.reads == 4
    assert len(node.pipeline.hot) == 0


async def test_at_most_hot_ttl_without_asking_the_store(node: Node) -> None:
    await node.passes()
    assert await node.pass_old() and node.reads == 1
    node.clock.now += HOT_TTL - 0.5
    assert await node.pass_old() and node.reads == 1
    node.clock.now += 0.5
    assert await node.pass_old() and node.reads == 2  # read again: still PASS OLD


async def test_a_failure_here_is_written_through_and_forgotten(node: Node) -> None:
    await node.passes()
    assert await node.pass_old()
    await node.pipeline._put_cache(IP, "pipelining", 0.0)  # what a failed test records
    assert not await node.pass_old()
    assert node.reads == 2 and (await node.store.get_cache(IP)).get("pipelining") is None


async def test_invalidated_by_smtpguard_cache_delete(store_url: str, tmp_path: Path) -> None:
    if store_url == "memory://":
        pytest.skip("no other process sees a memory:// store")
    clock = FakeClock()
    store = await open_store(store_url, clock)
    try:
        node = Node(store, clock)
        await node.passes()
        await node.passes("192.0.2.8")
        assert await node.pass_old() and await node.pass_old("192.0.2.8") and node.reads == 2
        config = tmp_path / "smtpguard.toml"
        config.write_text(f'[state]\nurl = "{store_url}"\n')
        done = subprocess.run([sys.executable, "-m", "smtpguard", "cache", "delete", IP, "-c", str(config)],
                              capture_output=True, text=True, timeout=60)  # the operator's command, another process
        assert done.returncode == 0, done.stderr
        clock.now += CHECK_INTERVAL  # the tag is read at most once a second
        assert not await node.pass_old()  # gone from the store, gone from memory
        assert await node.pass_old("192.0.2.8") and node.reads == 4  # the rest re-read once
        assert await node.pass_old("192.0.2.8") and node.reads == 4
    finally:
        await store.close()


@pytest.mark.redis
async def test_two_nodes_sharing_redis(redis_url: str) -> None:
    clock = FakeClock()
    a_store, b_store = await open_store(redis_url, clock), await open_store(redis_url, clock)
    try:
        a, b = Node(a_store, clock), Node(b_store, clock)
        assert not await b.pass_old()
        await a.passes()  # PASS NEW at node A ...
        assert await b.pass_old()  # ... is PASS OLD at node B's next connection: only PASS OLD is kept
        assert await a.pass_old()
        # A records a failure: B, holding the client in memory, learns it within HOT_TTL.
        await a.pipeline._put_cache(IP, "pipelining", 0.0)
        assert not await a.pass_old()
        assert await b.pass_old()
        clock.now += HOT_TTL
        assert not await b.pass_old()
        # A delete at either node (or the command line) reaches every node within CHECK_INTERVAL.
        await a.passes()
        assert await a.pass_old() and await b.pass_old()
        await a_store.delete_cache(IP)
        clock.now += CHECK_INTERVAL
        assert not await b.pass_old() and not await a.pass_old()
    finally:
        await a_store.close()
        await b_store.close()


def test_bounded_oldest_first() -> None:
    hot = HotSet(size=3)
    for i in range(4):
        hot.remember(f"192.0.2.{i}", T0 + DAY, T0)
    assert len(hot) == 3 and not hot.passed("192.0.2.0", T0) and hot.passed("192.0.2.3", T0)
    assert HOT_SIZE >= 1000
