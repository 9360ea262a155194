"""``sqlite:///relative/path`` and ``sqlite:////absolute/path``: one node's
state in one SQLite file, through aiosqlite.

How it works
------------
One aiosqlite connection is the only writer: every write, scan and sweep
runs in its worker thread and the event loop only awaits it.  It is in
autocommit mode, and a caller goes on only once its write is committed -- a
triplet the greylist check has acknowledged is already in the database.
One-record writes that arrive while the writer is busy are committed
together (group commit: one multi-row upsert per table, one thread hop).  Bulk writes are single multi-row
``INSERT ... ON CONFLICT DO UPDATE`` statements, so nothing ever holds a
transaction open across an ``await`` (another coroutine's write would
otherwise join it, and a rollback would take it away).

Point reads -- one primary-key lookup, the greylist check's two per
recipient and the allowlist cache's -- run on the event loop through a
second, ``query_only`` connection: such a lookup takes ~10 µs while a round
trip through the worker thread costs 60-110 µs on this 2-core machine, and
that hop, not SQLite, is what bounds decisions per second.  In WAL mode a
reader never waits for the writer, so the loop is held for the lookup only
(plus a disk read if the page is not cached).  Every committed write is
visible to the next read.

Checkpoints (copying the WAL back into the database, with an ``fsync()``)
are taken off the commit path: the writer has ``wal_autocheckpoint = 0`` and
a third connection, in its own aiosqlite thread, runs a PASSIVE checkpoint
every :data:`CHECKPOINT_INTERVAL` seconds.  A checkpoint does not take the
write lock, so commits go on meanwhile; with SQLite's default (a checkpoint
inside every ~1000th page's commit) the decision that triggered it, and all
queued behind it, waited for the ``fsync()``.

Tables ``greylist`` and ``clients`` are ``WITHOUT ROWID`` tables keyed by
``key`` (the lookup: one B-tree instead of table plus unique index, so a
write touches one page fewer) with an index on ``expires`` (the sweep);
``cache`` is keyed by (ip, test), with the same index.
:meth:`purge_expired` deletes dead rows with ``DELETE ... WHERE key IN
(SELECT key ... WHERE expires <= now LIMIT 1000)`` repeated until a batch
comes back short: each batch is a short statement, and whatever the sessions
queued in the meantime runs between two batches.

Rate counters are kept in process memory (:class:`~.memory.RateWindows`),
as anvil(8) does: they are per node and live a minute, so writing one row
per connection to disk would buy nothing.

Durability trade-off
--------------------
``journal_mode=WAL`` with ``synchronous=NORMAL``: a commit is a ``write()``
into the WAL file without ``fsync()``.  Once the statement returns, the data
is in the kernel's page cache, so it **survives a crash or ``kill -9`` of
this process** (the next open replays the WAL).  It does **not** survive a
power loss or kernel crash: the last transactions before it may be lost
(the file stays consistent; greylisting then merely delays those triplets
again).  ``synchronous=FULL`` would close that gap at the price of one
``fsync()`` per decision.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sqlite3
from pathlib import Path
from typing import Any

import aiosqlite

from .base import CLIENTS, GREYLIST, KINDS, Clock, Kind, Row, Store, StoreError, StoreStats
from .memory import SWEEP_BATCH, RateWindows

log = logging.getLogger(__name__)

#: how long a write waits for another process's lock (e.g. the CLI)
BUSY_TIMEOUT_MS = 2000
#: how long a point read on the event loop may wait (WAL readers rarely do)
READ_BUSY_TIMEOUT_MS = 50
#: seconds between two background checkpoints
CHECKPOINT_INTERVAL = 1.0
#: the WAL file is truncated back to this size after a checkpoint
JOURNAL_SIZE_LIMIT = 64 * 1024 * 1024

_PRAGMAS = f"""
PRAGMA journal_mode = WAL;
PRAGMA synchronous = NORMAL;
PRAGMA busy_timeout = {BUSY_TIMEOUT_MS};
PRAGMA wal_autocheckpoint = 0;
PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT};
"""

#: table -> its primary key columns
_KEYS = {**{kind.name: "key" for kind in KINDS}, "cache": "ip, test"}


def _schema() -> str:
    tables = [
        f"""CREATE TABLE IF NOT EXISTS {kind.name} (
            key TEXT NOT NULL PRIMARY KEY,
            {", ".join(f"{name} REAL" for name in kind.names[:-1])},
            expires REAL NOT NULL) WITHOUT ROWID;"""
        for kind in KINDS
    ]
    tables.append(
        """CREATE TABLE IF NOT EXISTS cache (
            ip TEXT NOT NULL, test TEXT NOT NULL, expires REAL NOT NULL, PRIMARY KEY (ip, test)) WITHOUT ROWID;"""
    )
    tables += [f"CREATE INDEX IF NOT EXISTS {table}_expires ON {table} (expires);" for table in _KEYS]
    # One row the readiness probe writes (Store.ping): the disk takes writes.
    tables.append("CREATE TABLE IF NOT EXISTS health (key TEXT NOT NULL PRIMARY KEY, at REAL) WITHOUT ROWID;")
    return "\n".join(tables)


@functools.lru_cache(maxsize=64)
def _upsert(table: str, columns: tuple[str, ...], conflict: str, rows: int) -> str:
    """``INSERT INTO table (columns) VALUES (...) x rows ON CONFLICT DO UPDATE``."""
    one = "(" + ", ".join("?" * len(columns)) + ")"
    update = ", ".join(f"{c} = excluded.{c}" for c in columns if c not in conflict.split(", "))
    return (
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES {', '.join([one] * rows)} "
        f"ON CONFLICT ({conflict}) DO UPDATE SET {update}"
    )


def _prefix_range(prefix: str) -> tuple[str, str]:
    """``key >= lo AND key < hi`` selects the keys starting with *prefix*."""
    return prefix, prefix + "\U0010ffff"


_Connection = aiosqlite.Connection | sqlite3.Connection


async def _close_all(connections: list[_Connection]) -> None:
    for conn in reversed(connections):  # the writer, opened first, closes last
        if isinstance(conn, aiosqlite.Connection):
            await conn.close()
        else:
            conn.close()


async def _connect(path: str) -> tuple[aiosqlite.Connection, aiosqlite.Connection, sqlite3.Connection]:
    """The writer (configured, schema created), the checkpointer and the reader."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    opened: list[_Connection] = []
    try:
        writer = await aiosqlite.connect(path, isolation_level=None)
        opened.append(writer)
        await writer.executescript(_PRAGMAS)
        mode = list(await writer.execute_fetchall("PRAGMA journal_mode"))[0][0]
        if mode != "wal":
            raise StoreError(f"sqlite: {path}: cannot use write-ahead logging (journal_mode={mode})")
        await writer.executescript(_schema())
        checkpointer = await aiosqlite.connect(path, isolation_level=None)
        opened.append(checkpointer)
        reader = sqlite3.connect(path, isolation_level=None)
        opened.append(reader)
        reader.executescript(f"PRAGMA query_only = 1; PRAGMA busy_timeout = {READ_BUSY_TIMEOUT_MS};")
    except BaseException:
        await _close_all(opened)
        raise
    return writer, checkpointer, reader


