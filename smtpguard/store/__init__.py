"""The state store: greylist triplets, auto-allowlisted networks, the
allowlist cache and connection-rate counters behind one async API.

:func:`open_store` picks the backend from the URL (``[state] url``):

=====================================  ==========================================
``memory://``                          process memory (tests, throw-away runs)
``sqlite:///relative/path``            one node, one file (SQLAlchemy convention:
``sqlite:////absolute/path``           three slashes then the path)
``redis://host:port/db``               shared by several nodes
``unix:///path/redis.sock?db=N``       the same over a unix socket
``redis+sentinel://h:p,h:p/svc?db=N``  the same, on the primary Sentinel names
=====================================  ==========================================

The interface is :class:`~.base.Store` (see :mod:`.base` for how expiry and
the error model work); every failure is a :class:`StoreError`.  The clock is
injected so tests can run the store on a fake one.
"""

from __future__ import annotations

import asyncio
import logging
import time

from .base import AllowedNet, ClientNet, Clock, Store, StoreError, StoreStats, Triplet
from .failfast import Limits, start_deadline
from .memory import MemoryStore
from .redis import RedisStore
from .sqlite import SQLiteStore

__all__ = ["AllowedNet", "ClientNet", "Clock", "Limits", "MemoryStore", "Store", "StoreError", "StoreStats",
           "Triplet", "open_store", "start_deadline", "sweep_forever"]

#: default key prefix in Redis
REDIS_PREFIX = "smtpguard:"


async def open_store(url: str, clock: Clock = time.time, *, redis_prefix: str = REDIS_PREFIX,
                     limits: Limits | None = None) -> Store:
    """Open the store at *url*.

    A malformed URL is a ValueError (a configuration mistake); a store that
    cannot be opened is a StoreError.  SQLite is opened (and its schema
    created) here; Redis connects on first use, so a Redis that is down does
    not stop smtpguard from starting -- its operations raise StoreError.
    """
    store = await _open(url, clock, redis_prefix)
    if limits is not None:
        store.failfast.configure(limits)
    return store


async def _open(url: str, clock: Clock, redis_prefix: str) -> Store:
    if url == "memory://":
        return MemoryStore(clock)
    if url.startswith("sqlite:///"):
        path = url.removeprefix("sqlite:///")
        if not path.strip("/"):
            raise ValueError(f'no database path in "{url}"')
        return await SQLiteStore.open(path, clock)
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisStore.connect(url, clock, redis_prefix)
    if url.startswith("redis+sentinel://"):
        return RedisStore.connect_sentinel(url, clock, redis_prefix)
    raise ValueError(f'unknown state store URL "{url}": expected memory://, sqlite:///PATH, redis://HOST:PORT/DB or '
                     'redis+sentinel://HOST:PORT,HOST:PORT/SERVICE?db=N')


async def sweep_forever(store: Store, interval: float) -> None:
    """Drop expired records every *interval* seconds (SQLite and memory
    keep them until then; Redis expires its keys by itself).  A failed sweep
    is logged and tried again at the next interval."""
    log = logging.getLogger("smtpguard")
    while True:
        await asyncio.sleep(interval)
        try:
            removed = await store.purge_expired()
        except StoreError as exc:
            log.warning("state store: cleanup failed: %s", exc)
            continue
        log.info("state store: cleanup removed %d expired record(s)", removed)
