"""The state store contract: one suite, run against every backend.

``memory://``, SQLite in ``tmp_path`` and Redis (the lab's private
redis-server, ``redis_url``) must behave the same under a fake clock; then
what only one backend can show: SQLite surviving close/reopen and ``kill
-9``, SQLite refusing unwritable files, Redis unreachable, Redis over its unix
socket and key prefixes.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from smtpguard.store import AllowedNet, ClientNet, Store, StoreError, StoreStats, Triplet, open_store
from smtpguard.store.base import PUT_BATCH
from tests.lab import RedisServer, free_port

REPO = Path(__file__).resolve().parents[2]
T0 = 1_700_000_000.0


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["memory", "sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "memory":
        return "memory://"
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    return str(request.getfixturevalue("redis_url"))


@pytest_asyncio.fixture
async def store(store_url: str, clock: FakeClock) -> AsyncIterator[Store]:
    s = await open_store(store_url, clock)
    yield s
    await s.close()


def passed(first: float, expires: float) -> Triplet:
    return Triplet(first_seen=first, last_seen=first + 400, passed_at=first + 400, expires=expires)


# ------------------------------------------------------------------ contract


@pytest.mark.asyncio
async def test_operator_allowlist_any_prefix_no_expiry_and_seen_by_another_node(store_url: str,
                                                                                clock: FakeClock) -> None:
    """Networks of any prefix length, stored exactly; no TTL = never expires;
    a second node (another Store on the same backend) sees edits at once."""
    a, b = await open_store(store_url, clock), await open_store(store_url, clock)
    if store_url == "memory://":
        b = a  # process memory is not shared
    try:
        key, ip = "10.5.6.0/a@example.org/b@example.net", ipaddress.ip_address("10.5.6.7")
        assert (await b.get_greylist_allowed(key, "10.5.6.0", ip))[2] is None
        await a.put_allowed("10.0.0.0/8", AllowedNet(T0, math.inf))
        await a.put_allowed("192.0.2.128/25", AllowedNet(T0, T0 + 60))
        await a.put_allowed("2001:db8::/32", AllowedNet(T0, math.inf))
        assert (await b.get_greylist_allowed(key, "10.5.6.0", ip))[2] == "10.0.0.0/8"
        net = "192.0.2.0"
        assert (await b.get_greylist_allowed(key, net, ipaddress.ip_address("192.0.2.200")))[2] == "192.0.2.128/25"
        assert (await b.get_greylist_allowed(key, net, ipaddress.ip_address("192.0.2.100")))[2] is None
        assert (await b.get_greylist_allowed(key, "2001:db8:1::", ipaddress.ip_address("2001:db8:1::5")))[2] \
            == "2001:db8::/32"
        clock.advance(10 * 365 * 86400)  # years later: only the TTL entry is gone
        assert (await b.get_greylist_allowed(key, "10.5.6.0", ip))[2] == "10.0.0.0/8"
        assert (await b.get_greylist_allowed(key, net, ipaddress.ip_address("192.0.2.200")))[2] is None
        await a.purge_expired()
        assert [k for k, _ in await b.list_allowed()] == ["10.0.0.0/8", "2001:db8::/32"]
        assert await a.delete_allowed("10.0.0.0/8") is True
        assert (await b.get_greylist_allowed(key, "10.5.6.0", ip))[2] is None
    finally:
        if b is not a:
            await b.close()
        await a.close()


@pytest.mark.asyncio
async def test_triplet_round_trip(store: Store) -> None:
    assert await store.get_triplet("192.0.2.0/a@example.org/b@example.net") is None
    pending = Triplet(T0, T0, None, T0 + 100)
    await store.put_triplet("192.0.2.0/a@example.org/b@example.net", pending)
    assert await store.get_triplet("192.0.2.0/a@example.org/b@example.net") == pending
    await store.put_triplet("192.0.2.0/a@example.org/b@example.net", passed(T0, T0 + 1000))
    assert await store.get_triplet("192.0.2.0/a@example.org/b@example.net") == passed(T0, T0 + 1000)
    assert await store.delete_triplet("192.0.2.0/a@example.org/b@example.net") is True
    assert await store.delete_triplet("192.0.2.0/a@example.org/b@example.net") is False
    assert await store.get_triplet("192.0.2.0/a@example.org/b@example.net") is None


@pytest.mark.asyncio
async def test_concurrent_writes_all_land(store: Store) -> None:
    """Many one-record writes at once (SQLite commits them as a group, one
    statement per table): every caller's record is there when it returns,
    a key written twice in one burst is stored once (no error; which of
    two concurrent writes wins is not defined), and the clients table is
    written alongside."""
    keys = [f"192.0.2.0/s{i}@example.org/r@example.net" for i in range(50)]
    writes = [store.put_triplet(k, Triplet(T0, T0, None, T0 + 100)) for k in keys]
    writes += [store.put_triplet(keys[0], passed(T0, T0 + 500)),
               store.put_client("192.0.2.0", ClientNet(3, T0, T0 + 100))]
    await asyncio.gather(*writes)
    assert await store.get_triplet(keys[0]) in (Triplet(T0, T0, None, T0 + 100), passed(T0, T0 + 500))
    assert all([await store.get_triplet(k) is not None for k in keys])
    assert await store.get_client("192.0.2.0") == ClientNet(3, T0, T0 + 100)


@pytest.mark.asyncio
async def test_expiry_is_honoured_and_purged(store: Store, clock: FakeClock) -> None:
    await store.put_triplet("short", Triplet(T0, T0, None, T0 + 100))
    await store.put_triplet("long", passed(T0, T0 + 1000))
    await store.put_client("192.0.2.0", ClientNet(3, T0, T0 + 100))
    clock.advance(99.9)
    assert await store.get_triplet("short") is not None
    assert await store.get_client("192.0.2.0") == ClientNet(3, T0, T0 + 100)
    clock.advance(0.1)  # alive while now < expires
    assert await store.get_triplet("short") is None
    assert await store.get_client("192.0.2.0") is None
    assert [key for key, _ in await store.list_triplets()] == ["long"]
    assert await store.purge_expired() == 2
    assert await store.stats() == StoreStats(greylist=1, clients=0, cache=0)
    assert await store.get_triplet("long") == passed(T0, T0 + 1000)


@pytest.mark.asyncio
async def test_dead_record_is_not_stored(store: Store) -> None:
    await store.put_triplet("k", Triplet(T0, T0, None, T0 + 10))
    await store.put_triplet("k", Triplet(T0, T0, None, T0))  # expires now: deletes
    assert await store.get_triplet("k") is None
    assert await store.stats() == StoreStats(greylist=0, clients=0, cache=0)


@pytest.mark.asyncio
async def test_clients_and_get_greylist(store: Store) -> None:
    assert await store.get_greylist("192.0.2.0/a@x/b@y", "192.0.2.0") == (None, None)
    await store.put_client("192.0.2.0", ClientNet(5, T0, T0 + 3600))
    await store.put_triplet("192.0.2.0/a@x/b@y", passed(T0, T0 + 3600))
    assert await store.get_greylist("192.0.2.0/a@x/b@y", "192.0.2.0") == (
        passed(T0, T0 + 3600),
        ClientNet(5, T0, T0 + 3600),
    )
    assert await store.list_clients() == [("192.0.2.0", ClientNet(5, T0, T0 + 3600))]
    assert await store.delete_client("192.0.2.0") is True
    assert await store.get_client("192.0.2.0") is None


@pytest.mark.asyncio
async def test_list_with_prefix_and_limit(store: Store) -> None:
    for net in ("192.0.2.0", "198.51.100.0"):
        for i in range(3):
            await store.put_triplet(f"{net}/s{i}@x/r@y", passed(T0, T0 + 100))
    listed = await store.list_triplets(prefix="198.51.100.0/")
    assert [key for key, _ in listed] == [f"198.51.100.0/s{i}@x/r@y" for i in range(3)]
    assert len(await store.list_triplets(limit=4)) == 4
    assert len(await store.list_triplets()) == 6
    assert await store.list_triplets(prefix="203.0.113.0/") == []


@pytest.mark.asyncio
async def test_bulk_put(store: Store) -> None:
    n = PUT_BATCH * 2 + 7
    stored = await store.put_triplets((f"10.0.0.0/s{i}@x/r@y", passed(T0, T0 + 100 + i)) for i in range(n))
    assert stored == n
    assert (await store.stats()).greylist == n
    assert await store.get_triplet(f"10.0.0.0/s{n - 1}@x/r@y") == passed(T0, T0 + 100 + n - 1)


@pytest.mark.asyncio
async def test_allowlist_cache_per_test_expiry(store: Store, clock: FakeClock) -> None:
    ip = "192.0.2.7"
    assert await store.get_cache(ip) == {}
    await store.put_cache(ip, {"pregreet": T0 + 10, "dnsbl": T0 + 100})
    assert await store.get_cache(ip) == {"pregreet": T0 + 10, "dnsbl": T0 + 100}
    clock.advance(50)
    assert await store.get_cache(ip) == {"dnsbl": T0 + 100}
    await store.put_cache(ip, {"bare_newline": T0 + 500})  # merged, dnsbl kept
    assert await store.get_cache(ip) == {"dnsbl": T0 + 100, "bare_newline": T0 + 500}
    await store.put_cache("2001:db8::1", {"pregreet": T0 + 60})
    assert await store.list_cache() == [
        ("192.0.2.7", {"dnsbl": T0 + 100, "bare_newline": T0 + 500}),
        ("2001:db8::1", {"pregreet": T0 + 60}),
    ]
    assert await store.list_cache(prefix="2001:") == [("2001:db8::1", {"pregreet": T0 + 60})]
    clock.advance(60)  # T0 + 110: pregreet of both IPs and dnsbl are dead
    assert await store.purge_expired() == 3
    assert await store.stats() == StoreStats(greylist=0, clients=0, cache=1)
    assert await store.delete_cache(ip) is True
    assert await store.get_cache(ip) == {}


@pytest.mark.asyncio
async def test_rate_counter_fixed_window_from_first_hit(store: Store, clock: FakeClock) -> None:
    assert [await store.hit_rate("192.0.2.7", 60) for _ in range(3)] == [1, 2, 3]
    assert await store.hit_rate("192.0.2.8", 60) == 1  # keys are independent
    clock.advance(59.5)
    assert await store.hit_rate("192.0.2.7", 60) == 4
    clock.advance(0.5)  # the window (60 s from the first hit) has ended
    assert await store.hit_rate("192.0.2.7", 60) == 1
    clock.advance(30)
    assert await store.hit_rate("192.0.2.7", 60) == 2  # the new window started at its first hit
    assert await store.hit_rate("192.0.2.8", 60) == 1


@pytest.mark.asyncio
async def test_ping(store: Store) -> None:
    await store.ping()


# ------------------------------------------------------------------- SQLite


@pytest.mark.asyncio
async def test_sqlite_survives_close_and_reopen(tmp_path: Path, clock: FakeClock) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    s = await open_store(url, clock)
    await s.put_triplet("k", passed(T0, T0 + 1000))
    await s.put_client("192.0.2.0", ClientNet(2, T0, T0 + 1000))
    await s.put_cache("192.0.2.7", {"pregreet": T0 + 1000})
    await s.close()
    s = await open_store(url, clock)
    try:
        assert await s.get_greylist("k", "192.0.2.0") == (passed(T0, T0 + 1000), ClientNet(2, T0, T0 + 1000))
        assert await s.get_cache("192.0.2.7") == {"pregreet": T0 + 1000}
    finally:
        await s.close()


@pytest.mark.asyncio
async def test_sqlite_relative_url_and_created_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    s = await open_store("sqlite:///state/smtpguard.db", FakeClock())
    await s.close()
    assert (tmp_path / "state" / "smtpguard.db").is_file()


@pytest.mark.asyncio
async def test_bad_urls_are_value_errors() -> None:
    for url in ("sqlite:///", "postgres://x/y", "memory"):
        with pytest.raises(ValueError):
            await open_store(url, FakeClock())


@pytest.mark.asyncio
async def test_sqlite_unopenable_path(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(StoreError, match="sqlite"):
        await open_store(f"sqlite:///{tmp_path / 'file' / 'state.db'}", FakeClock())


@pytest.mark.asyncio
async def test_sqlite_not_a_database(tmp_path: Path) -> None:
    (tmp_path / "state.db").write_bytes(b"this is not an SQLite database, just text" * 100)
    with pytest.raises(StoreError, match="sqlite"):
        await open_store(f"sqlite:///{tmp_path / 'state.db'}", FakeClock())


UNWRITABLE = """
import asyncio, sys
from smtpguard.store import StoreError, Triplet, open_store

