"""Operator commands on the configured state store.

``smtpguard greylist list|show KEY|allow NET-or-ADDR [--ttl D]|delete KEY|clients|purge|stats``
and ``smtpguard cache list|show IP|delete IP|purge|stats`` read the store
named by ``[state] url`` (SQLite file or Redis, so on a cluster every node
sees the same answer).  Output is a readable table; ``--json`` prints one
JSON document for scripts.  Times are shown in local time, as postgrey's
reports do.

Each command is a small async function taking the store and the config, so
tests call them directly; :func:`run` is the argparse glue.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import math
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

from .config import Config
from .net import client_network
from .options import parse_duration
from .store import AllowedNet, Store, open_store


def _when(t: float | None) -> str:
    if t is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _table(out: TextIO, header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
    for row in (header, *rows):
        out.write("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() + "\n")


class Admin:
    """The commands; *out* is where they print."""

    def __init__(self, store: Store, cfg: Config, out: TextIO, as_json: bool, clock: Callable[[], float]) -> None:
        self.store, self.cfg, self.out, self.as_json, self.clock = store, cfg, out, as_json, clock

    def _emit(self, doc: Any, header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
        if self.as_json:
            json.dump(doc, self.out, indent=2, sort_keys=True)
            self.out.write("\n")
        else:
            _table(self.out, header, rows)

    # ------------------------------------------------------------ greylist

    async def greylist_list(self, limit: int, prefix: str = "") -> int:
        items = await self.store.list_triplets(limit, prefix)
        self._emit(
            [{"key": k, **asdict(t)} for k, t in items],
            ("KEY", "FIRST SEEN", "LAST SEEN", "PASSED", "EXPIRES"),
            [(k, _when(t.first_seen), _when(t.last_seen), _when(t.passed_at), _when(t.expires)) for k, t in items],
        )
        return 0

    async def greylist_show(self, key: str) -> int:
        t = await self.store.get_triplet(key.lower())
        if t is None:
            self.out.write(f"no greylist entry {key}\n")
            return 1
        self._emit({"key": key.lower(), **asdict(t)}, ("FIELD", "VALUE"),
                   [("key", key.lower()), ("first_seen", _when(t.first_seen)), ("last_seen", _when(t.last_seen)),
                    ("passed_at", _when(t.passed_at)), ("expires", _when(t.expires)),
                    ("state", "passed" if t.passed_at is not None else "waiting for a retry")])
        return 0

    async def greylist_allow(self, what: str, ttl: float | None = None) -> int:
        """Allowlist a client address or network of any prefix length,
        stored exactly as given (host bits cleared); it does not expire
        unless *ttl* is given."""
        try:
            net = ipaddress.ip_network(what, strict=False)
        except ValueError:
            self.out.write(f"smtpguard: error: expected an IP address or network, got {what!r}\n")
            return 2
        if net.version == 6 and net.network_address.ipv4_mapped is not None and net.prefixlen >= 96:
            v4 = net.network_address.ipv4_mapped
            net = ipaddress.ip_network(f"{v4}/{net.prefixlen - 96}", strict=False)  # ::ffff:a.b.c.d is a.b.c.d
        now = self.clock()
        until = now + ttl if ttl is not None else math.inf
        await self.store.put_allowed(str(net), AllowedNet(now, until))
        self._emit({"allowed": str(net), "until": None if ttl is None else until}, ("ALLOWED", "UNTIL"),
                   [(str(net), "never" if ttl is None else _when(until))])
        return 0

    async def greylist_delete(self, key: str) -> int:
        """A triplet key, an allowlisted network (as stored, or an address:
        the most specific allowlisted network that holds it), or an
        auto-allowlist network."""
        deleted = await self._delete_client(key.strip())
        if deleted is None and await self.store.delete_triplet(key.lower()):
            deleted = key.lower()
        if deleted is None and await self.store.delete_client(key.lower()):
            deleted = key.lower()
        self.out.write(f"deleted: {deleted}\n" if deleted is not None else f"not found: {key}\n")
        return 0 if deleted is not None else 1

    async def _delete_client(self, what: str) -> str | None:
        try:
            net = ipaddress.ip_network(what, strict=False)
        except ValueError:
            return None
        candidates = [str(net)]
        if "/" not in what:  # an address: the allowlisted networks that hold it, most specific first
            nets = [(ipaddress.ip_network(k), k) for k, _ in await self.store.list_allowed()]
            candidates = [k for n, k in sorted(nets, key=lambda x: -x[0].prefixlen)
                          if n.version == net.version and net.network_address in n]
            g = self.cfg.greylist
            auto = client_network(net.network_address, g.ipv4_mask, g.ipv6_mask)
        for candidate in candidates:
            if await self.store.delete_allowed(candidate):
                return candidate
        if "/" not in what and await self.store.delete_client(auto):
            return auto
        return None

    async def greylist_import_postgrey(self, files: list[str]) -> int:
        """postgrey's ``db_dump -p`` output into the store (see smtpguard.policy.postgrey_import)."""
        from .policy.postgrey_import import DumpError, import_dumps

        try:
            dumps = [(f, sys.stdin.buffer.read() if f == "-" else Path(f).read_bytes()) for f in files]
            summary = await import_dumps(self.store, self.cfg.greylist, dumps, self.clock())
        except (OSError, DumpError) as exc:
            self.out.write(f"smtpguard: error: {exc}\n")
            return 1
        self._emit(asdict(summary), ("IMPORTED",), [(str(summary),)])
        return 0

    async def greylist_clients(self, limit: int) -> int:
        """The networks allowlisted by operators, then the auto-allowlist."""
        allowed = (await self.store.list_allowed())[:limit]
        items = await self.store.list_clients(limit)
        threshold = self.cfg.greylist.auto_allowlist_clients
        rows: list[tuple[str, ...]] = [
            (k, "-", _when(a.added), "never" if math.isinf(a.expires) else _when(a.expires), "yes (operator)")
            for k, a in allowed]
        rows += [(k, str(c.count), _when(c.last_counted), _when(c.expires),
                  "yes" if threshold and c.count >= threshold else "no") for k, c in items]
        self._emit(
            [{"network": k, "manual": True, "added": a.added, "expires": None if math.isinf(a.expires) else a.expires}
             for k, a in allowed] + [{"network": k, "manual": False, **asdict(c)} for k, c in items],
            ("NETWORK", "COUNT", "LAST COUNTED", "EXPIRES", "ALLOWLISTED"), rows,
        )
        return 0

    # ------------------------------------------------------------ cache

    async def cache_list(self, limit: int, prefix: str = "") -> int:
        items = await self.store.list_cache(limit, prefix)
        self._emit(
            [{"ip": ip, "tests": tests} for ip, tests in items],
            ("CLIENT", "TEST", "VALID UNTIL"),
            [(ip, test, _when(exp) if exp else "failed") for ip, tests in items for test, exp in sorted(tests.items())],
        )
        return 0

    async def cache_show(self, ip: str) -> int:
        tests = await self.store.get_cache(ip)
        if not tests:
            self.out.write(f"no allowlist cache entry for {ip}\n")
            return 1
        self._emit({"ip": ip, "tests": tests}, ("TEST", "VALID UNTIL"),
                   [(t, _when(e) if e else "failed") for t, e in sorted(tests.items())])
        return 0

    async def cache_delete(self, ip: str) -> int:
        found = await self.store.delete_cache(ip)
        self.out.write(f"{'deleted' if found else 'not found'}: {ip}\n")
        return 0 if found else 1

    # ------------------------------------------------------------ both

    async def purge(self) -> int:
        removed = await self.store.purge_expired()
        self._emit({"removed": removed}, ("REMOVED",), [(str(removed),)])
        return 0

    async def stats(self) -> int:
        st = await self.store.stats()
        self._emit(asdict(st), ("RECORDS", "COUNT"),
                   [("greylist triplets", str(st.greylist)), ("client networks", str(st.clients)),
                    ("allowlist cache clients", str(st.cache))])
        return 0


