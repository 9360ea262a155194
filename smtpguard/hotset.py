"""The allowlist cache's hot set: PASS OLD answered from process memory.

postscreen keeps its temporary allowlist in a local table; smtpguard keeps
it in the state store (SQLite, or a Redis several nodes share), so a PASS
OLD lookup is a store read -- a SQLite query, or a Redis round trip -- on
every connection of a regular sender.  :class:`HotSet` remembers, per
client address, until when this node may answer PASS OLD without asking:

* only a PASS OLD is kept (every enabled test valid): a client with a test
  still to do is always read from the store, so a PASS another node wrote
  (shared Redis) counts at this node's next connection of that client;
* an entry lasts until the first of its tests expires (the store's own
  expiry, never longer) and at most :data:`HOT_TTL` after it was read:
  what changed at another node (a test the client failed there) reaches
  this one within that time;
* ``smtpguard cache delete`` (on any node, or the command line) bumps a
  version tag in the store; every node reads the tag at most once a second
  (:data:`CHECK_INTERVAL`) on the connection path and drops its hot set when
  the tag changed;
* a test this node records for a client (a failure) drops its entry: writes
  go to the store as before (written through), the hot set never holds
  what the store does not;
* at most :data:`HOT_SIZE` clients (the oldest entry goes first), about
  150 bytes each.

The hot set belongs to the pipeline, so a reload (which may enable other
tests) starts an empty one.  It does no I/O itself: the pipeline reads the
version tag and tells it (:meth:`version`).
"""

from __future__ import annotations

#: how long a PASS OLD read from the store is answered from memory, at most
HOT_TTL = 10.0
#: how often (seconds) the store's invalidation tag is read
CHECK_INTERVAL = 1.0
#: clients kept at most
HOT_SIZE = 10_000


class HotSet:
    """Client address -> until when PASS OLD may be answered without the store."""

    __slots__ = ("_until", "_size", "_ttl", "_version", "next_check")

    def __init__(self, size: int = HOT_SIZE, ttl: float = HOT_TTL) -> None:
        self._until: dict[str, float] = {}
        self._size = size
        self._ttl = ttl
        self._version: object = None
        self.next_check = 0.0  # when the store's version tag is to be read again

    def __len__(self) -> int:
        return len(self._until)

    def passed(self, ip: str, now: float) -> bool:
        """True while *ip* is PASS OLD here."""
        until = self._until.get(ip)
        if until is None:
            return False
        if until > now:
            return True
        del self._until[ip]
        return False

    def remember(self, ip: str, expires: float, now: float) -> None:
        """*ip* is PASS OLD until *expires* (its first test's expiry)."""
        until = min(expires, now + self._ttl)
        if until <= now:
            return
        entries = self._until
        entries.pop(ip, None)  # re-inserted last: the oldest entries go first
        if len(entries) >= self._size:
            del entries[next(iter(entries))]
        entries[ip] = until

    def forget(self, ip: str) -> None:
        self._until.pop(ip, None)

    def version(self, tag: object, now: float) -> None:
        """The store's invalidation tag as read at *now*: a new one empties the set."""
        if tag != self._version:
            self._version = tag
            self._until.clear()
        self.next_check = now + CHECK_INTERVAL
