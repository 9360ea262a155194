"""``memory://``: the state store in process memory (tests, throw-away runs).

How it works: one dict per record kind (key -> row tuple, ``expires`` last),
a dict of dicts for the allowlist cache (IP -> test -> expiry) and a
:class:`RateWindows` for the rate counters.  Nothing survives the process.
Reads compare ``expires`` with the injected clock; :meth:`purge_expired`
walks the dicts and yields to the event loop every :data:`SWEEP_BATCH`
entries so a large purge never stalls the sessions.

:class:`RateWindows` is also the SQLite backend's rate counter: rates are
per node and short-lived, as in Postfix's anvil(8), which keeps them in
memory too.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from .base import CLIENTS, GREYLIST, KINDS, Clock, Kind, Row, Store, StoreStats

#: entries examined between two yields to the event loop while purging
SWEEP_BATCH = 1000


class RateWindows:
    """anvil-style fixed windows: key -> (window start, window length, hits)."""

    def __init__(self) -> None:
        self._windows: dict[str, tuple[float, float, int]] = {}

    def hit(self, key: str, window: float, now: float) -> int:
        start, _, hits = self._windows.get(key, (now, window, 0))
        if now - start >= window:
            start, hits = now, 0
        self._windows[key] = (start, window, hits + 1)
        return hits + 1

    def prune(self, now: float) -> None:
        """Forget the windows that have ended."""
        self._windows = {k: w for k, w in self._windows.items() if now - w[0] < w[1]}


class MemoryStore(Store):
    backend = "memory"

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        self._rows: dict[str, dict[str, Row]] = {kind.name: {} for kind in KINDS}
        self._cache: dict[str, dict[str, float]] = {}
        self._rates = RateWindows()

    async def _get_rows(self, requests: list[tuple[Kind[Any], str]], now: float) -> list[Row | None]:
        rows = [self._rows[kind.name].get(key) for kind, key in requests]
        return [row if row is not None and row[-1] > now else None for row in rows]

    async def _put_rows(self, kind: Kind[Any], rows: list[tuple[str, Row]], now: float) -> None:
        self._rows[kind.name].update(rows)

    async def _delete(self, kind: str, key: str) -> bool:
        table = self._cache if kind == "cache" else self._rows[kind]
        return table.pop(key, None) is not None

    async def _scan_rows(self, kind: Kind[Any], limit: int, prefix: str, now: float) -> list[tuple[str, Row]]:
        table = self._rows[kind.name]
        live = ((key, table[key]) for key in sorted(k for k in table if k.startswith(prefix)))
        return list(itertools.islice(((key, row) for key, row in live if row[-1] > now), limit))

    def _live_tests(self, ip: str, now: float) -> dict[str, float]:
        return {test: exp for test, exp in self._cache.get(ip, {}).items() if exp > now}

    async def _get_tests(self, ip: str, now: float) -> dict[str, float]:
        return self._live_tests(ip, now)

    async def _put_tests(self, ip: str, tests: dict[str, float], now: float) -> None:
        self._cache.setdefault(ip, {}).update(tests)

    async def _scan_tests(self, limit: int, prefix: str, now: float) -> list[tuple[str, dict[str, float]]]:
        ips = sorted(ip for ip in self._cache if ip.startswith(prefix))
        live = ((ip, self._live_tests(ip, now)) for ip in ips)
        return list(itertools.islice(((ip, tests) for ip, tests in live if tests), limit))

    async def _hit_rate(self, key: str, window: float, now: float) -> int:
        return self._rates.hit(key, window, now)

    async def _ping(self) -> None:
        return None

    async def _purge(self, now: float) -> int:
        removed = 0
        for table in self._rows.values():
            for i, (key, row) in enumerate(list(table.items()), 1):
                if row[-1] <= now:
                    del table[key]
                    removed += 1
                if i % SWEEP_BATCH == 0:
                    await asyncio.sleep(0)
        for i, (ip, tests) in enumerate(list(self._cache.items()), 1):
            live = {test: exp for test, exp in tests.items() if exp > now}
            removed += len(tests) - len(live)
            if live:
                self._cache[ip] = live
            else:
                del self._cache[ip]
            if i % SWEEP_BATCH == 0:
                await asyncio.sleep(0)
        self._rates.prune(now)
        return removed

    async def _stats(self) -> StoreStats:
        return StoreStats(
            greylist=len(self._rows[GREYLIST.name]), clients=len(self._rows[CLIENTS.name]), cache=len(self._cache)
        )

    async def _close(self) -> None:
        return None