def _duration(text: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError("must be longer than 0s")
    return seconds


def add_parsers(sub: Any) -> None:
    """The ``greylist`` and ``cache`` sub-commands (each takes -c and --json)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config",
                        help="TOML configuration file (default: $SMTPGUARD_CONFIG, else /etc/smtpguard/smtpguard.toml)")
    common.add_argument("--json", action="store_true", help="print JSON")

    def leaf(parent: Any, name: str, text: str) -> Any:
        return parent.add_parser(name, help=text, parents=[common])

    g = sub.add_parser("greylist", help="inspect and edit greylisting state")
    gs = g.add_subparsers(dest="action", required=True)
    p = leaf(gs, "list", "list greylist triplets")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--prefix", default="", help="only keys starting with this (e.g. a network)")
    leaf(gs, "show", "show one triplet").add_argument("key", help="NETWORK/sender/recipient")
    p = leaf(gs, "allow", "allowlist a client address or network (any prefix), until deleted")
    p.add_argument("client", help="IP address or network: 192.0.2.7, 10.0.0.0/8, 2001:db8::/32")
    p.add_argument("--ttl", type=_duration, default=None, help="expire after this long (300s, 5m, 2h, 7d)")
    leaf(gs, "delete", "delete a triplet, an allowlisted network (or the one holding an address), "
         "or an auto-allowlist network").add_argument("key")
    leaf(gs, "clients", "list auto-allowlist client networks").add_argument("--limit", type=int, default=100)
    leaf(gs, "import-postgrey", "import postgrey's state from `db_dump -p` output").add_argument(
        "files", nargs="+", metavar="FILE", help="db_dump -p of postgrey.db and/or postgrey_clients.db ('-': stdin)")
    c = sub.add_parser("cache", help="inspect and edit the allowlist cache (postscreen's temporary allowlist)")
    cs = c.add_subparsers(dest="action", required=True)
    p = leaf(cs, "list", "list cached clients and their tests")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--prefix", default="")
    leaf(cs, "show", "show one client").add_argument("ip")
    leaf(cs, "delete", "forget one client").add_argument("ip")
    for parent in (gs, cs):
        leaf(parent, "purge", "remove expired records now")
        leaf(parent, "stats", "count stored records")


def dispatch(admin: Admin, args: argparse.Namespace) -> Awaitable[int]:
    a = args.action
    if args.command == "greylist":
        table: dict[str, Callable[[], Awaitable[int]]] = {
            "list": lambda: admin.greylist_list(args.limit, args.prefix),
            "show": lambda: admin.greylist_show(args.key),
            "allow": lambda: admin.greylist_allow(args.client, args.ttl),
            "delete": lambda: admin.greylist_delete(args.key),
            "clients": lambda: admin.greylist_clients(args.limit),
            "import-postgrey": lambda: admin.greylist_import_postgrey(args.files),
        }
    else:
        table = {
            "list": lambda: admin.cache_list(args.limit, args.prefix),
            "show": lambda: admin.cache_show(args.ip),
            "delete": lambda: admin.cache_delete(args.ip),
        }
    table |= {"purge": admin.purge, "stats": admin.stats}
    return table[a]()


async def run(cfg: Config, args: argparse.Namespace) -> int:
    store = await open_store(cfg.state.url)
    try:
        return await dispatch(Admin(store, cfg, sys.stdout, args.json, time.time), args)
    finally:
        await store.close()
