"""The state store's interface: one async API, three backends.

What is kept
------------
* **greylist triplets** -- key ``"net/sender/recipient"`` -> :class:`Triplet`
  (first seen, last seen, when it passed);
* **auto-allowlisted client networks** -- network -> :class:`ClientNet`
  (how many greylist passes were counted, when the last one was counted);
* **the allowlist cache** (postscreen's ``postscreen_cache_map``) -- client IP
  -> ``{test name: expiry time}``, one expiry per test;
* **connection-rate counters** (anvil-like), see :meth:`Store.hit_rate`.

How expiry works
----------------
Every record carries an absolute ``expires`` time taken from the injected
clock (``time.time`` in production, a fake clock in tests); a record is alive
while ``clock() < expires`` and reads never return a dead one, whatever the
backend has physically removed yet.  That keeps the three backends identical
under a fake clock.  Dead records are removed by :meth:`Store.purge_expired`
(in small batches) and, on Redis, also by the key's own TTL.  The caller (the
greylist check) decides each record's ``expires``; the store only honours it.

How the backends share code
---------------------------
This class holds the typed API and the error translation; a backend
implements a handful of untyped primitives over *rows* -- a record's fields
as a tuple in declaration order, ``expires`` last -- described by a
:class:`Kind` (table/key-space name, column names and converters).  Every
primitive is awaited through :meth:`Store._call`, which turns the backend's
own exceptions (``backend_errors``) into the single :class:`StoreError`, so
callers can apply ``on_store_error = accept | tempfail``, and which bounds
the call by the session's store deadline and skips a store that keeps
failing (:mod:`.failfast`).
"""

from __future__ import annotations

import ipaddress
import itertools
import math
import random
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

from .failfast import FailFast, WriteBehind
from .failfast import StoreError as StoreError  # re-exported: the error of the store API

T = TypeVar("T")
R = TypeVar("R")

Clock = Callable[[], float]
Row = tuple[Any, ...]


@dataclass(frozen=True)
class Triplet:
    """One greylist triplet; ``passed_at`` is None until a retry passed."""

    first_seen: float
    last_seen: float
    passed_at: float | None
    expires: float


@dataclass(frozen=True)
class ClientNet:
    """A client network's auto-allowlist record (postgrey's ``postgrey_clients.db``).

    ``count`` greylist passes were counted, at most one per hour, the last at
    ``last_counted``; the network is allowlisted while ``count`` reaches the
    configured threshold and the record lives (``expires``).
    """

    count: int
    last_counted: float
    expires: float


@dataclass(frozen=True)
class AllowedNet:
    """A client network an operator allowlisted (``smtpguard greylist
    allow``), any prefix length; ``expires`` is ``inf`` unless a TTL was
    given."""

    added: float
    expires: float


@dataclass(frozen=True)
class StoreStats:
    """Stored record counts, including expired ones not yet purged."""

    greylist: int
    clients: int
    cache: int  # client IPs with at least one cached test


def _optional_float(value: Any) -> float | None:
    return None if value is None or value == "" else float(value)


@dataclass(frozen=True)
class Kind(Generic[R]):
    """A record type as the backends see it: a name and typed columns.

    The converters turn what a backend hands back (SQLite numbers, Redis
    strings) into the record's field types; the last column is ``expires``.
    """

    name: str
    record: Callable[..., R]
    names: tuple[str, ...]
    converters: tuple[Callable[[Any], Any], ...]

    def encode(self, record: Any) -> Row:
        return tuple(getattr(record, name) for name in self.names)

    def decode(self, row: Sequence[Any]) -> R:
        return self.record(*(convert(v) for convert, v in zip(self.converters, row, strict=True)))


