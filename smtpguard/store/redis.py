"""``redis://host:port/db``, ``unix:///path/redis.sock?db=N`` and
``redis+sentinel://host:port,host:port/service?db=N``: state shared by
several smtpguard nodes in one Redis, through redis.asyncio.

With Sentinel, redis-py's Sentinel client asks the sentinels which server is
the primary of *service* and connects there; when a failover promotes a
replica, the connections to the old primary fail (a few StoreErrors, which
``on_store_error`` and the breaker handle) and the next ones go to the new
primary.  What the old primary had replicated is there; a write it had not
replicated yet is lost with it (Redis replication is asynchronous): such a
triplet is greylisted again, no message is lost.

How it works
------------
Every record is a hash under ``<prefix><space>:<key>`` (prefix
``smtpguard:`` by default, so several deployments can share a Redis):

* ``smtpguard:greylist:<net/sender/rcpt>`` -- first_seen, last_seen,
  passed_at (``""`` until passed), expires;
* ``smtpguard:clients:<net>`` -- count, last_counted, expires;
* ``smtpguard:cache:<ip>`` -- one field per test, its value the expiry;
* ``smtpguard:rate:<key>`` -- start, hits.

A read of several records is one Lua script that returns every hash asked
(the greylist check's triplet, client network and allowlist version: one
EVALSHA, one reply), and the reads that requests start in the same turn of
the event loop share one script call (at most :data:`READ_BATCH`), which
reads them all atomically.  A record's write is one Lua script (HSET +
PEXPIRE), a bulk write one MULTI/EXEC, so a key never exists without its
TTL.  Why: redis-py's CPU per command (some 30 µs) is what bounds the policy
service on Redis; a pipeline of three reads or a MULTI/EXEC costs 1.5 to 2
times a script call, and with 50 requests in flight a shared read costs the
service a quarter of a read of its own (docs/policy.md, Performance).

The TTL is *relative* (``expires - clock()``): Redis drops dead keys on its
own, and reads also compare the stored ``expires`` with the injected clock,
which is what a fake clock in tests relies on.  The allowlist cache merges
tests into the hash and only ever lengthens its TTL; the rate counter keeps
its window start in the hash (a fixed window from the first hit, as
anvil(8) counts) so the injected clock decides, not Redis's.

Operator scans (list, stats, purge) walk keys with SCAN, so they cost O(keys)
but never block Redis; :meth:`purge_expired` deletes with a script that
re-checks ``expires`` inside Redis, so it cannot remove a record another node
has just refreshed.  On a live system Redis's TTLs make purging unnecessary.

Network failures, timeouts (:data:`TIMEOUT` seconds; one quick retry for a
pooled connection that went stale) and error replies become StoreError.
"""

from __future__ import annotations

import asyncio
import copy
import math
import re
import urllib.parse
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar, cast

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from .base import CLIENTS, GREYLIST, KINDS, Clock, Kind, Row, Store, StoreStats

T = TypeVar("T")

#: socket connect and read timeout, seconds
TIMEOUT = 2.0
#: keys asked per SCAN call and fetched per pipeline in operator scans
SCAN_COUNT = 1000
#: reads sent together in one script call, at most
READ_BATCH = 64

_Waiting = tuple[list[str], "asyncio.Future[list[dict[str, str]]]"]

# A key's error (WRONGTYPE: something else wrote there) comes back in its
# place as a string, so that it fails only the read that asked for it.
_READ = """
local hashes = {}
for i, key in ipairs(KEYS) do
  local h = redis.pcall('HGETALL', key)
  if h.err then hashes[i] = key .. ': ' .. h.err else hashes[i] = h end
end
return hashes
"""

_PUT_RECORD = """
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
if ARGV[1] == '' then redis.call('PERSIST', KEYS[1]) else redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return 0
"""

