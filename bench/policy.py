"""Policy service throughput and latency, as Postfix's smtpd processes use it.

    python bench/policy.py --backend sqlite --backend redis \\
        [--clients 50] [--requests 20000] [--triplets 100000] [--rounds 3] \\
        [--rate 5000] [--postgrey PATH | --no-postgrey]

How it works: for each backend, preload ``--triplets`` passed greylist
triplets into a fresh store (the store's bulk path), start ``smtpguard
policy`` as a real subprocess (greylisting at RCPT, default settings, one
``policy: ...`` log line per request written to a file, as in production),
then open ``--clients`` connections that each behave like one Postfix smtpd
process: send a whole RCPT request as smtpd writes it, wait for the answer,
send the next (never more than one in flight per connection).  The mix:
80% requests for stored triplets (``DUNNO``), 20% new triplets
(``DEFER_IF_PERMIT``, a store write).  Latency is measured at the client,
from the request's first byte to the answer's last.  ``--rounds`` rounds
per backend, backends interleaved; prints the median round and each
round's figures; asserts nothing.  The client runs in this process and
shares the machine's CPUs with the service: the figures are a lower bound.

SQLite goes to a temporary directory; Redis is a private ``redis-server``
on a free loopback port (``--redis-url`` for another throw-away one).  All
addresses are made-up (198.18.0.0/15, the benchmarking range); no traffic
leaves the machine.

postgrey, the reference (Debian's ``postgrey`` package; ``make bench``
installs it through ``tests/sysdeps.sh --bench``; skipped with a note when
it is missing, or with ``--no-postgrey``): the same load in the same run,
its rounds interleaved with smtpguard's, against a ``postgrey`` process the
bench starts itself (``--inet`` on a free loopback port, ``--dbdir`` in the
temporary directory, ``--user``/``--group`` the bench's own, empty
``--whitelist-clients``/``--whitelist-recipients`` files as smtpguard runs
without its default client allowlist, the rest postgrey's defaults:
``--delay=300``, ``--auto-whitelist-clients=5``, its log lines on stderr
into a file).  Its preload goes through postgrey's own code: each stored
triplet is requested once with ``policy_test_time`` (the attribute
postgrey's ``policy-test`` script sets to choose the request's time) an
hour ago, then again a minute ago, so postgrey keeps it as a triplet that
passed its delay -- what smtpguard's preload stores -- and answers
``DUNNO`` to it in the measured rounds.  postgrey rewrites a triplet's
record on every request, known or new (BerkeleyDB, transactional); it is
one process, one request at a time.

Goal (issue 15): >= 5,000 requests/s on SQLite with p99 <= 5 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import grp
import os
import pwd
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from smtpguard.store import Triplet, open_store  # noqa: E402
from tests.lab import free_port, wait_until, which  # noqa: E402

REDIS_PREFIX = "smtpguard:"  # the service's own prefix: the preload must be where it looks


def client_ip(i: int) -> str:
    return f"198.18.{(i >> 8) & 255}.{i & 255}"


def triplet(i: int) -> tuple[str, str, str]:
    return client_ip(i % 50000), f"sender{i}@bench.example", f"rcpt{i % 97}@example.test"


def request(i: int, n: int, extra: str = "") -> bytes:
    ip, sender, rcpt = triplet(i)
    return (f"request=smtpd_access_policy\n{extra}protocol_state=RCPT\nprotocol_name=ESMTP\nclient_address={ip}\n"
            f"client_name=unknown\nreverse_client_name=unknown\nclient_port={40000 + n % 20000}\n"
            f"helo_name=mx{i}.bench.example\nsender={sender}\nrecipient={rcpt}\nrecipient_count=0\nqueue_id=\n"
            f"instance={n:x}.bench\nsize=0\netrn_domain=\nstress=\nsasl_method=\nsasl_username=\nsasl_sender=\n"
            f"ccert_subject=\nccert_issuer=\nccert_fingerprint=\nccert_pubkey_fingerprint=\n"
            f"encryption_protocol=\nencryption_cipher=\nencryption_keysize=0\npolicy_context=\n"
            f"server_address=127.0.0.1\nserver_port=25\ncompatibility_level=3.6\nmail_version=3.7.11\n\n"
            ).encode()


async def preload(url: str, n: int) -> None:
    import ipaddress

    from smtpguard.checks.greylist import triplet_key
    from smtpguard.net import client_network

    store = await open_store(url)
    now = time.time()
    items = []
    for i in range(n):
        ip, sender, rcpt = triplet(i)
        key = triplet_key(client_network(ipaddress.ip_address(ip), 24, 64), sender, rcpt)
        items.append((key, Triplet(now - 3600, now - 60, now - 60, now + 30 * 86400)))
    await store.put_triplets(items)
    await store.close()


async def load(port: int, clients: int, requests: int, known: int,
               rate: float = 0.0) -> tuple[float, list[float], dict[str, int]]:
    """*rate* > 0: open loop, the clients together send *rate* requests/s
    (each waits for its answer, so a slow service shows as latency);
    0: closed loop, each client sends as soon as it has its answer."""
    rng = random.Random(15)
    plan = [rng.randrange(known) if rng.random() < 0.8 else known + 10_000_000 + n for n in range(requests)]
    latencies: list[float] = []
    actions: dict[str, int] = {}
    position = 0

    loop = asyncio.get_running_loop()
    start = loop.time() + 0.05

    async def one_client() -> None:
        nonlocal position
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while position < len(plan):
                n = position
                position += 1
                data = request(plan[n], n)
                if rate:
                    delay = start + n / rate - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                t0 = time.perf_counter()
                writer.write(data)
                answer = await reader.readuntil(b"\n\n")
                latencies.append(time.perf_counter() - t0)
                word = answer[7:].split(b" ", 1)[0].strip().decode()
                actions[word] = actions.get(word, 0) + 1
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(clients)))
    return time.perf_counter() - t0, latencies, actions


async def preload_postgrey(port: int, n: int, clients: int) -> None:
    """Each triplet 0..n-1 seen an hour ago and retried a minute ago, at
    those times by postgrey's ``policy_test_time`` (see the docstring)."""
    now = int(time.time())
    todo = iter(range(n))
    wrong: dict[str, int] = {}

    async def one_client() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for i in todo:
                for when, expect in ((now - 3600, b"action=DEFER_IF_PERMIT "), (now - 60, b"action=PREPEND ")):
                    writer.write(request(i, i, f"policy_test_time={when}\n"))
                    answer = await reader.readuntil(b"\n\n")
                    if not answer.startswith(expect):
                        key = answer.decode(errors="replace").strip()
                        wrong[key] = wrong.get(key, 0) + 1
        finally:
            writer.close()

    await asyncio.gather(*(one_client() for _ in range(clients)))
    if wrong:
        raise SystemExit(f"postgrey preload: unexpected answers {wrong}")


