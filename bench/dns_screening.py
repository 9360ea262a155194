"""DNS screening throughput, and the latency it adds beyond the greet wait.

    python bench/dns_screening.py [--clients 5000] [--concurrency 200]
                        [--greet-wait 0.2] [--rate 100] [--seconds 10]

How it works: starts a private dnsmasq on a loopback port (the test lab's
:class:`tests.lab.DnsServer`) serving, from a generated hosts file, one
host name per client address (A + PTR, so FCrDNS succeeds) for two thirds
of the clients -- the rest have no PTR -- and DNSBL listings for every
tenth client.  Each simulated connection goes through the real
:class:`~smtpguard.pipeline.Pipeline` as the listener drives it:
``on_connect`` (which starts the DNSBL lookups, 3 sites, and the PTR +
forward lookups in the background), the greet wait, then ``on_banner``
(which collects them and judges the DNSBL score and the client name).
Every client has a fresh address (198.18.0.0/15, the benchmarking range),
so no answer comes from smtpguard's cache.

Two runs, each with a new resolver:

* **throughput**: ``--concurrency`` connections at a time, no greet wait
  (the DNSBL answers are waited for up to the default 6s); new clients
  screened per second, and the DNS queries that took.
* **greet wait**: ``--rate`` new connections per second for ``--seconds``;
  each starts its lookups, sleeps ``--greet-wait`` (the configured greet
  wait), then collects.  Reported: how long after the wait the results were
  ready (0 when the answers beat the wait, the goal at any load the
  throughput run shows to be sustainable), and how many clients had a list
  that had not answered by the end of the wait (scored as not listed).

Prints the figures; asserts nothing.  Only loopback traffic.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from smtpguard.config import from_dict  # noqa: E402
from smtpguard.dns import DnsResolver, reversed_ip  # noqa: E402
from smtpguard.net import parse_ip  # noqa: E402
from smtpguard.pipeline import Pipeline  # noqa: E402
from smtpguard.session import Session  # noqa: E402
from tests.lab import DnsServer  # noqa: E402

BASE = int(ipaddress.IPv4Address("198.18.0.0"))
SITES = ("zen.bench=127.0.0.[2..11]*3", "bl.bench", "wl.bench=127.0.[0..255].[1..3]*-1")


def client(i: int) -> str:
    return str(ipaddress.IPv4Address(BASE + 1 + i))


def hosts_file(path: Path, clients: int) -> None:
    """A + PTR for two clients in three, a zen.bench listing for one in ten."""
    lines = []
    for i in range(clients):
        ip = client(i)
        if i % 3:
            lines.append(f"{ip} c{i}.bench.test")
        if i % 10 == 0:
            lines.append(f"127.0.0.2 {reversed_ip(parse_ip(ip))}.zen.bench")
    path.write_text("\n".join(lines) + "\n")


async def screen(pipeline: Pipeline, ip: str, greet_wait: float) -> float:
    """One connection: connect, wait, banner; seconds after the wait."""
    s = Session(parse_ip(ip), 40000, "127.0.0.1", 25)
    await pipeline.on_connect(s, 1, 1)
    if greet_wait:
        await asyncio.sleep(greet_wait)
    waited = time.perf_counter()
    await pipeline.on_banner(s)
    return time.perf_counter() - waited


def setup(server: DnsServer, greet_wait: float = 6.0) -> Pipeline:
    """A pipeline with a fresh resolver (empty cache) on *server*, 3 DNSBL
    sites and reject_unknown_reverse_client_hostname."""
    cfg = from_dict({
        "dns": {"nameservers": [f"{server.address}:{server.port}"], "timeout": "2s", "lifetime": "5s"},
        "dnsbl": {"enabled": True, "sites": list(SITES)},
        "client_name": {"enabled": True},
        "pregreet": {"greet_wait": greet_wait},
    })
    return Pipeline(cfg, resolver=DnsResolver(cfg.dns))


class LateLists(logging.Handler):
    """Counts the clients whose score missed a list (``list=lookup failed``)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += "lookup failed" in record.getMessage()


