"""The store's fail-fast parts on a fake clock: the breaker, the session
deadline, the background cache writer (smtpguard.store.failfast)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from smtpguard.metrics import METRICS
from smtpguard.store import Limits, MemoryStore, StoreError, start_deadline
from smtpguard.store.failfast import Breaker, State


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_consecutive_failures_probes_and_recovers(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="smtpguard")
    clock = Clock()
    b = Breaker(3, 10.0, clock)
    for _ in range(2):
        assert b.admit()
        b.failure("redis: timeout")
    b.success()  # a success in between: counting starts again
    for _ in range(3):
        assert b.admit()
        b.failure("redis: timeout")
    assert b.state is State.OPEN and not b.admit()
    assert "3 consecutive failures, skipped for 10s (on_store_error applies): redis: timeout" in caplog.text
    assert b.problem() == "skipped after 3 consecutive failures (next try in 10s): redis: timeout"
    clock.now += 10
    assert b.admit() and b.state is State.PROBING  # one probe goes through ...
    assert not b.admit()  # ... the others still skip the store
    b.failure("redis: timeout")  # the probe failed: another back-off
    assert not b.admit()
    clock.now += 9.9
    assert not b.admit()
    clock.now += 0.1
    assert b.admit()
    b.abandon()  # the probing session went away: the next call probes
    assert b.admit()
    b.success()
    assert b.up and b.admit() and b.problem() is None
    assert "answering again after 20.0s" in caplog.text


def test_breaker_off_with_zero_failures() -> None:
    b = Breaker(0, 10.0, Clock())
    for _ in range(100):
        b.failure("x")
    assert b.admit() and b.up


class SlowStore(MemoryStore):
    """A memory store whose reads hang (as a frozen Redis) when told to."""

    backend_errors = (ConnectionError,)

    def __init__(self) -> None:
        super().__init__(Clock())
        self.hang = asyncio.Event()  # set: calls hang
        self.calls = 0

    async def _get_tests(self, ip: str, now: float) -> dict[str, float]:
        self.calls += 1
        if self.hang.is_set():
            await asyncio.Event().wait()
        return await super()._get_tests(ip, now)

    async def _put_tests(self, ip: str, tests: dict[str, float], now: float) -> None:
        if self.hang.is_set():
            raise ConnectionError("refused")
        await super()._put_tests(ip, tests, now)


async def test_one_deadline_for_all_of_a_sessions_store_calls() -> None:
    store = SlowStore()
    store.failfast.configure(Limits(deadline=0.05, breaker_failures=0))
    store.failfast.clock = asyncio.get_running_loop().time
    budget = start_deadline(0.05)
    await store.get_cache("192.0.2.1")  # fast: spends next to nothing
    assert 0.04 < budget.left <= 0.05
    store.hang.set()
    with pytest.raises(StoreError, match="no answer within the store deadline"):
        await store.get_cache("192.0.2.1")
    assert budget.left <= 0
    calls = store.calls
    with pytest.raises(StoreError, match=r"the session's store deadline \(0.05s\) is spent"):
        await store.get_cache("192.0.2.1")
    assert store.calls == calls  # not even tried
    assert store.problem() == "reads failing: memory: no answer within the store deadline"
    start_deadline(0.05)  # the next session has its own
    store.hang.clear()
    await store.get_cache("192.0.2.1")
    assert store.problem() is None


async def test_breaker_skips_a_hanging_store_then_a_probe_recovers_it() -> None:
    store = SlowStore()
    clock = Clock()
    store.failfast = type(store.failfast)("memory", Limits(deadline=0.01, breaker_failures=2, breaker_backoff=5),
                                          clock)
    store.hang.set()
    for _ in range(2):
        start_deadline(0.01)
        with pytest.raises(StoreError):
            await store.get_cache("192.0.2.1")
    calls = store.calls
    start_deadline(0.01)
    with pytest.raises(StoreError, match="skipped after 2 consecutive failures"):
        await store.get_cache("192.0.2.1")
    assert store.calls == calls and METRICS.store_up._value.get() == 0
    store.hang.clear()
    clock.now += 5
    await store.get_cache("192.0.2.1")  # the probe
    assert store.problem() is None and METRICS.store_up._value.get() == 1


async def test_cache_writes_are_queued_merged_and_dropped_when_full() -> None:
    store = MemoryStore(Clock())
    store.failfast.configure(Limits(write_queue=2))
    dropped = METRICS.store_writes_dropped._value.get()
    assert store.put_cache_later("192.0.2.1", {"pregreet": 2000.0})
    assert store.put_cache_later("192.0.2.1", {"pipelining": 3000.0})  # merged with the first
    assert store.put_cache_later("192.0.2.2", {"pregreet": 2000.0})
    assert not store.put_cache_later("192.0.2.3", {"pregreet": 2000.0})  # two IPs wait already
    assert METRICS.store_writes_dropped._value.get() == dropped + 1
    assert await store.get_cache("192.0.2.1") == {}  # nothing written yet: no caller waited
    await store.write_behind.wait()
    assert await store.get_cache("192.0.2.1") == {"pregreet": 2000.0, "pipelining": 3000.0}
    assert await store.get_cache("192.0.2.3") == {}


async def test_failing_background_writes_are_logged_and_the_store_closes(caplog: pytest.LogCaptureFixture) -> None:
    store = SlowStore()
    store.hang.set()
    store.put_cache_later("192.0.2.1", {"pregreet": 2000.0})
    await store.close()  # flushes what is queued first
    assert "allowlist cache update for 192.0.2.1 failed: memory: refused" in caplog.text
    assert store.problem() == "writes failing: memory: refused"


async def test_a_successful_ping_clears_failed_reads() -> None:
    """No traffic reaches a node that is not ready: its readiness probe must
    be able to see the store answering again."""
    store = SlowStore()
    store.failfast.configure(Limits(deadline=0.01, breaker_failures=0))
    store.hang.set()
    start_deadline(0.01)
    with pytest.raises(StoreError):
        await store.get_cache("192.0.2.1")
    assert store.problem() is not None
    store.hang.clear()
    start_deadline(0.01)  # the probe's own
    await store.ping()
    assert store.problem() is None