_RATE = """
local now, window = tonumber(ARGV[1]), tonumber(ARGV[2])
local start = tonumber(redis.call('HGET', KEYS[1], 'start'))
if start == nil or now - start >= window then
  redis.call('HSET', KEYS[1], 'start', ARGV[1], 'hits', 1)
  redis.call('PEXPIRE', KEYS[1], math.ceil(window * 1000))
  return 1
end
return redis.call('HINCRBY', KEYS[1], 'hits', 1)
"""

_MERGE_TESTS = """
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
local ttl = tonumber(ARGV[1])
if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
return 0
"""

_PURGE_RECORDS = """
local now, removed = tonumber(ARGV[1]), 0
for _, key in ipairs(KEYS) do
  local expires = tonumber(redis.call('HGET', key, 'expires'))
  if expires ~= nil and expires <= now then
    redis.call('DEL', key)
    removed = removed + 1
  end
end
return removed
"""

_PURGE_TESTS = """
local now, removed = tonumber(ARGV[1]), 0
for _, key in ipairs(KEYS) do
  local flat = redis.call('HGETALL', key)
  for i = 1, #flat, 2 do
    if tonumber(flat[i + 1]) <= now then
      redis.call('HDEL', key, flat[i])
      removed = removed + 1
    end
  end
end
return removed
"""


def _glob_escape(text: str) -> str:
    return re.sub(r"([\\*?\[\]])", r"\\\1", text)


def _ttl_ms(expires: float, now: float) -> int:
    return max(1, math.ceil((expires - now) * 1000))


