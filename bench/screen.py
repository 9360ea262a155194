"""Screening at scale: idle connections held in the greet wait, and a pregreet bot flood.

    python bench/screen.py [--idle 10000] [--bots 3000] [--concurrency 400]

How it works: starts the test lab's private Postfix and smtpguard as a
subprocess in front of it (as an admin would run it), then:

1. **idle**: opens ``--idle`` connections from many 127.x.y.z source
   addresses (at most 40 per address, under the default per-client limit of
   50) and reads the ``220-`` line of each, so all of them sit in the greet
   wait (``greet_wait`` 60s here).  Reports smtpguard's VmRSS before and
   after, per held connection.  While they are held, a known client
   (``permit`` in the client access table, so it skips the wait) delivers a
   message through to Postfix; its delivery time is reported and the message
   is checked in Postfix's mailbox.  Run twice: without DNS, and with
   ``[dns]`` pointed at a private dnsmasq (the test lab's), 3 DNSBL sites
   and the client-name lookup, as a production setup would (the
   connect-time lookups and their cached answers are then part of what a
   held connection costs).
2. **bots**: ``--bots`` pregreeting bots (``EHLO`` sent right after
   ``220-``), ``--concurrency`` at a time, against a fresh smtpguard:
   with ``[pregreet] action = "drop"`` (521 at once, hang up) and with the
   default ``enforce`` (keep talking, 550 at RCPT, QUIT; greet wait 1s).
   Every bot has its own source address, so no bot rides on another's
   cached pass.
   Reports smtpguard's CPU (utime+stime from /proc/PID/stat) per rejected
   connection.

Prints the figures; asserts nothing.  Loopback traffic only.  Needs root
(private Postfix) and an open-files limit of at least ``--idle`` + a few
hundred (the lab has 20000).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import smtplib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.procstat import cpu_seconds, raise_nofile, rss_kib  # noqa: E402
from tests.lab import DnsServer, PrivatePostfix, free_port, wait_until  # noqa: E402


def source(i: int, per: int = 40) -> str:
    """*per* connections per source address: 127.1.0.1, 127.1.0.2, ..."""
    n = i // per
    return f"127.{1 + n // 60000}.{(n // 250) % 240}.{n % 250 + 1}"


def bot_source(i: int) -> str:
    """One address per bot (127.100.0.1, ...): a bot's result is never
    another's cached pass."""
    return f"127.{100 + i // 60000}.{(i // 250) % 240}.{i % 250 + 1}"


class Guard:
    def __init__(self, workdir: Path, upstream: int, extra: str) -> None:
        self.port = free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        self.log = workdir / "smtpguard.log"
        conf = workdir / "smtpguard.toml"
        conf.write_text(
            f'[server]\nlisten = ["127.0.0.1:{self.port}"]\nhostname = "mx.bench.test"\n'
            f"max_connections = 20000\n"
            f'[upstream]\naddress = "127.0.0.1:{upstream}"\n'
            f'[metrics]\nlisten = ""\n[state]\nurl = "memory://"\n'
            + ("" if "[client_name]" in extra else "[client_name]\nlookup = false\n")  # no DNS unless asked
            + extra
        )
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "smtpguard", "serve", "-c", str(conf)],
                                         stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_until(lambda: "daemon started" in self.log.read_text(errors="replace"), 20, "smtpguard to start")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def hold_idle(port: int, n: int, concurrency: int, first: int = 0) -> list[asyncio.StreamWriter]:
    sem = asyncio.Semaphore(concurrency)
    writers: list[asyncio.StreamWriter] = []

    async def one(i: int) -> None:
        async with sem:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source(first + i), 0))
            line = await reader.readline()
            if not line.startswith(b"220-"):
                raise RuntimeError(f"expected 220-, got {line!r}")
            writers.append(writer)

    await asyncio.gather(*(one(i) for i in range(n)))
    return writers


async def close_all(writers: list[asyncio.StreamWriter]) -> None:
    for w in writers:
        w.transport.abort()
    await asyncio.sleep(0.5)


def deliver(port: int, backend: PrivatePostfix) -> float:
    start = time.monotonic()
    with smtplib.SMTP("127.0.0.1", port, source_address=("127.0.0.2", 0), timeout=60) as c:
        c.ehlo("good.bench.test")
        c.sendmail("a@sender.test", ["bob@example.test"], b"Subject: while held\r\n\r\nhello\r\n")
    took = time.monotonic() - start
    backend.wait_for_messages(1)
    return took


