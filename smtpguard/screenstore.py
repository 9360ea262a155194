"""The state the screening checks keep between connections: a stop-gap.

MERGE POINT.  The real state store (``smtpguard/store/``: memory, SQLite,
Redis backends) is being written on ``main``; this branch does not have it.
The screening code depends only on the small async :class:`ScreenStore`
protocol below, and :class:`MemoryScreenStore` implements it in process so
that everything works and is tested now.  At merge, give
``smtpguard.store.Store`` these three methods (or wrap it in an adapter) and
pass it to :class:`~smtpguard.pipeline.Pipeline` instead of
:class:`MemoryScreenStore`; nothing else changes.  With the memory store the
allowlist cache and the rate counters do not survive a restart and are not
shared between nodes; with the SQLite/Redis store they do.

* ``get_cache(ip)`` -- postscreen's temporary allowlist record for one
  client address: ``{test name: expiry time (wall clock, seconds)}``; a test
  whose expiry is in the past (or 0: failed) is not valid.
* ``put_cache(ip, test, expiry)`` -- set one test's expiry.
* ``hit_rate(key, window)`` -- count one event for *key* and return how many
  events *key* had in the last *window* seconds, this one included (anvil's
  connection rate; on Redis, shared by all nodes).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from typing import Protocol

Clock = Callable[[], float]


class ScreenStore(Protocol):
    async def get_cache(self, ip: str) -> dict[str, float]: ...

    async def put_cache(self, ip: str, test: str, expiry: float) -> None: ...

    async def hit_rate(self, key: str, window: float) -> int: ...


class MemoryScreenStore:
    """In-process :class:`ScreenStore` (per-process, lost at restart).

    Records whose every expiry has passed are dropped when looked at, and
    :meth:`purge` drops the rest of the dead ones; rate windows keep one
    timestamp per event inside the window.
    """

    def __init__(self, clock: Clock = time.time, max_clients: int = 100_000) -> None:
        self.clock = clock
        self.max_clients = max_clients
        self._cache: dict[str, dict[str, float]] = {}
        self._hits: dict[str, collections.deque[float]] = {}
        self._calls = 0

    async def get_cache(self, ip: str) -> dict[str, float]:
        entry = self._cache.get(ip)
        if entry is None:
            return {}
        if max(entry.values(), default=0.0) <= self.clock():
            del self._cache[ip]
            return {}
        return dict(entry)

    async def put_cache(self, ip: str, test: str, expiry: float) -> None:
        if ip not in self._cache and len(self._cache) >= self.max_clients:
            self.purge()
        self._cache.setdefault(ip, {})[test] = expiry

    async def hit_rate(self, key: str, window: float) -> int:
        now = self.clock()
        self._calls += 1
        if self._calls % 10_000 == 0:  # forget keys with no event left in the window
            for stale in [k for k, h in self._hits.items() if h and h[-1] <= now - window]:
                del self._hits[stale]
        hits = self._hits.get(key)
        if hits is None:
            hits = self._hits[key] = collections.deque()
        while hits and hits[0] <= now - window:
            hits.popleft()
        hits.append(now)
        return len(hits)

    def purge(self) -> None:
        now = self.clock()
        for ip in [ip for ip, e in self._cache.items() if max(e.values(), default=0.0) <= now]:
            del self._cache[ip]