async def main() -> None:
    try:
        store = await open_store(sys.argv[1])
        try:
            await store.put_triplet("k", Triplet(1.0, 1.0, None, 4e9))
        finally:
            await store.close()
    except StoreError as exc:
        print("StoreError:", exc)
    else:
        print("written")

asyncio.run(main())
"""


def test_sqlite_unwritable_file_is_store_error(tmp_path: Path) -> None:
    """A database file (and directory) the process may read but not write.
    Root ignores file modes, so as root the writer runs without the
    capabilities that let it (setpriv drops CAP_DAC_OVERRIDE)."""
    db = tmp_path / "state.db"
    command = [sys.executable, "-c", UNWRITABLE, f"sqlite:///{db}"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert first.stdout.strip() == "written", first.stdout + first.stderr
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root and setpriv (util-linux) is missing")
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--", *command]
    db.chmod(0o444)
    tmp_path.chmod(0o555)
    try:
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    finally:
        tmp_path.chmod(0o755)
    assert result.stdout.startswith("StoreError: sqlite"), result.stdout + result.stderr


KILLED_WRITER = """
import asyncio, sys, time
from smtpguard.store import Triplet, open_store

async def main() -> None:
    store = await open_store(sys.argv[1])
    await store.put_triplet("192.0.2.0/a@example.org/b@example.net", Triplet(1.0, 400.0, 400.0, 4e9))
    print("acknowledged", flush=True)
    time.sleep(600)