async def bot(port: int, i: int, enforce: bool) -> bool:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(bot_source(i), 0))
    try:
        await reader.readline()  # 220-
        writer.write(b"EHLO bot.example\r\n")
        if not enforce:
            reply = await reader.readline()
            await reader.read()  # until the server hangs up
            return reply.startswith(b"521")
        while not (await reader.readline()).startswith(b"250 "):  # 220, EHLO reply
            pass
        writer.write(b"MAIL FROM:<bot@sender.test>\r\n")
        await reader.readline()
        writer.write(b"RCPT TO:<bob@example.test>\r\n")
        rejected = (await reader.readline()).startswith(b"550 5.5.1")
        writer.write(b"QUIT\r\n")
        await reader.read()
        return rejected
    finally:
        writer.close()


async def flood(port: int, n: int, concurrency: int, enforce: bool, first: int = 0) -> int:
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> bool:
        async with sem:
            return await bot(port, first + i, enforce)

    results = await asyncio.gather(*(one(i) for i in range(n)))
    return sum(results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--idle", type=int, default=10_000)
    ap.add_argument("--bots", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=400)
    args = ap.parse_args()
    limit = raise_nofile()
    if limit < args.idle + 500:
        sys.exit(f"open files limit {limit} is too low for --idle {args.idle}")
    work = Path(tempfile.mkdtemp(prefix="smtpguard-bench-screen-"))
    backend = PrivatePostfix()
    backend.start()
    try:
        # ------------------------------------------------ idle connections
        table = work / "clients.cidr"
        table.write_text("127.0.0.2 permit\n")
        idle = f'[pregreet]\ngreet_wait = "60s"\n[access]\nclient_table = "cidr:{table}"\n'
        idle_run(work / "idle", backend, idle, args, "idle")
        with DnsServer([], log_queries=False) as dns:  # every name NXDOMAIN: no PTR, not listed
            with_dns = (f'[dns]\nnameservers = ["{dns.address}:{dns.port}"]\n[client_name]\nlookup = true\n'
                        '[dnsbl]\nenabled = true\nsites = ["zen.bench", "bl.bench", "wl.bench*-1"]\n')
            idle_run(work / "idle-dns", backend, idle + with_dns, args, "idle with DNS")
        # ------------------------------------------------ pregreet bots
        for mode, extra in (("drop", '[pregreet]\ngreet_wait = "6s"\naction = "drop"\n'),
                            ("enforce", '[pregreet]\ngreet_wait = "1s"\n')):
            g = Guard(work / f"bots-{mode}", backend.port, extra)
            try:
                asyncio.run(flood(g.port, 50, 50, mode == "enforce", first=args.bots))  # warm up
                cpu0, t0 = cpu_seconds(g.proc.pid), time.monotonic()
                rejected = asyncio.run(flood(g.port, args.bots, args.concurrency, mode == "enforce"))
                cpu1, t1 = cpu_seconds(g.proc.pid), time.monotonic()
                per = (cpu1 - cpu0) * 1000 / args.bots
                print(f"bots ({mode}): {rejected}/{args.bots} pregreeting bots rejected in {t1 - t0:.1f}s; "
                      f"smtpguard CPU {cpu1 - cpu0:.2f}s = {per:.3f} ms per rejected connection"
                      + (" (target <= 0.25 ms)" if mode == "drop" else ""))
            finally:
                g.stop()
        delivered = [m for m in backend.messages() if b"while held" in m]
        print(f"postfix: {len(delivered)} message(s) from the good client, "
              f"{len(backend.messages()) - len(delivered)} from anyone else")
    finally:
        backend.cleanup()


def idle_run(workdir: Path, backend: PrivatePostfix, extra: str, args: argparse.Namespace, label: str) -> None:
    """Hold ``--idle`` connections in the greet wait; RSS per connection and
    a known client's delivery meanwhile."""
    g = Guard(workdir, backend.port, extra)
    try:
        warm = asyncio.run(_warm(g.port))
        time.sleep(0.5)
        before = rss_kib(g.proc.pid)
        loop = asyncio.new_event_loop()
        start = time.monotonic()
        writers = loop.run_until_complete(hold_idle(g.port, args.idle, args.concurrency, first=warm))
        opened = time.monotonic() - start
        time.sleep(1.0)
        after = rss_kib(g.proc.pid)
        took = deliver(g.port, backend)
        still = rss_kib(g.proc.pid)
        print(f"{label}: {len(writers)} connections held in the greet wait (opened in {opened:.1f}s)")
        print(f"{label}: smtpguard VmRSS {before} KiB before, {after} KiB with them held: "
              f"{(after - before) * 1024 / len(writers) / 1000:.2f} KB per connection (target <= 10 KB)")
        print(f"{label}: a good client delivered to Postfix while they were held in {took * 1000:.0f} ms "
              f"(VmRSS then {still} KiB)")
        loop.run_until_complete(close_all(writers))
        loop.close()
    finally:
        g.stop()


async def _warm(port: int) -> int:
    """Warm smtpguard's allocator with a few hundred connections first."""
    writers = await hold_idle(port, 200, 200, first=0)
    await close_all(writers)
    return 200


if __name__ == "__main__":
    main()
