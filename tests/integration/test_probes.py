"""Readiness probes against real components: Redis (up, then stopped),
SQLite files and directories, a Postfix-less port, a non-SMTP greeting."""

from __future__ import annotations

import asyncio
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
