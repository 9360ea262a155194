"""Greylist decision throughput and latency on a store holding many triplets.

    python bench/greylist.py --backend sqlite --backend redis \\
        --triplets 1000000 --decisions 20000 [--redis-url redis://127.0.0.1:6379/0]

How it works: for each backend, preload ``--triplets`` passed triplets with
the store's bulk path (:meth:`Store.put_triplets`: multi-row statements /
pipelines, not one await per triplet), then time ``--decisions`` calls of
the public check path, :func:`smtpguard.checks.greylist.check_greylist`,
with the default ``[greylist]`` settings (so each decision also looks up the
auto-allowlist).  The mix: 80% retries of stored triplets, 20% new triplets
(which are deferred and written).  Stored triplets were last seen up to 35
days ago, so most hits also rewrite the triplet -- the expensive case.
``--concurrency`` decisions are in flight at once, as with that many SMTP
sessions at RCPT TO.  The store is closed and reopened between the two
phases, so decisions are timed on a settled database (SQLite has
checkpointed the bulk load), as after a restart.  Prints one line per
backend; asserts nothing.

``--spf`` adds two SQLite runs with ``[greylist] spf_key`` on: every sender
is in ``pool.bench.test``, whose SPF record (an ``include`` of a record with
``ip4:198.18.0.0/15``) authorizes every client, served by a private dnsmasq
on loopback through smtpguard's resolver; each decision evaluates SPF
(:func:`smtpguard.spf.evaluate`) and keys the triplet by the domain.  "cached
domain": the resolver's cache holds the answers (as for a sender seen in the
last TTL); "uncached domain": the resolver's cache is off, so each decision
asks dnsmasq both TXT questions.  Triplets are preloaded with the domain key.

SQLite goes to a fresh file in a temporary directory (``--db`` to choose);
Redis keys go under ``smtpguard-bench:`` -- point ``--redis-url`` at a
throw-away server on loopback.  All addresses are made-up strings
(198.18.0.0/15, the benchmarking range); no traffic leaves the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from smtpguard import spf  # noqa: E402
from smtpguard.checks.greylist import GreylistConfig, check_greylist, triplet_key  # noqa: E402
from smtpguard.dns import DnsConfig, DnsResolver  # noqa: E402
from smtpguard.net import client_network, parse_ip  # noqa: E402
from smtpguard.store import Store, Triplet, open_store  # noqa: E402

CFG = GreylistConfig(enabled=True)  # off by default in a configuration
PREFIX = "smtpguard-bench:"
BASE = int(ipaddress.IPv4Address("198.18.0.0"))
NEW_SHARE = 0.2


def client(i: int) -> str:
    """Triplet *i*'s client: one of 512 /24 networks of 198.18.0.0/15."""
    return str(ipaddress.IPv4Address(BASE + ((i % 512) << 8) + 1 + i % 250))


def envelope(i: int, spf: bool = False) -> tuple[str, str]:
    return f"sender{i}@{SPF_DOMAIN if spf else 'bench.example'}", f"rcpt{i % 1000}@example.net"


SPF_DOMAIN = "pool.bench.test"
SPF_RECORDS = [f"--txt-record={SPF_DOMAIN},v=spf1 include:_spf.{SPF_DOMAIN} -all",
               f"--txt-record=_spf.{SPF_DOMAIN},v=spf1 ip4:198.18.0.0/15 -all", "--local-ttl=3600"]


def preloaded(n: int, now: float, spf: bool = False) -> Iterator[tuple[str, Triplet]]:
    rng = random.Random(1)
    for i in range(n):
        last = now - rng.uniform(0, 35 * 86400 - 3600)
        net = SPF_DOMAIN if spf else client_network(ipaddress.ip_address(client(i)), CFG.ipv4_mask, CFG.ipv6_mask)
        yield triplet_key(net, *envelope(i, spf)), Triplet(last - 600, last, last - 300, last + CFG.max_age)