GREYLIST: Kind[Triplet] = Kind(
    "greylist",
    Triplet,
    ("first_seen", "last_seen", "passed_at", "expires"),
    (float, float, _optional_float, float),
)
CLIENTS: Kind[ClientNet] = Kind("clients", ClientNet, ("count", "last_counted", "expires"), (int, float, float))
#: keyed by the network in CIDR form (``10.0.0.0/8``); the record :data:`VERSION`
#: changes with every edit, so a node reloads its copy only when needed
ALLOWED: Kind[AllowedNet] = Kind("allowed", AllowedNet, ("added", "expires"), (float, float))
KINDS: tuple[Kind[Any], ...] = (GREYLIST, CLIENTS, ALLOWED)
VERSION = "#version"
#: an ALLOWED record too (not a network): changes with every allowlist-cache
#: delete, so each node drops its in-memory PASS OLD set (smtpguard.hotset)
CACHE_VERSION = "#cache-version"

#: records handed to a backend per call by the bulk path
PUT_BATCH = 1000


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class _AllowedNets:
    """A node's copy of the ALLOWED networks: per IP version and prefix
    length, the set of network addresses, so a lookup costs one dict probe
    per prefix length in use, most specific first."""

    def __init__(self, version: float | None = None, items: Iterable[tuple[str, AllowedNet]] = ()) -> None:
        self.version = version
        self._nets: dict[tuple[int, int], dict[int, tuple[str, float]]] = {}
        for key, entry in items:
            try:
                net = ipaddress.ip_network(key)
            except ValueError:
                continue
            self._nets.setdefault((net.version, net.prefixlen), {})[int(net.network_address)] = (key, entry.expires)
        self._order = sorted(self._nets, key=lambda k: -k[1])

    def match(self, ip: IPAddress, now: float) -> str | None:
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        value, bits = int(ip), ip.max_prefixlen
        for version, prefix in self._order:
            if version != ip.version:
                continue
            found = self._nets[(version, prefix)].get(value >> (bits - prefix) << (bits - prefix))
            if found is not None and found[1] > now:
                return found[0]
        return None


