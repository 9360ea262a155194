"""``smtpguard greylist import-postgrey FILE...``: postgrey's learned state into
the configured store, so that switching keeps its triplets and its
auto-allowlisted clients.

postgrey keeps two BerkeleyDB files in its ``--dbdir``
(``/var/lib/postgrey`` on Debian); ``db_dump -p`` (Debian: ``db5.3_dump``,
package ``db5.3-util``) prints them as text::

    db_dump -p /var/lib/postgrey/postgrey.db > postgrey.txt
    db_dump -p /var/lib/postgrey/postgrey_clients.db > postgrey_clients.txt

Each record is a key line and a value line, each starting with one space,
between ``HEADER=END`` and ``DATA=END``; a byte that is not printable is
written ``\\xx`` (two hex digits) and a backslash ``\\\\``.

* ``postgrey.db``: ``net/sender/recipient`` -> ``first,last[,host]``.  The
  key is smtpguard's own triplet key (same masking, same sender
  substitutions); a triplet whose last attempt came ``delay`` or more after
  its first has passed (postgrey's ``last_was_successful``).  It then lives
  ``max_age`` after ``last``; one still waiting lives ``retry_window`` after it.
* ``postgrey_clients.db``: client address -> ``count,last``; smtpguard keys
  the auto-allowlist by network, so the addresses of one network are merged
  (highest count, latest time); it lives ``max_age`` after ``last``.

Keys hashed by postgrey's ``--privacy`` cannot be mapped and are skipped,
as are records already expired; the summary says how many.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from ..checks.greylist import GreylistConfig
from ..net import client_network
from ..store import ClientNet, Store, Triplet

_ESCAPE = re.compile(rb"\\(\\|[0-9a-fA-F]{2})")


class DumpError(ValueError):
    """Not ``db_dump -p`` output."""


def _unescape(line: bytes) -> str:
    raw = _ESCAPE.sub(lambda m: b"\\" if m.group(1) == b"\\" else bytes([int(m.group(1), 16)]), line)
    return raw.decode("utf-8", "surrogateescape")


def records(text: bytes, source: str = "-") -> Iterator[tuple[str, str]]:
    """The (key, value) pairs of ``db_dump -p`` output (several dumps may follow each other)."""
    in_data = False
    pending: str | None = None
    headers = 0
    for number, line in enumerate(text.splitlines(), 1):
        if not in_data:
            if line == b"HEADER=END":
                in_data, headers = True, headers + 1
            elif line and b"=" not in line:
                raise DumpError(f"{source}:{number}: not db_dump -p output (no name=value header line)")
            continue
        if line == b"DATA=END":
            if pending is not None:
                raise DumpError(f"{source}:{number}: a key without a value")
            in_data = False
            continue
        if not line.startswith(b" "):
            raise DumpError(f"{source}:{number}: a data line must start with a space (db_dump -p, not -r)")
        item = _unescape(line[1:])
        if pending is None:
            pending = item
        else:
            yield pending, item
            pending = None
    if headers == 0:
        raise DumpError(f"{source}: no HEADER=END line: not db_dump -p output")
    if in_data:
        raise DumpError(f"{source}: no DATA=END line: the dump is cut short")


@dataclass
class ImportSummary:
    triplets: int = 0
    passed: int = 0
    clients: int = 0
    skipped_hashed: int = 0
    skipped_bad: int = 0
    expired: int = 0

    def __str__(self) -> str:
        return (f"imported {self.triplets} triplet(s) ({self.passed} passed) and {self.clients} auto-allowlist "
                f"network(s); skipped {self.expired} expired, {self.skipped_hashed} hashed (--privacy), "
                f"{self.skipped_bad} unreadable")


def _times(value: str) -> tuple[float, float] | None:
    parts = value.split(",")
    try:
        return float(parts[0]), float(parts[1])
    except (ValueError, IndexError):
        return None


def convert(pairs: Iterable[tuple[str, str]], cfg: GreylistConfig, now: float,
            summary: ImportSummary) -> tuple[list[tuple[str, Triplet]], dict[str, ClientNet]]:
    """postgrey's records as smtpguard's (see the module docstring)."""
    triplets: list[tuple[str, Triplet]] = []
    clients: dict[str, ClientNet] = {}
    for key, value in pairs:
        times = _times(value)
        if times is None:
            summary.skipped_bad += 1
            continue
        first, last = times
        if "/" in key:
            passed = last - first >= cfg.delay
            expires = last + (cfg.max_age if passed else cfg.retry_window)
            if expires <= now:
                summary.expired += 1
                continue
            triplets.append((key.lower(), Triplet(first, last, last if passed else None, expires)))
            summary.passed += passed
            continue
        try:
            ip = ipaddress.ip_address(key)
        except ValueError:
            if re.fullmatch(r"[0-9a-f]{40}", key):
                summary.skipped_hashed += 1
            else:
                summary.skipped_bad += 1
            continue
        count, last_counted = int(first), last
        if last_counted + cfg.max_age <= now:
            summary.expired += 1
            continue
        net = client_network(ip, cfg.ipv4_mask, cfg.ipv6_mask)
        old = clients.get(net)
        if old is not None:
            count, last_counted = max(count, old.count), max(last_counted, old.last_counted)
        clients[net] = ClientNet(count, last_counted, last_counted + cfg.max_age)
    return triplets, clients


async def import_dumps(store: Store, cfg: GreylistConfig, dumps: Iterable[tuple[str, bytes]],
                       now: float) -> ImportSummary:
    """Read every dump first (a bad file imports nothing), then store."""
    summary = ImportSummary()
    pairs = [pair for source, text in dumps for pair in records(text, source)]
    triplets, clients = convert(pairs, cfg, now, summary)
    summary.triplets = await store.put_triplets(triplets)
    summary.clients = await store.put_clients(clients.items())
    return summary