class SQLiteStore(Store):
    backend = "sqlite"
    backend_errors = (sqlite3.Error, OSError)

    def __init__(
        self, db: aiosqlite.Connection, checkpointer: aiosqlite.Connection, reader: sqlite3.Connection, clock: Clock
    ) -> None:
        super().__init__(clock)
        self._db = db
        self._checkpointer = checkpointer
        self._reader = reader
        self._select = {
            kind.name: f"SELECT {', '.join(kind.names)} FROM {kind.name} WHERE key = ? AND expires > ?"
            for kind in KINDS
        }
        self._rates = RateWindows()
        self._pending: dict[str, tuple[Kind[Any], dict[str, Row]]] = {}  # group commit: table -> key -> row
        self._waiters: list[asyncio.Future[None]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._checkpoints = asyncio.create_task(self._checkpoint_loop())

    @classmethod
    async def open(cls, path: str, clock: Clock) -> SQLiteStore:
        """Open (creating file, parent directory and schema) the database at *path*."""
        try:
            return cls(*await _connect(path), clock)
        except cls.backend_errors as exc:
            raise StoreError(f"sqlite: {path}: {exc}") from exc

    async def _checkpoint_loop(self) -> None:
        while True:
            await asyncio.sleep(CHECKPOINT_INTERVAL)
            try:
                await self._checkpointer.execute_fetchall("PRAGMA wal_checkpoint(PASSIVE)")
            except sqlite3.Error as exc:
                # A full disk shows here first: the WAL can still take
                # writes in the space it has, the database file cannot grow.
                if "checkpoint" not in self.failfast.failing:
                    log.warning("sqlite: checkpoint failed: %s", exc)
                self.failfast.observe("checkpoint", f"sqlite: checkpoint: {exc}")
            else:
                self.failfast.observe("checkpoint", None)

    async def _rows(self, sql: str, params: Any = ()) -> list[sqlite3.Row]:
        return list(await self._db.execute_fetchall(sql, params))

    async def _changes(self, sql: str, params: Any = ()) -> int:
        cursor = await self._db.execute(sql, params)
        await cursor.close()
        return cursor.rowcount

    async def _get_rows(self, requests: list[tuple[Kind[Any], str]], now: float) -> list[Row | None]:
        return [self._reader.execute(self._select[kind.name], (key, now)).fetchone() for kind, key in requests]

    async def _put_rows(self, kind: Kind[Any], rows: list[tuple[str, Row]], now: float) -> None:
        if len(rows) > 1:  # a bulk write is one statement already
            await self._upsert(kind, rows)
            return
        # Group commit: one-record writes (a greylist decision each) that
        # arrive while the writer thread is busy go in together, one
        # statement per table and one thread hop for all of them.  Each
        # caller still returns only once its record is committed.
        key, row = rows[0]
        self._pending.setdefault(kind.name, (kind, {}))[1][key] = row  # last write of a key wins
        done = asyncio.get_running_loop().create_future()
        self._waiters.append(done)
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush())
        await done

    async def _flush(self) -> None:
        try:
            while self._waiters:
                batch, waiters = self._pending, self._waiters
                self._pending, self._waiters = {}, []
                try:
                    for kind, rows in batch.values():
                        await self._upsert(kind, list(rows.items()))
                except Exception as exc:
                    for w in waiters:
                        if not w.done():
                            w.set_exception(exc)
                else:
                    for w in waiters:
                        if not w.done():
                            w.set_result(None)
        finally:
            self._flusher = None

    async def _upsert(self, kind: Kind[Any], rows: list[tuple[str, Row]]) -> None:
        sql = _upsert(kind.name, ("key", *kind.names), "key", len(rows))
        await self._rows(sql, [v for key, row in rows for v in (key, *row)])

    async def _delete(self, kind: str, key: str) -> bool:
        column = "ip" if kind == "cache" else "key"
        return await self._changes(f"DELETE FROM {kind} WHERE {column} = ?", (key,)) > 0

    async def _scan_rows(self, kind: Kind[Any], limit: int, prefix: str, now: float) -> list[tuple[str, Row]]:
        rows = await self._rows(
            f"SELECT key, {', '.join(kind.names)} FROM {kind.name} "
            "WHERE key >= ? AND key < ? AND expires > ? ORDER BY key LIMIT ?",
            (*_prefix_range(prefix), now, limit),
        )
        return [(row[0], tuple(row[1:])) for row in rows]

    async def _get_tests(self, ip: str, now: float) -> dict[str, float]:
        rows = self._reader.execute("SELECT test, expires FROM cache WHERE ip = ? AND expires > ?", (ip, now))
        return dict(rows.fetchall())

    async def _put_tests(self, ip: str, tests: dict[str, float], now: float) -> None:
        sql = _upsert("cache", ("ip", "test", "expires"), "ip, test", len(tests))
        await self._rows(sql, [v for test, expires in tests.items() for v in (ip, test, expires)])

    async def _scan_tests(self, limit: int, prefix: str, now: float) -> list[tuple[str, dict[str, float]]]:
        rows = await self._rows(
            "SELECT ip, test, expires FROM cache WHERE expires > ? AND ip IN ("
            " SELECT DISTINCT ip FROM cache WHERE ip >= ? AND ip < ? AND expires > ? ORDER BY ip LIMIT ?)"
            " ORDER BY ip, test",
            (now, *_prefix_range(prefix), now, limit),
        )
        found: dict[str, dict[str, float]] = {}
        for ip, test, expires in rows:
            found.setdefault(ip, {})[test] = expires
        return list(found.items())

    async def _hit_rate(self, key: str, window: float, now: float) -> int:
        return self._rates.hit(key, window, now)

    async def _ping(self) -> None:
        """A real write (a disk that is full or read-only refuses it), then
        the reader (a file replaced by garbage fails to read)."""
        await self._rows("INSERT INTO health (key, at) VALUES ('ping', ?) "
                         "ON CONFLICT (key) DO UPDATE SET at = excluded.at", (self.clock(),))
        self._reader.execute("SELECT count(*) FROM health").fetchone()

    @staticmethod
    def fatal(exc: BaseException) -> bool:
        """SQLITE_CORRUPT and SQLITE_NOTADB: the file is damaged."""
        return getattr(exc, "sqlite_errorcode", None) in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)

    async def _purge(self, now: float) -> int:
        removed = 0
        for table, key in _KEYS.items():
            while True:
                n = await self._changes(
                    f"DELETE FROM {table} WHERE ({key}) IN "
                    f"(SELECT {key} FROM {table} WHERE expires <= ? LIMIT {SWEEP_BATCH})",
                    (now,),
                )
                removed += n
                if n < SWEEP_BATCH:
                    break
        self._rates.prune(now)
        return removed

    async def _stats(self) -> StoreStats:
        rows = await self._rows(
            f"SELECT (SELECT count(*) FROM {GREYLIST.name}), (SELECT count(*) FROM {CLIENTS.name}),"
            " (SELECT count(DISTINCT ip) FROM cache)"
        )
        greylist, clients, cache = rows[0]
        return StoreStats(greylist=greylist, clients=clients, cache=cache)

    async def _close(self) -> None:
        if self._flusher is not None:  # queued writes are committed before closing
            await asyncio.shield(self._flusher)
        self._checkpoints.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._checkpoints
        await _close_all([self._db, self._checkpointer, self._reader])