async def closed_loop(server: DnsServer, first: int, clients: int, concurrency: int) -> None:
    """Screen *clients* with *concurrency* at once, no greet wait."""
    pipeline = setup(server)
    slots = asyncio.Semaphore(concurrency)

    async def one(i: int) -> float:
        async with slots:
            return await screen(pipeline, client(i), 0.0)

    await asyncio.gather(*(one(i) for i in range(first, first + clients)))


async def open_loop(
    server: DnsServer, first: int, clients: int, rate: float, greet_wait: float
) -> tuple[list[float], float]:
    """*clients* connections arriving at *rate* per second, each waiting
    *greet_wait*; returns how long after its wait each one's results came,
    and the arrival rate achieved (lower than *rate* when the loop lags)."""
    pipeline = setup(server, greet_wait)
    loop = asyncio.get_running_loop()
    start = loop.time()
    sessions = []
    for k in range(clients):
        await asyncio.sleep(max(0.0, start + k / rate - loop.time()))
        sessions.append(asyncio.create_task(screen(pipeline, client(first + k), greet_wait)))
    achieved = clients / max(loop.time() - start, 1e-9) if clients > 1 else rate
    return list(await asyncio.gather(*sessions)), achieved


def queries_per_client(clients: int) -> float:
    """3 DNSBL A + 1 PTR + (A for the PTR name when there is one)."""
    with_ptr = sum(1 for i in range(clients) if i % 3)
    return 4 + with_ptr / clients


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=5000, help="connections in the throughput run (5000)")
    parser.add_argument("--concurrency", type=int, default=200, help="connections screened at once (200)")
    parser.add_argument("--greet-wait", type=float, default=0.2, help="simulated greet wait, seconds (0.2)")
    parser.add_argument("--rate", type=float, default=100.0, help="new connections/s in the greet-wait run (100)")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the greet-wait run (10)")
    args = parser.parse_args()
    waiting = int(args.rate * args.seconds)

    with tempfile.TemporaryDirectory(prefix="smtpguard-bench-dns-") as tmp:
        hosts = Path(tmp) / "hosts"
        hosts_file(hosts, args.clients + waiting)
        with DnsServer([f"--addn-hosts={hosts}"], log_queries=False) as server:
            print(f"dnsmasq on {server.address}:{server.port}; {len(SITES)} DNSBL sites + PTR + FCrDNS per client")

            started = time.perf_counter()
            asyncio.run(closed_loop(server, 0, args.clients, args.concurrency))
            elapsed = time.perf_counter() - started
            rate = args.clients / elapsed
            qpc = queries_per_client(args.clients)
            print(
                f"throughput: {args.clients} fresh clients in {elapsed:.2f}s = {rate:.0f} clients/s "
                f"({rate * qpc:.0f} DNS queries/s, {qpc:.2f} per client), concurrency {args.concurrency}"
            )

            late_lists = LateLists()
            log = logging.getLogger("smtpguard")
            log.setLevel(logging.INFO)
            log.addHandler(late_lists)
            log.propagate = False
            late, achieved = asyncio.run(open_loop(server, args.clients, waiting, args.rate, args.greet_wait))
            ms = sorted(x * 1000 for x in late)
            ready = sum(1 for x in ms if x < 1.0)
            print(
                f"greet wait {args.greet_wait * 1000:.0f} ms, {args.rate:.0f} new clients/s for {args.seconds:g}s "
                f"(achieved {achieved:.0f}/s): "
                f"results ready after the wait: median {statistics.median(ms):.2f} ms, "
                f"p99 {ms[int(len(ms) * 0.99) - 1]:.2f} ms, max {ms[-1]:.2f} ms; "
                f"{ready}/{len(ms)} clients had them before the wait ended (< 1 ms), "
                f"{late_lists.count} had a list answer too late (scored as not listed)"
            )


if __name__ == "__main__":
    main()