def start_postgrey(tmp: Path, postgrey: str, name: str) -> tuple[subprocess.Popen[bytes], int, Path]:
    port = free_port()
    dbdir = tmp / "postgrey"
    dbdir.mkdir(exist_ok=True)
    empty = tmp / "postgrey-empty-whitelist"
    empty.touch()
    log = tmp / f"{name}.log"
    with log.open("ab") as out:
        proc = subprocess.Popen([postgrey, f"--inet=127.0.0.1:{port}", f"--dbdir={dbdir}",
                                 f"--user={pwd.getpwuid(os.getuid()).pw_name}",
                                 f"--group={grp.getgrgid(os.getgid()).gr_name}",
                                 f"--whitelist-clients={empty}", f"--whitelist-recipients={empty}"],
                                stdout=out, stderr=subprocess.STDOUT)

    def listening() -> bool:
        if proc.poll() is not None:
            return True
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
        return False

    wait_until(listening, timeout=30, what="postgrey")
    if proc.poll() is not None:
        raise SystemExit(f"postgrey exited:\n{log.read_text()}")
    return proc, port, log


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, once more after 10 s, then SIGKILL: postgrey 1.37 has been
    seen to stay in its select loop after one SIGTERM (the second ends it);
    a killed postgrey's BerkeleyDB environment is recovered at its next
    start (it opens it with DB_RECOVER)."""
    for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGKILL):
        proc.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
            return
        print(f"policy: {Path(str(proc.args[0])).name} still running 10 s after {sig.name}", file=sys.stderr)
    raise SystemExit(f"policy: cannot stop {proc.args}")


def start_service(tmp: Path, url: str, name: str) -> tuple[subprocess.Popen[bytes], int, Path]:
    port = free_port()
    config = tmp / f"{name}.toml"
    config.write_text(f'[policy]\nlisten = "127.0.0.1:{port}"\n[state]\nurl = "{url}"\n[metrics]\nlisten = ""\n'
                      "[greylist]\nuse_default_client_allowlist = false\n")
    log = tmp / f"{name}.log"
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "smtpguard", "policy", "-c", str(config)],
                                stdout=out, stderr=subprocess.STDOUT)
    wait_until(lambda: "daemon started" in log.read_text(errors="replace") or proc.poll() is not None,
               timeout=30, what="smtpguard policy")
    if proc.poll() is not None:
        raise SystemExit(f"smtpguard policy exited:\n{log.read_text()}")
    return proc, port, log


def round_once(tmp: Path, url: str, name: str, args: argparse.Namespace,
               rate: float) -> tuple[float, float, float, dict[str, int]]:
    """One round against smtpguard on *url*, or against postgrey when *url* is ``postgrey``."""
    proc, port, _ = start_postgrey(tmp, args.postgrey, name) if url == "postgrey" else start_service(tmp, url, name)
    try:
        asyncio.run(load(port, args.clients, 1000, args.triplets))  # warm up (connections, caches)
        elapsed, lat, actions = asyncio.run(load(port, args.clients, args.requests, args.triplets, rate))
    finally:
        stop(proc)
    cuts = statistics.quantiles(lat, n=100)
    return len(lat) / elapsed, cuts[49] * 1000, cuts[98] * 1000, actions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", action="append", choices=("sqlite", "redis"), help="repeatable (default both)")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--triplets", type=int, default=100000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=float, default=5000.0,
                        help="requests/s of the open-loop runs (latency at the goal's load); 0: skip them")
    parser.add_argument("--redis-url", help="default: a private redis-server on a free loopback port")
    parser.add_argument("--postgrey", default=which("postgrey"),
                        help="postgrey to measure as the reference (default: the one installed)")
    parser.add_argument("--no-postgrey", dest="postgrey", action="store_const", const=None,
                        help="smtpguard only")
    args = parser.parse_args()
    backends = args.backend or ["sqlite", "redis"]
    if args.postgrey is None:
        print("policy: postgrey not measured (not installed, or --no-postgrey; make bench installs it)")
    with tempfile.TemporaryDirectory() as d, contextlib.ExitStack() as stack:
        tmp = Path(d)
        urls = {"sqlite": f"sqlite:///{tmp / 'policy.db'}"}
        if "redis" in backends:
            if args.redis_url:
                urls["redis"] = args.redis_url
            else:
                from tests.lab import RedisServer

                urls["redis"] = stack.enter_context(RedisServer()).url
        for b in backends:
            asyncio.run(preload(urls[b], args.triplets))
        if args.postgrey is not None:
            proc, port, _ = start_postgrey(tmp, args.postgrey, "postgrey-preload")
            try:
                asyncio.run(preload_postgrey(port, args.triplets, args.clients))
            finally:
                stop(proc)
            urls["postgrey"] = "postgrey"
            backends = [*backends, "postgrey"]
        modes = [("max", 0.0)] + ([(f"{args.rate:,.0f}/s", args.rate)] if args.rate else [])
        results: dict[tuple[str, str], list[tuple[float, float, float, dict[str, int]]]] = {}
        for r in range(args.rounds):
            for m, (mode, rate) in enumerate(modes):
                for b in backends:
                    results.setdefault((b, mode), []).append(round_once(tmp, urls[b], f"{b}{r}-{m}", args, rate))
        for mode, _ in modes:
            for b in backends:
                got = results[(b, mode)]
                rounds = sorted(got, key=lambda x: x[2])
                rps, p50, p99, actions = rounds[len(rounds) // 2]
                each = "; ".join(f"{x[0]:,.0f}/s p99 {x[2]:.2f} ms" for x in got)
                print(f"policy {b:8} load {mode:>8}: {rps:,.0f} requests/s, p50 {p50:.2f} ms, p99 {p99:.2f} ms "
                      f"({args.clients} clients, {args.requests} requests, median of {args.rounds} rounds: {each}; "
                      f"answers {actions})")


if __name__ == "__main__":
    main()