async def run(store: Store, triplets: int, decisions: int, concurrency: int,
              resolver: DnsResolver | None = None) -> tuple[float, list[float]]:
    """Time *decisions* greylist checks (with an SPF evaluation each when
    *resolver* is given); returns (elapsed, latencies)."""
    rng = random.Random(2)
    work = iter(rng.randrange(triplets) if rng.random() >= NEW_SHARE else triplets + n for n in range(decisions))
    latencies: list[float] = []

    async def worker() -> None:
        for i in work:
            text = client(i)
            ip, (sender, recipient) = parse_ip(text), envelope(i, resolver is not None)
            start = time.perf_counter()
            domain = None
            if resolver is not None:
                found = await spf.evaluate(resolver, text, sender, "helo.bench.test")
                assert found.passed, found
                domain = found.domain
            await check_greylist(store, CFG, ip, "unknown", sender, recipient, time.time(), client_part=domain)
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - start, latencies


async def bench(backend: str, url: str, args: argparse.Namespace, nameserver: tuple[str, int] | None = None,
                cached: bool = True) -> str:
    store = await open_store(url, redis_prefix=PREFIX)
    try:
        start = time.perf_counter()
        loaded = await store.put_triplets(preloaded(args.triplets, time.time(), nameserver is not None))
        load_time = time.perf_counter() - start
    finally:
        await store.close()  # SQLite: checkpoints the bulk load, as a server restart would find it
    resolver, label, decisions = None, backend, args.decisions
    if nameserver is not None:
        resolver = DnsResolver(DnsConfig(nameservers=(nameserver,), cache_size=10000 if cached else 0))
        if cached:
            assert (await spf.evaluate(resolver, client(0), envelope(0, True)[0], "helo.bench.test")).passed
        label = f"{backend} + SPF ({'cached' if cached else 'uncached'} domain)"
        decisions = decisions if cached else max(1000, decisions // 4)
    store = await open_store(url, redis_prefix=PREFIX)
    try:
        elapsed, latencies = await run(store, args.triplets, decisions, args.concurrency, resolver)
    finally:
        await store.close()
    cuts = statistics.quantiles(latencies, n=100)
    return (
        f"{label}: {loaded} triplets preloaded in {load_time:.1f}s; "
        f"{len(latencies)} decisions in {elapsed:.2f}s = {len(latencies) / elapsed:,.0f}/s, "
        f"p50 {cuts[49] * 1000:.2f} ms, p99 {cuts[98] * 1000:.2f} ms (concurrency {args.concurrency})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", action="append", choices=("sqlite", "redis"), help="repeatable (default sqlite)")
    parser.add_argument("--triplets", type=int, default=1_000_000)
    parser.add_argument("--decisions", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=8, help="decisions in flight at once (default 8)")
    parser.add_argument("--redis-url", help="default: a private redis-server on a free loopback port, "
                                            "started and stopped by this script")
    parser.add_argument("--db", help="SQLite file (default: in a new temporary directory)")
    parser.add_argument("--spf", action="store_true", help="also SQLite with [greylist] spf_key: a cached and an "
                                                          "uncached SPF domain (a private dnsmasq on loopback)")
    args = parser.parse_args()
    backends = args.backend or ["sqlite"]
    with tempfile.TemporaryDirectory(prefix="smtpguard-bench-") as tmp, contextlib.ExitStack() as stack:
        redis_url = args.redis_url
        if "redis" in backends and not redis_url:
            from tests.lab import RedisServer

            redis_url = stack.enter_context(RedisServer()).url
        urls = {"sqlite": f"sqlite:///{Path(args.db or Path(tmp) / 'bench.db').resolve()}", "redis": redis_url}
        for backend in backends:
            print(asyncio.run(bench(backend, urls[backend], args)), flush=True)
        if args.spf:
            from tests.lab import DnsServer

            dns = stack.enter_context(DnsServer(SPF_RECORDS, log_queries=False))
            dns.start()
            for n, cached in enumerate((True, False)):
                url = f"sqlite:///{(Path(tmp) / f'bench-spf{n}.db').resolve()}"
                print(asyncio.run(bench("sqlite", url, args, (dns.address, dns.port), cached)), flush=True)


if __name__ == "__main__":
    main()
