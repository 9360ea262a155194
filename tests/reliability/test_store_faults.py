"""The state store under faults: a Redis frozen with SIGSTOP costs a
session at most the store deadline, and ``on_store_error`` decides."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tests.integration.guard import Guard, RawClient
from tests.lab import PrivatePostfix, RedisServer

MakeGuard = Callable[..., Guard]
GREYLIST = '[greylist]\nenabled = true\ndelay = "1s"\nuse_default_client_allowlist = false\n'


@contextmanager
def frozen(redis: RedisServer) -> Iterator[None]:
    """redis-server stopped (SIGSTOP): connections are accepted by the
    kernel, nothing is ever answered."""
    assert redis.proc is not None
    os.kill(redis.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(redis.proc.pid, signal.SIGCONT)


def timed_session(port: int, source: str, subject: str) -> tuple[float, list[str]]:
    """Connect, one transaction, QUIT; the wall time and the replies."""
    start = time.monotonic()
    c = RawClient(port, source=source, timeout=60)
    c.reply()
    replies = c.transaction(subject=subject)
    c.cmd("QUIT")
    c.close()
    return time.monotonic() - start, replies


def test_frozen_redis_costs_a_session_at_most_the_deadline(backend: PrivatePostfix, redis_server: RedisServer,
                                                           redis_url: str, make_guard: MakeGuard) -> None:
    g = make_guard(backend.port, GREYLIST + '[pregreet]\ngreet_wait = "0s"\n', state_url=redis_url)
    ok, replies = timed_session(g.port, "127.0.0.81", "warm")  # a working store: greylisted
    assert replies[2].startswith("450 4.2.0"), replies
    with frozen(redis_server):
        durations = []
        for i in range(4):
            took, replies = timed_session(g.port, f"127.0.1.{i + 1}", f"frozen {i}")
            durations.append(took)
            assert replies[-1].startswith("250 2.0.0 Ok: queued as"), replies  # on_store_error = accept
    # One deadline (1 s) for all of a session's store calls; after a few
    # failures the breaker skips the store: before, ~20 s each.
    print("session durations with Redis frozen:", [f"{d:.2f}" for d in durations])
    assert max(durations) < 3.0, durations
    assert sum(durations) < 5.0, durations
    backend.wait_for_messages(4)
