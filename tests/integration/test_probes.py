"""Readiness probes against real components: Redis (up, then stopped),
SQLite files and directories, a Postfix-less port, a non-SMTP greeting."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest

from smtpguard.config import Config, HostPort, StateConfig, UpstreamConfig
from smtpguard.health import ProbeError, Readiness, probe_upstream
from smtpguard.store import MemoryStore, StoreError, open_store
from tests.lab import RedisServer, free_port


async def test_redis_store_ping(redis_server: RedisServer, redis_url: str) -> None:
    for url in (redis_url, redis_server.unix_url):
        store = await open_store(url)
        await store.ping()
        await store.close()
    store = await open_store(redis_url)
    redis_server.stop()
    try:
        with pytest.raises(StoreError):
            await store.ping()
    finally:
        redis_server.start()
        await store.close()


async def test_sqlite_store_ping(tmp_path: Path) -> None:
    store = await open_store(f"sqlite:///{tmp_path}/state.db")
    await store.ping()
    await store.close()
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError):
        await open_store(f"sqlite:///{corrupt}")


async def test_upstream_probe_refused_and_wrong_greeting() -> None:
    with pytest.raises(ProbeError, match="Connection refused"):
        await probe_upstream(HostPort("127.0.0.1", free_port()), timeout=2)

    async def not_smtp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.0 400 Bad Request\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(not_smtp, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(ProbeError, match="greeted with"):
            await probe_upstream(HostPort("127.0.0.1", port), timeout=2)

        async def smtp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"220-first line\r\n220 mx ESMTP\r\n")
            await reader.readline()
            writer.write(b"221 bye\r\n")
            await writer.drain()
            writer.close()

        ok_server = await asyncio.start_server(smtp, "127.0.0.1", 0)
        ok_port = ok_server.sockets[0].getsockname()[1]
        await probe_upstream(HostPort("127.0.0.1", ok_port), timeout=2)
        cfg = Config(upstream=UpstreamConfig(address=HostPort("127.0.0.1", ok_port)), state=StateConfig("memory://"))
        accepting = [True]
        store = MemoryStore(time.time)
        r = Readiness(lambda: cfg, lambda: store, accepting=lambda: accepting[0])
        assert await r.check() == (True, ["upstream ok", "store ok"])
        accepting[0] = False
        r._cached = None
        ready, lines = await r.check()
        assert not ready and lines[0].startswith("listener failed")
        ok_server.close()
    finally:
        server.close()


def grey(on_store_error: str) -> Config:
    """Greylisting on, the upstream probe left out (these tests are about the store)."""
    from smtpguard.config import from_dict
    return from_dict({"greylist": {"enabled": True, "on_store_error": on_store_error}})


async def store_readiness(cfg: Config, store: object) -> tuple[bool, list[str]]:
    r = Readiness(lambda: cfg, lambda: store)  # type: ignore[arg-type,return-value]
    del r.probes["upstream"]
    return await r.check()


async def test_readiness_follows_on_store_error(redis_server: RedisServer, redis_url: str) -> None:
    """Redis down: still ready with on_store_error = accept (mail flows, the
    body and smtpguard_store_up say the store is down); not ready with tempfail."""
    from smtpguard.metrics import METRICS

    store = await open_store(redis_url)
    try:
        assert await store_readiness(grey("accept"), store) == (True, ["store ok"])
        redis_server.stop()
        ready, lines = await store_readiness(grey("accept"), store)
        assert ready, lines
        assert lines[0].startswith("store failed: redis: ") and lines[0].endswith(
            "(mail is answered without it: greylist.on_store_error = accept)"), lines
        assert METRICS.store_up._value.get() == 0
        ready, lines = await store_readiness(grey("tempfail"), store)
        assert not ready and "greylist.on_store_error = tempfail" in lines[0], lines
        ready, lines = await store_readiness(Config(), store)  # no greylisting: the store only speeds things up
        assert ready, lines
    finally:
        redis_server.start()
        await store.close()
    store = await open_store(redis_url)
    assert await store_readiness(grey("tempfail"), store) == (True, ["store ok"])
    assert METRICS.store_up._value.get() == 1
    await store.close()


async def test_corrupt_sqlite_file_is_reported(tmp_path: Path) -> None:
    """The database file overwritten under a running smtpguard: every read
    and write fails; readiness says so (and keeps saying it: a corrupt file
    does not heal)."""
    path = tmp_path / "state.db"
    store = await open_store(f"sqlite:///{path}")
    try:
        from smtpguard.store import Triplet
        await store.put_triplets((f"192.0.2.0/a{i}@x/b@y", Triplet(1.0, 1.0, None, 9e9)) for i in range(2000))
        assert await store_readiness(grey("tempfail"), store) == (True, ["store ok"])
        with sqlite3.connect(path) as db:  # the records into the file, out of the WAL
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        size = path.stat().st_size
        with path.open("r+b") as f:  # every page but the header's
            f.seek(4096)
            f.write(b"\xa5" * (size - 4096))
        with pytest.raises(StoreError, match="malformed"):
            for i in range(2000):
                await store.put_triplet(f"192.0.2.0/n{i}@x/b@y", Triplet(1.0, 1.0, None, 9e9))
                await store.get_triplet(f"192.0.2.0/a{i}@x/b@y")
        ready, lines = await store_readiness(grey("tempfail"), store)
        assert not ready and lines[0].startswith("store failed: broken: sqlite: database disk image is malformed")
        ready, lines = await store_readiness(grey("accept"), store)
        assert ready and "broken" in lines[0]
    finally:
        await store.close()