asyncio.run(main())
"""


@pytest.mark.asyncio
async def test_sqlite_passed_triplet_survives_kill_9(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, f"sqlite:///{db}"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "acknowledged"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert proc.returncode == -signal.SIGKILL
    assert Path(f"{db}-wal").stat().st_size > 0  # left behind by the killed writer: recovery reads it
    s = await open_store(f"sqlite:///{db}")
    try:
        assert await s.get_triplet("192.0.2.0/a@example.org/b@example.net") == Triplet(1.0, 400.0, 400.0, 4e9)
    finally:
        await s.close()


# -------------------------------------------------------------------- Redis


@pytest.mark.asyncio
async def test_redis_unreachable_is_store_error() -> None:
    s = await open_store(f"redis://127.0.0.1:{free_port()}/0", FakeClock())  # nothing listens there
    try:
        with pytest.raises(StoreError, match="redis"):
            await s.ping()
        with pytest.raises(StoreError):
            await s.get_triplet("k")
        with pytest.raises(StoreError):
            await s.put_triplet("k", passed(T0, T0 + 100))
        with pytest.raises(StoreError):
            await s.hit_rate("k", 60)
    finally:
        await s.close()


@pytest.mark.asyncio
async def test_redis_unix_socket_url(redis_server: RedisServer) -> None:
    s = await open_store(redis_server.unix_url, FakeClock())
    try:
        await s.ping()
        await s.put_triplet("k", passed(T0, T0 + 100))
        assert await s.get_triplet("k") == passed(T0, T0 + 100)
    finally:
        await s.close()


@pytest.mark.asyncio
async def test_redis_prefixes_separate_deployments(redis_url: str) -> None:
    a = await open_store(redis_url, FakeClock(), redis_prefix="mx-a:")
    b = await open_store(redis_url, FakeClock(), redis_prefix="mx-b:")
    try:
        await a.put_triplet("k", passed(T0, T0 + 100))
        assert await b.get_triplet("k") is None
        assert (await b.stats()).greylist == 0
        shared = await open_store(redis_url, FakeClock(), redis_prefix="mx-a:")
        assert await shared.get_triplet("k") == passed(T0, T0 + 100)  # another node, same state
        await shared.close()
    finally:
        await a.close()
        await b.close()


@pytest.mark.asyncio
async def test_redis_scripts_come_back_after_script_flush(redis_server: RedisServer, redis_url: str) -> None:
    """A read of several records and a one-record write are Lua scripts
    (EVALSHA): a Redis that lost its script cache (restarted, failed over,
    SCRIPT FLUSH) is sent them again, and the call succeeds."""
    s = await open_store(redis_url, FakeClock())
    try:
        await s.put_triplet("k", passed(T0, T0 + 100))
        redis_server.command("SCRIPT", "FLUSH")
        assert await s.get_greylist("k", "192.0.2.0/24") == (passed(T0, T0 + 100), None)
        redis_server.command("SCRIPT", "FLUSH")
        await s.put_client("192.0.2.0/24", ClientNet(5, T0, T0 + 100))
        assert await s.get_greylist("k", "192.0.2.0/24") == (passed(T0, T0 + 100), ClientNet(5, T0, T0 + 100))
        assert 0 < int(redis_server.command("PTTL", "smtpguard:clients:192.0.2.0/24")) <= 100_000
    finally:
        await s.close()


@pytest.mark.asyncio
async def test_redis_reads_started_together_each_get_their_own_records(redis_server: RedisServer,
                                                                       redis_url: str) -> None:
    """Reads started in the same turn of the event loop share one script
    call (READ_BATCH at most per call): each caller gets its own records."""
    from smtpguard.store.redis import READ_BATCH

    s = await open_store(redis_url, FakeClock())
    try:
        n = READ_BATCH * 2 + 5
        await s.put_triplets([(f"k{i}", passed(T0 + i, T0 + 1000)) for i in range(0, n, 2)])
        await s.put_clients([(f"net{i}", ClientNet(i, T0, T0 + 1000)) for i in range(0, n, 3)])
        redis_server.command("CONFIG", "RESETSTAT")
        got = await asyncio.gather(*(s.get_greylist(f"k{i}", f"net{i}") for i in range(n)))
        stats = redis_server.command("INFO", "commandstats").decode()
        calls = re.search(r"cmdstat_evalsha:calls=(\d+),.*failed_calls=(\d+)", stats)
        assert calls and int(calls[1]) - int(calls[2]) == 3, stats  # 64 + 64 + 5 (a NOSCRIPT fails, is retried)
        assert got == [(passed(T0 + i, T0 + 1000) if i % 2 == 0 else None,
                        ClientNet(i, T0, T0 + 1000) if i % 3 == 0 else None) for i in range(n)]
    finally:
        await s.close()


@pytest.mark.asyncio
async def test_redis_reads_started_together_all_fail_when_redis_is_gone() -> None:
    s = await open_store(f"redis://127.0.0.1:{free_port()}/0", FakeClock())  # nothing listens there
    try:
        got = await asyncio.gather(*(s.get_greylist(f"k{i}", "net") for i in range(10)), return_exceptions=True)
        assert all(isinstance(x, StoreError) for x in got), got
    finally:
        await s.close()


@pytest.mark.asyncio
async def test_redis_reads_of_two_and_three_records_started_together_each_get_their_own(
        redis_url: str) -> None:
    """Callers asking for different numbers of records share a script call:
    the replies are cut per caller by its own count."""
    s = await open_store(redis_url, FakeClock())
    try:
        await s.put_triplets([(f"m{i}", passed(T0 + i, T0 + 1000)) for i in range(0, 30, 2)])
        await s.put_clients([(f"mnet{i}", ClientNet(i, T0, T0 + 1000)) for i in range(0, 30, 3)])
        ip = ipaddress.ip_address("192.0.2.7")
        got = await asyncio.gather(*(s.get_greylist(f"m{i}", f"mnet{i}") if i % 2 else
                                     s.get_greylist_allowed(f"m{i}", f"mnet{i}", ip) for i in range(30)))
        for i, g in enumerate(got):
            expected = (passed(T0 + i, T0 + 1000) if i % 2 == 0 else None,
                        ClientNet(i, T0, T0 + 1000) if i % 3 == 0 else None)
            assert g[:2] == expected, (i, g)
            assert len(g) == (2 if i % 2 else 3)
    finally:
        await s.close()


@pytest.mark.asyncio
async def test_a_redis_key_of_the_wrong_type_fails_only_the_read_that_asked_for_it(
        redis_server: RedisServer, redis_url: str) -> None:
    """Something else wrote a string where a triplet's hash belongs
    (WRONGTYPE): that read fails, the others sharing its script call don't."""
    s = await open_store(redis_url, FakeClock())
    try:
        await s.put_triplets([(f"w{i}", passed(T0, T0 + 1000)) for i in range(6)])
        redis_server.command("SET", "smtpguard:greylist:w3", "not a hash")
        got = await asyncio.gather(*(s.get_greylist(f"w{i}", "wnet") for i in range(6)), return_exceptions=True)
        assert isinstance(got[3], StoreError) and "WRONGTYPE" in str(got[3]), got[3]
        assert [g for i, g in enumerate(got) if i != 3] == [(passed(T0, T0 + 1000), None)] * 5
    finally:
        await s.close()
