"""STARTTLS cost: handshakes per second and memory per TLS session.

    python bench/tls.py [--handshakes 2000] [--concurrency 50] [--sessions 500] [--event-loop uvloop ...]

How it works: starts smtpguard as a subprocess (as an admin would run it)
with a certificate from a throw-away CA (``trustme``, RSA 2048 like most
MX certificates), pregreet and connection limits off so that only the
transport is measured, and no Postfix (no message is relayed).  Then:

1. **handshakes**: ``--handshakes`` clients, ``--concurrency`` at a time,
   each ``EHLO``, ``STARTTLS``, TLS handshake (TLS 1.3, the default
   ciphers), ``EHLO`` again, ``QUIT``.  Reports the rate seen by the
   clients and smtpguard's CPU per handshake (utime+stime from
   /proc/PID/stat), whose inverse is what one core sustains.
2. **memory**: opens ``--sessions`` sessions that stop after ``EHLO``
   (plain), measures smtpguard's VmRSS, then as many more that stay after
   the handshake and the second ``EHLO`` (TLS); reports KiB per session of
   each kind and the difference, the TLS state's own cost.

Both figures are taken on each ``--event-loop`` (``[server] event_loop``;
default: ``uvloop`` and ``asyncio``): asyncio's ``loop.start_tls`` gives
each TLS connection a 256 KiB read buffer, uvloop's TLS layer its own.
The clients run in this process, on loopback only; their CPU is not
smtpguard's.  Prints the figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import sys
import tempfile
import time
from pathlib import Path

import trustme

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.procstat import cpu_seconds, raise_nofile, rss_kib  # noqa: E402
from tests.integration.guard import Guard  # noqa: E402
from tests.lab import free_port  # noqa: E402

CONFIG = """[server]
max_connections = 20000
event_loop = "{loop}"
[tls]
cert_file = "{cert}"
key_file = "{key}"
[pregreet]
enabled = false
[limits]
enabled = false
"""


async def reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await reader.readline()
        if not line or line[3:4] != b"-":
            return line


async def command(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: bytes) -> bytes:
    writer.write(line + b"\r\n")
    return await reply(reader)


async def session(port: int, ctx: ssl.SSLContext | None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect and EHLO; with *ctx*, STARTTLS, handshake and EHLO again."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await reply(reader)
    await command(reader, writer, b"EHLO bench.example")
    if ctx is not None:
        assert (await command(reader, writer, b"STARTTLS")).startswith(b"220 ")
        await writer.start_tls(ctx, server_hostname="mx.guard.test")
        assert (await command(reader, writer, b"EHLO bench.example")).startswith(b"250 ")
    return reader, writer


async def handshakes(port: int, ctx: ssl.SSLContext, n: int, concurrency: int) -> None:
    gate = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with gate:
            reader, writer = await session(port, ctx)
            await command(reader, writer, b"QUIT")
            writer.close()

    await asyncio.gather(*(one() for _ in range(n)))


async def hold(port: int, ctx: ssl.SSLContext | None, n: int, concurrency: int) -> list[asyncio.StreamWriter]:
    gate = asyncio.Semaphore(concurrency)

    async def one() -> asyncio.StreamWriter:
        async with gate:
            return (await session(port, ctx))[1]

    return list(await asyncio.gather(*(one() for _ in range(n))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--handshakes", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--sessions", type=int, default=500)
    parser.add_argument("--event-loop", action="append", choices=("uvloop", "asyncio"), dest="loops")
    args = parser.parse_args()
    raise_nofile()
    ca = trustme.CA()
    leaf = ca.issue_cert("mx.guard.test")
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    with tempfile.TemporaryDirectory(prefix="smtpguard-bench-tls-") as tmp:
        cert, key = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
        for loop in args.loops or ["uvloop", "asyncio"]:
            print(f"event loop {loop}:")
            config = CONFIG.format(cert=cert, key=key, loop=loop)
            for name, run in (("handshakes", measure_handshakes), ("memory", measure_memory)):
                workdir = Path(tmp) / f"{loop}-{name}"
                workdir.mkdir()
                guard = Guard(workdir, free_port(), config).start()  # a fresh process for each figure
                try:
                    assert guard.proc is not None
                    asyncio.run(run(guard.port, ctx, args, guard.proc.pid))
                finally:
                    guard.stop()


async def measure_handshakes(port: int, ctx: ssl.SSLContext, args: argparse.Namespace, pid: int) -> None:
    await handshakes(port, ctx, 50, args.concurrency)  # warm-up
    cpu, start = cpu_seconds(pid), time.monotonic()
    await handshakes(port, ctx, args.handshakes, args.concurrency)
    wall, cpu = time.monotonic() - start, cpu_seconds(pid) - cpu
    print(f"  handshakes: {args.handshakes} in {wall:.2f}s = {args.handshakes / wall:.0f}/s "
          f"(concurrency {args.concurrency}, clients in the same box); smtpguard CPU "
          f"{cpu / args.handshakes * 1000:.2f} ms per handshake = {args.handshakes / cpu:.0f}/s per core")


async def measure_memory(port: int, ctx: ssl.SSLContext, args: argparse.Namespace, pid: int) -> None:
    """Plain sessions first, then TLS ones on top (both held), in a fresh
    process: each figure is growth, not memory kept from closed sessions."""
    n, concurrency = args.sessions, args.concurrency
    await handshakes(port, ctx, 10, concurrency)  # first-use allocations (OpenSSL tables) out of the figure
    figures, held = {}, []
    for kind, tls in (("plain", None), ("TLS", ctx)):
        before = rss_kib(pid)
        held += await hold(port, tls, n, concurrency)
        await asyncio.sleep(0.5)  # let the server finish answering the last EHLOs
        figures[kind] = (rss_kib(pid) - before) / n
    for w in held:
        w.close()
    print(f"  memory: {n} sessions held after EHLO: plain {figures['plain']:.1f} KiB, "
          f"after STARTTLS {figures['TLS']:.1f} KiB per session "
          f"(TLS state ~{figures['TLS'] - figures['plain']:.1f} KiB)")


if __name__ == "__main__":
    main()