class Store(ABC):
    """The async state store; obtain one with :func:`smtpguard.store.open_store`."""

    #: the backend's own exception types, translated into StoreError
    backend_errors: ClassVar[tuple[type[BaseException], ...]] = ()
    #: short backend name used in error messages
    backend: ClassVar[str] = ""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._allowed = _AllowedNets()  # this node's copy of the ALLOWED networks
        self.failfast = FailFast(self.backend)
        self.write_behind = WriteBehind(self)

    async def _call(self, op: Awaitable[T], write: bool = False) -> T:
        """Await a backend primitive: bounded by the session's deadline,
        skipped while the breaker is open, its errors a StoreError."""
        return await self.failfast.run(op, write, self.backend_errors, self.fatal)

    @staticmethod
    def fatal(exc: BaseException) -> bool:
        """Is *exc* a failure that does not heal by itself (a corrupt file)?"""
        return False

    # ------------------------------------------------------------ records

    async def _get(self, kind: Kind[R], key: str) -> R | None:
        (row,) = await self._call(self._get_rows([(kind, key)], self.clock()))
        return None if row is None else kind.decode(row)

    async def _put(self, kind: Kind[Any], items: Iterable[tuple[str, Any]]) -> int:
        """Store records, :data:`PUT_BATCH` per backend call; a record that
        is already dead is deleted instead.  Returns how many were stored."""
        stored = 0
        it = iter(items)
        while batch := list(itertools.islice(it, PUT_BATCH)):
            now = self.clock()
            rows = [(key, kind.encode(record)) for key, record in batch if record.expires > now]
            if rows:
                await self._call(self._put_rows(kind, rows, now), write=True)
            for key, record in batch:
                if record.expires <= now:
                    await self._call(self._delete(kind.name, key), write=True)
            stored += len(rows)
        return stored

    async def _list(self, kind: Kind[R], limit: int, prefix: str) -> list[tuple[str, R]]:
        rows = await self._call(self._scan_rows(kind, limit, prefix, self.clock()))
        return [(key, kind.decode(row)) for key, row in rows]

    async def get_triplet(self, key: str) -> Triplet | None:
        return await self._get(GREYLIST, key)

    async def get_greylist(self, key: str, net: str) -> tuple[Triplet | None, ClientNet | None]:
        """The triplet *key* and the auto-allowlist record of network *net*,
        read together (one round trip on Redis)."""
        triplet, client = await self._call(self._get_rows([(GREYLIST, key), (CLIENTS, net)], self.clock()))
        return (
            None if triplet is None else GREYLIST.decode(triplet),
            None if client is None else CLIENTS.decode(client),
        )

    async def get_greylist_allowed(
        self, key: str, net: str, ip: IPAddress
    ) -> tuple[Triplet | None, ClientNet | None, str | None]:
        """:meth:`get_greylist` plus the operator-allowlisted network (CIDR)
        that holds *ip*, or None.  The allowed networks are read in the same
        round trip as a version tag only; this node's copy of them is
        reloaded when the tag changed (an ``allow``/``delete`` anywhere)."""
        triplet, client, version = await self._call(
            self._get_rows([(GREYLIST, key), (CLIENTS, net), (ALLOWED, VERSION)], self.clock()))
        tag = None if version is None else ALLOWED.decode(version).added
        if tag != self._allowed.version:
            self._allowed = _AllowedNets(tag, await self.list_allowed())
        return (
            None if triplet is None else GREYLIST.decode(triplet),
            None if client is None else CLIENTS.decode(client),
            self._allowed.match(ip, self.clock()),
        )

    async def put_allowed(self, net: str, entry: AllowedNet) -> None:
        """Allowlist network *net* (CIDR, any prefix length)."""
        await self._put(ALLOWED, [(net, entry)])
        await self._bump_allowed()

    async def delete_allowed(self, net: str) -> bool:
        found = await self._call(self._delete(ALLOWED.name, net), write=True)
        await self._bump_allowed()
        return found

    async def list_allowed(self) -> list[tuple[str, AllowedNet]]:
        return [(k, a) for k, a in await self._list(ALLOWED, 1_000_000, "") if k not in (VERSION, CACHE_VERSION)]

    async def _bump_allowed(self) -> None:
        await self._put(ALLOWED, [(VERSION, AllowedNet(random.random(), math.inf))])

    async def put_triplet(self, key: str, triplet: Triplet) -> None:
        await self._put(GREYLIST, [(key, triplet)])

    async def put_triplets(self, items: Iterable[tuple[str, Triplet]]) -> int:
        """Bulk load (imports, benchmarks): batched, far fewer round trips
        than one :meth:`put_triplet` each; returns how many were stored."""
        return await self._put(GREYLIST, items)

    async def delete_triplet(self, key: str) -> bool:
        return await self._call(self._delete(GREYLIST.name, key), write=True)

    async def list_triplets(self, limit: int = 100, prefix: str = "") -> list[tuple[str, Triplet]]:
        """Up to *limit* live triplets whose key starts with *prefix*
        (``"192.0.2.0/"`` lists one client network's)."""
        return await self._list(GREYLIST, limit, prefix)

    async def get_client(self, net: str) -> ClientNet | None:
        return await self._get(CLIENTS, net)

    async def put_client(self, net: str, client: ClientNet) -> None:
        await self._put(CLIENTS, [(net, client)])

    async def put_clients(self, items: Iterable[tuple[str, ClientNet]]) -> int:
        """Bulk load of auto-allowlist records (imports); returns how many were stored."""
        return await self._put(CLIENTS, items)

    async def delete_client(self, net: str) -> bool:
        return await self._call(self._delete(CLIENTS.name, net), write=True)

    async def list_clients(self, limit: int = 100, prefix: str = "") -> list[tuple[str, ClientNet]]:
        return await self._list(CLIENTS, limit, prefix)

    # ------------------------------------------------------ allowlist cache

    async def get_cache(self, ip: str) -> dict[str, float]:
        """The live tests cached for *ip*: ``{test: expiry}`` (empty if none)."""
        return await self._call(self._get_tests(ip, self.clock()))

    async def put_cache(self, ip: str, tests: Mapping[str, float]) -> None:
        """Set the expiry of each test in *tests* for *ip*; other tests cached
        for *ip* are kept."""
        if tests:
            await self._call(self._put_tests(ip, {t: float(e) for t, e in tests.items()}, self.clock()), write=True)

    def put_cache_later(self, ip: str, tests: Mapping[str, float]) -> bool:
        """:meth:`put_cache` by the background writer, off the caller's
        path; False when its queue is full and the write was dropped."""
        return self.write_behind.put(ip, {t: float(e) for t, e in tests.items()})

    async def delete_cache(self, ip: str) -> bool:
        """Delete *ip*'s entry; every node's hot set forgets it (:meth:`cache_version`)."""
        found = await self._call(self._delete("cache", ip), write=True)
        await self._put(ALLOWED, [(CACHE_VERSION, AllowedNet(random.random(), math.inf))])
        return found

    async def cache_version(self) -> float | None:
        """A tag that changes with every :meth:`delete_cache`, here or at
        another node sharing the store (None before the first)."""
        (row,) = await self._call(self._get_rows([(ALLOWED, CACHE_VERSION)], self.clock()))
        return None if row is None else ALLOWED.decode(row).added

    async def list_cache(self, limit: int = 100, prefix: str = "") -> list[tuple[str, dict[str, float]]]:
        return await self._call(self._scan_tests(limit, prefix, self.clock()))

    # ------------------------------------------------------------ the rest

    async def hit_rate(self, key: str, window: float) -> int:
        """Count one hit for *key*; return the hits in its current window.

        A **fixed window** of *window* seconds that starts at the key's first
        hit and restarts with the first hit after it ends -- how Postfix's
        anvil(8) counts ``smtpd_client_connection_rate_limit`` per
        ``anvil_rate_time_unit``.
        """
        return await self._call(self._hit_rate(key, window, self.clock()), write=True)

    async def ping(self) -> None:
        """Return if the store answers -- and takes a write, where a
        backend can fail to write while it still reads (SQLite: a full disk,
        a read-only file); raise :class:`StoreError` if not."""
        await self._call(self._ping(), write=True)
        self.failfast.answered()

    def problem(self) -> str | None:
        """Why the store cannot be trusted now (skipped by the breaker, or
        its last write or read failed), or None."""
        return self.failfast.problem()

    async def purge_expired(self) -> int:
        """Remove dead records in small batches; return how many greylist,
        client and cache entries (one per IP and test) were removed."""
        return await self._call(self._purge(self.clock()), write=True)

    async def stats(self) -> StoreStats:
        return await self._call(self._stats())

    async def close(self) -> None:
        """Write what the background writer holds (within two deadlines), then close;
        not skipped by the breaker."""
        await self.write_behind.flush(self.failfast.limits.deadline * 2)
        try:
            await self._close()
        except self.backend_errors as exc:
            raise StoreError(f"{self.backend}: {exc}") from exc

    # ------------------------------------------------ backend primitives

    @abstractmethod
    async def _get_rows(self, requests: list[tuple[Kind[Any], str]], now: float) -> list[Row | None]:
        """The live row of each (kind, key), None where there is none."""

    @abstractmethod
    async def _put_rows(self, kind: Kind[Any], rows: list[tuple[str, Row]], now: float) -> None: ...

    @abstractmethod
    async def _delete(self, kind: str, key: str) -> bool:
        """*kind* is a :class:`Kind` name or ``"cache"``."""

    @abstractmethod
    async def _scan_rows(self, kind: Kind[Any], limit: int, prefix: str, now: float) -> list[tuple[str, Row]]: ...

    @abstractmethod
    async def _get_tests(self, ip: str, now: float) -> dict[str, float]: ...

    @abstractmethod
    async def _put_tests(self, ip: str, tests: dict[str, float], now: float) -> None: ...

    @abstractmethod
    async def _scan_tests(self, limit: int, prefix: str, now: float) -> list[tuple[str, dict[str, float]]]: ...

    @abstractmethod
    async def _hit_rate(self, key: str, window: float, now: float) -> int: ...

    @abstractmethod
    async def _ping(self) -> None: ...

    @abstractmethod
    async def _purge(self, now: float) -> int: ...

    @abstractmethod
    async def _stats(self) -> StoreStats: ...

    @abstractmethod
    async def _close(self) -> None: ...