class RedisStore(Store):
    backend = "redis"
    backend_errors = (RedisError, OSError)

    def __init__(self, client: redis.asyncio.Redis, clock: Clock, prefix: str) -> None:
        super().__init__(clock)
        self._r = client
        self._prefix = prefix
        self._waiting: list[_Waiting] = []  # reads for the next batch
        self._batches: set[asyncio.Task[None]] = set()
        self._read = client.register_script(_READ)
        self._put_record = client.register_script(_PUT_RECORD)
        self._rate = client.register_script(_RATE)
        self._merge_tests = client.register_script(_MERGE_TESTS)
        self._purge_records = client.register_script(_PURGE_RECORDS)
        self._purge_tests = client.register_script(_PURGE_TESTS)

    @classmethod
    def connect(cls, url: str, clock: Clock, prefix: str) -> RedisStore:
        """A store on *url*; connections are made on first use, so this
        succeeds while Redis is down (operations then raise StoreError)."""
        client = redis.asyncio.from_url(
            url,
            decode_responses=True,
            socket_timeout=TIMEOUT,
            socket_connect_timeout=TIMEOUT,
            retry=Retry(NoBackoff(), 1),
        )
        return cls(client, clock, prefix)

    @classmethod
    def connect_sentinel(cls, url: str, clock: Clock, prefix: str) -> RedisStore:
        """A store on the primary that the sentinels of
        ``redis+sentinel://host:port,host:port/service?db=N`` name."""
        sentinels, service, db = parse_sentinel_url(url)
        timeouts = {"socket_timeout": TIMEOUT, "socket_connect_timeout": TIMEOUT}
        sentinel = Sentinel(sentinels, sentinel_kwargs=timeouts, socket_timeout=TIMEOUT,
                            socket_connect_timeout=TIMEOUT)
        client = sentinel.master_for(service, db=db, decode_responses=True, retry=Retry(NoBackoff(), 1),
                                     socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT)
        return cls(client, clock, prefix)

    def _key(self, space: str, key: str) -> str:
        return f"{self._prefix}{space}:{key}"

    async def _scan(self, space: str, prefix: str) -> AsyncIterator[list[str]]:
        """The keys in *space* whose own key starts with *prefix*, in batches."""
        batch: list[str] = []
        async for key in self._r.scan_iter(match=_glob_escape(self._key(space, prefix)) + "*", count=SCAN_COUNT):
            batch.append(key)
            if len(batch) >= SCAN_COUNT:
                yield batch
                batch = []
        if batch:
            yield batch

    async def _hgetall(self, keys: list[str]) -> list[dict[str, str]]:
        """HGETALL of each key, in one round trip."""
        async with self._r.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hgetall(key)
            return cast(list[dict[str, str]], await pipe.execute())

    async def _collect(
        self, space: str, limit: int, prefix: str, live: Callable[[dict[str, str]], T | None]
    ) -> list[tuple[str, T]]:
        """Up to *limit* (key, value) of *space*, where ``live(fields)`` gives
        the value of a live hash and None for a dead one."""
        found: list[tuple[str, T]] = []
        skip = len(self._key(space, ""))
        async for keys in self._scan(space, prefix):
            hashes = await self._hgetall(keys)
            found += [(k[skip:], v) for k, h in zip(keys, hashes, strict=True) if (v := live(h)) is not None]
            if len(found) >= limit:
                break
        return sorted(found)[:limit]

    @staticmethod
    def _live_row(kind: Kind[Any], fields: dict[str, str], now: float) -> Row | None:
        if not fields or float(fields["expires"]) <= now:
            return None
        return tuple(fields[name] for name in kind.names)

    @staticmethod
    def _live_tests(fields: dict[str, str], now: float) -> dict[str, float] | None:
        return {test: float(exp) for test, exp in fields.items() if float(exp) > now} or None

    async def _read_hashes(self, keys: list[str]) -> list[dict[str, str]]:
        """HGETALL of each key, atomically.  The reads that callers (one per
        request) start in the same turn of the event loop go together in one
        :data:`_READ` call (:meth:`_send_reads`): at load, one command for
        several requests."""
        if len(keys) == 1:
            return [cast(dict[str, str], await self._r.hgetall(keys[0]))]
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[dict[str, str]]] = loop.create_future()
        self._waiting.append((keys, future))
        if len(self._waiting) == 1:
            loop.call_soon(self._send_reads)  # after the other callers of this turn
        return await future

    def _send_reads(self) -> None:
        waiting, self._waiting = self._waiting, []
        for i in range(0, len(waiting), READ_BATCH):
            task = asyncio.get_running_loop().create_task(self._read_batch(waiting[i:i + READ_BATCH]))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)

    async def _read_batch(self, batch: list[_Waiting]) -> None:
        """One script call for *batch*; each caller gets its own records, or
        an exception of its own (Store._call makes it a StoreError): the
        call's failure, or its own key's error.  Every future is settled."""
        try:
            flat = cast(list[list[str] | str], await self._read(keys=[key for keys, _ in batch for key in keys]))
            at = 0
            for keys, future in batch:
                mine = flat[at:at + len(keys)]
                at += len(keys)
                if future.done():  # given up on (its deadline)
                    continue
                errors = [h for h in mine if isinstance(h, str)]
                if errors:
                    future.set_exception(ResponseError(errors[0]))
                else:
                    future.set_result([dict(zip(h[::2], h[1::2], strict=True)) for h in mine])
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(copy.copy(exc))  # one each: a shared one's traceback would grow
        except BaseException:
            for _, future in batch:
                future.cancel()
            raise

    async def _get_rows(self, requests: list[tuple[Kind[Any], str]], now: float) -> list[Row | None]:
        hashes = await self._read_hashes([self._key(kind.name, key) for kind, key in requests])
        return [self._live_row(kind, fields, now) for (kind, _), fields in zip(requests, hashes, strict=True)]

    async def _put_rows(self, kind: Kind[Any], rows: list[tuple[str, Row]], now: float) -> None:
        if len(rows) == 1:  # a decision's write: one command
            (key, row), = rows
            ttl = "" if math.isinf(row[-1]) else _ttl_ms(row[-1], now)  # "": an allowlist entry without a TTL
            fields = [x for c, v in zip(kind.names, row, strict=True) for x in (c, "" if v is None else v)]
            await self._put_record(keys=[self._key(kind.name, key)], args=[ttl, *fields])
            return
        async with self._r.pipeline(transaction=True) as pipe:
            for key, row in rows:
                name = self._key(kind.name, key)
                pipe.hset(name, mapping={c: "" if v is None else v for c, v in zip(kind.names, row, strict=True)})
                if math.isinf(row[-1]):  # an operator's allowlist entry without a TTL
                    pipe.persist(name)
                else:
                    pipe.pexpire(name, _ttl_ms(row[-1], now))
            await pipe.execute()

    async def _delete(self, kind: str, key: str) -> bool:
        return bool(await self._r.delete(self._key(kind, key)))

    async def _scan_rows(self, kind: Kind[Any], limit: int, prefix: str, now: float) -> list[tuple[str, Row]]:
        return await self._collect(kind.name, limit, prefix, lambda fields: self._live_row(kind, fields, now))

    async def _get_tests(self, ip: str, now: float) -> dict[str, float]:
        (fields,) = await self._read_hashes([self._key("cache", ip)])
        return self._live_tests(fields, now) or {}

    async def _put_tests(self, ip: str, tests: dict[str, float], now: float) -> None:
        flat = [v for test, expires in tests.items() for v in (test, expires)]
        await self._merge_tests(keys=[self._key("cache", ip)], args=[_ttl_ms(max(tests.values()), now), *flat])

    async def _scan_tests(self, limit: int, prefix: str, now: float) -> list[tuple[str, dict[str, float]]]:
        return await self._collect("cache", limit, prefix, lambda fields: self._live_tests(fields, now))

    async def _hit_rate(self, key: str, window: float, now: float) -> int:
        return int(await self._rate(keys=[self._key("rate", key)], args=[now, window]))

    async def _ping(self) -> None:
        """A write with a TTL: a replica (read-only) or a full Redis
        (maxmemory) refuses it."""
        await self._r.set(self._key("health", "ping"), repr(self.clock()), px=60_000)

    async def _purge(self, now: float) -> int:
        removed = 0
        scripts = {**{kind.name: self._purge_records for kind in KINDS}, "cache": self._purge_tests}
        for space, script in scripts.items():
            async for keys in self._scan(space, ""):
                removed += int(await script(keys=keys, args=[now]))
        return removed

    async def _count(self, space: str) -> int:
        return sum([len(keys) async for keys in self._scan(space, "")])

    async def _stats(self) -> StoreStats:
        counts = {space: await self._count(space) for space in (*(kind.name for kind in KINDS), "cache")}
        return StoreStats(greylist=counts[GREYLIST.name], clients=counts[CLIENTS.name], cache=counts["cache"])

    async def _close(self) -> None:
        for task in list(self._batches):
            task.cancel()
        await self._r.aclose()


def parse_sentinel_url(url: str) -> tuple[list[tuple[str, int]], str, int]:
    """``redis+sentinel://h:p,h:p/service?db=N`` -> (sentinels, service, db);
    ValueError when malformed."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "redis+sentinel":
        raise ValueError(f'not a redis+sentinel:// URL: "{url}"')
    sentinels = []
    for hostport in parts.netloc.split(","):
        host, sep, port = hostport.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f'expected HOST:PORT of a sentinel, got "{hostport}" in "{url}"')
        sentinels.append((host.strip("[]"), int(port)))
    service = parts.path.strip("/")
    if not service or "/" in service:
        raise ValueError(f'expected the monitored service name as the path, got "{parts.path}" in "{url}"')
    query = urllib.parse.parse_qs(parts.query)
    db = query.pop("db", ["0"])[-1]
    if query or not db.isdigit():
        raise ValueError(f'expected only ?db=N, got "?{parts.query}" in "{url}"')
    return sentinels, service, int(db)
