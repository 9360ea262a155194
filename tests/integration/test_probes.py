"""Readiness probes against real components: Redis (up, then stopped),
SQLite files and directories, a Postfix-less port, a non-SMTP greeting."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from smtpguard.config import Config, HostPort, StateConfig, UpstreamConfig
from smtpguard.health import ProbeError, Readiness, probe_store, probe_upstream
from tests.lab import RedisServer, free_port


async def test_redis_store_probe(redis_server: RedisServer, redis_url: str) -> None:
    await probe_store(redis_url)
    await probe_store(redis_server.unix_url)
    redis_server.stop()
    try:
        with pytest.raises(ProbeError, match="redis: "):
            await probe_store(redis_url, timeout=2)
    finally:
        redis_server.start()


async def test_sqlite_store_probe(tmp_path: Path) -> None:
    await probe_store(f"sqlite:///{tmp_path}/new.db")  # does not exist yet: the directory is writable
    with pytest.raises(ProbeError, match="does not exist"):
        await probe_store(f"sqlite:///{tmp_path}/missing/dir/state.db")
    bad = tmp_path / "corrupt.db"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(ProbeError, match="sqlite .*corrupt.db: file is not a database"):
        await probe_store(f"sqlite:///{bad}")
    import sqlite3

    good = tmp_path / "good.db"
    sqlite3.connect(good).execute("CREATE TABLE t (x)").connection.commit()
    await probe_store(f"sqlite:///{good}")
    await probe_store("memory://")
    if os.geteuid() != 0:  # root may write anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(ProbeError, match="not writable"):
            await probe_store(f"sqlite:///{ro}/state.db")


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
        r = Readiness(lambda: cfg, accepting=lambda: accepting[0])
        assert await r.check() == (True, ["upstream ok", "store ok"])
        accepting[0] = False
        r._cached = None
        ready, lines = await r.check()
        assert not ready and lines[0].startswith("listener failed")
        ok_server.close()
    finally:
        server.close()
