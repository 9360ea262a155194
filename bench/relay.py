"""Relay benchmark: smtpguard in front of a real Postfix versus Postfix alone.

Prints figures, asserts nothing (the machines are shared and noisy):

* throughput: ``smtp-source -s 20 -m N -l 2048`` (20 parallel sessions, one
  2 KB message per connection) straight to a private Postfix and through
  each front end, interleaved over several rounds (the order rotates);
  medians and their ratios to Postfix alone.  The front ends:

  - smtpguard relaying every session (XCLIENT), on its default event loop
    (uvloop) and on asyncio's own (``[server] event_loop = "asyncio"``);
  - smtpguard with ``[handoff] socket`` set, handing its clients to
    Postfix's smtpd pass service;
  - as references on the same Postfix: **postscreen** (the same instance's
    postscreen on a port of its own, handing its clients to its smtpd; no
    tests but the cache, as a PASS OLD client sees it) and **haproxy** as a
    plain TCP proxy (``mode tcp``, no PROXY header) in front of Postfix's
    port.

  smtp-source's client passed its tests in the warm-up run (smtpguard's and
  postscreen's), so it is PASS OLD afterwards, as a regular sender is;
* each front end's own CPU per message (utime+stime from ``/proc/PID/stat``
  around each run through it: smtpguard's process, postscreen's process,
  haproxy's process);
* the whole machine's CPU per message and how busy it was during each run
  (``/proc/stat``): smtp-source, Postfix, the front end and the kernel
  together.  When Postfix alone already keeps every CPU busy, the run is
  CPU-bound and a front end's throughput ratio can be no better than
  machine CPU per message direct / machine CPU per message through it
  (printed as "ceiling"): what the front end and the extra work it causes
  Postfix (a second connection, XCLIENT, a second EHLO) cost, not latency,
  decides the ratio;
* pipelined recipients: a client that pipelines (as Postfix's and Exim's
  smtp clients do) sends MAIL, ``--rcpts`` recipients and DATA in one write
  over 20 parallel sessions, one message per connection (smtp-source cannot
  pipeline: a small asyncio client does it); Postfix alone and smtpguard
  relayed (and the baseline's, with ``--baseline``), interleaved: msg/s and
  smtpguard's CPU per message;
* memory: VmHWM minus VmRSS-before of a fresh smtpguard while it relays one
  50 MB message (the body is streamed, so this should stay small).

Postfix accepts ``@bench.test`` and discards it (``discard:`` transport), so
the backend cost is the same on every path and no disk fills up.

With ``--baseline DIR`` (another checkout of smtpguard, e.g. ``git worktree
add /tmp/base v0.1``) two more smtpguards run that checkout's code in the same
interleaved rounds, so a change's cost is measured before and after in one
run, on the same machine load.

Usage: ``python bench/relay.py [--rounds 5] [--messages 2000] [--baseline DIR]``
(root: it starts a private Postfix).
"""

from __future__ import annotations

import argparse
import asyncio
import smtplib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.procstat import cpu_seconds, machine_cpu, status_kib  # noqa: E402
from tests.integration.guard import Guard  # noqa: E402
from tests.lab import HAProxy, PrivatePostfix  # noqa: E402

BENCH_POSTFIX = {
    "relay_domains": "bench.test",
    "transport_maps": "inline:{bench.test=discard:}",
    "message_size_limit": str(80 * 1024 * 1024),
    "default_process_limit": "200",
    # postscreen (a reference): no permit_mynetworks, so smtp-source's client
    # goes through the cache (PASS OLD) as smtpguard's does; a short greet
    # wait for the warm-up's PASS NEW.
    "postscreen_access_list": "",
    "postscreen_greet_wait": "1s",
}

#: The targets of issue 13, printed next to the figures.
TARGET_CPU = {"relayed": 0.9, "handed off": 0.20}
TARGET_RATIO = {"relayed": 0.80}


def smtp_source(port: int, messages: int) -> float:
    """Run smtp-source; return messages per second."""
    start = time.monotonic()
    subprocess.run(
        ["smtp-source", "-s", "20", "-m", str(messages), "-l", "2048", "-f", "a@sender.test",
         "-t", "b@bench.test", f"127.0.0.1:{port}"],
        check=True, stdout=subprocess.DEVNULL,
    )
    return messages / (time.monotonic() - start)


def pipelined_source(port: int, messages: int, rcpts: int, sessions: int = 20) -> float:
    """*messages* messages of *rcpts* recipients each, one per connection,
    *sessions* at a time; the envelope pipelined (MAIL, RCPTs and DATA in
    one write).  Returns messages per second."""
    envelope = (b"MAIL FROM:<a@sender.test>\r\n"
                + b"".join(b"RCPT TO:<r%d@bench.test>\r\n" % i for i in range(rcpts)) + b"DATA\r\n")
    body = b"Subject: pipelined\r\n\r\n" + b"x" * 72 + b"\r\n.\r\nQUIT\r\n"
    left = messages

    async def reply(reader: asyncio.StreamReader) -> bytes:
        while True:
            line = await reader.readline()
            if line[3:4] != b"-":
                return line

    async def session() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            await reply(reader)
            writer.write(b"EHLO client.bench.test\r\n")
            await reply(reader)
            writer.write(envelope)
            codes = [(await reply(reader))[:3] for _ in range(rcpts + 2)]
            if codes != [b"250"] * (rcpts + 1) + [b"354"]:
                raise SystemExit(f"pipelined client: unexpected replies {codes}")
            writer.write(body)
            if not (await reply(reader)).startswith(b"250"):
                raise SystemExit("pipelined client: message refused")
            await reply(reader)
            writer.close()

    async def run() -> None:
        await asyncio.gather(*(session() for _ in range(sessions)))

    start = time.monotonic()
    asyncio.run(run())
    return messages / (time.monotonic() - start)


def big_message_rss(postfix: PrivatePostfix, workdir: Path, size: int) -> tuple[int, int, float]:
    """(VmRSS before kB, VmHWM after kB, seconds) for one message of *size* bytes."""
    g = Guard(workdir, postfix.port, '[server]\nmessage_size_limit = "80m"\n').start()
    try:
        assert g.proc is not None
        pid = g.proc.pid
        line = b"x" * 74 + b"\r\n"
        body = b"Subject: big\r\n\r\n" + line * (size // len(line))
        # Warm up the code paths once with a small message, then measure.
        with smtplib.SMTP("127.0.0.1", g.port) as c:
            c.sendmail("a@sender.test", ["b@bench.test"], b"Subject: warm\r\n\r\nx\r\n")
        before = status_kib(pid, "VmRSS")
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        start = time.monotonic()
        with smtplib.SMTP("127.0.0.1", g.port, timeout=300) as c:
            c.sendmail("a@sender.test", ["b@bench.test"], body)
        seconds = time.monotonic() - start
        return before, status_kib(pid, "VmHWM"), seconds
    finally:
        g.stop()


class Front:
    """A front end measured in the rounds: its port and the process whose CPU counts."""

    def __init__(self, port: int, pid: Callable[[], int]) -> None:
        self.port = port
        self.pid = pid


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--big-mb", type=int, default=50)
    ap.add_argument("--baseline", type=Path, help="another checkout to measure in the same rounds")
    ap.add_argument("--rcpts", type=int, default=20, help="recipients per pipelined message")
    args = ap.parse_args()

    postfix = PrivatePostfix(extra=BENCH_POSTFIX, name="bench", pass_service=True, postscreen=True)
    postfix.start()
    workdir = Path(tempfile.mkdtemp(prefix="smtpguard-bench-"))
    guards: dict[str, Guard] = {}
    handoff = f'[handoff]\nsocket = "{postfix.pass_socket}"\n'
    # smtpguard asks this Postfix (postconf -c) whether its pass service refuses bare newlines.
    checked = handoff + f'postfix_config_directory = "{postfix.conf_dir}"\n'
    # "relayed" runs on the default loop (event_loop = "auto": uvloop), as make run does.
    setups = [("relayed", "", None), ("relayed, asyncio", '[server]\nevent_loop = "asyncio"\n', None),
              ("handed off", checked, None)]
    if args.baseline:  # a checkout from before the check may not know the key
        setups += [("relayed, baseline", "", args.baseline), ("handed off, baseline", handoff, args.baseline)]
    for mode, extra, source in setups:
        (workdir / mode).mkdir()
        guards[mode] = Guard(workdir / mode, postfix.port, extra, source=source)
    haproxy = HAProxy(postfix.port, proxy=0)
    fronts: dict[str, Front] = {}
    try:
        for mode, g in guards.items():
            g.start()
            fronts[mode] = Front(g.port, lambda g=g: g.proc.pid)  # type: ignore[misc, union-attr]
        assert postfix.postscreen_port is not None
        fronts["postscreen"] = Front(postfix.postscreen_port, lambda: postfix.pids("postscreen")[0])
        haproxy.start()
        fronts["haproxy"] = Front(haproxy.port, lambda: haproxy.proc.pid)  # type: ignore[union-attr]
        for front in fronts.values():
            smtp_source(front.port, 200)  # warm-up: the client passes its tests (PASS NEW)
        figures = rounds(postfix, fronts, args.rounds, args.messages)
        relayed = {m: f for m, f in fronts.items() if m in ("relayed", "relayed, baseline")}
        pipelined = rounds(postfix, relayed, args.rounds, args.messages // 4,
                           lambda port, n: pipelined_source(port, n, args.rcpts))
        for g in guards.values():
            g.stop()
        haproxy.stop()
        (workdir / "big").mkdir()
        rss_before, hwm, seconds = big_message_rss(postfix, workdir / "big", args.big_mb * 1024 * 1024)
    finally:
        for g in guards.values():
            g.stop()
        haproxy.cleanup()
        postfix.cleanup()
    report(figures, args.rounds, f"{args.messages} x 2 KB, 20 sessions, 1 msg/connection")
    report(pipelined, args.rounds, f"{args.messages // 4} messages of {args.rcpts} pipelined recipients, "
           "20 sessions, 1 msg/connection", targets=False)
    print(f"{args.big_mb} MB message: RSS before {rss_before / 1024:.1f} MB, peak {hwm / 1024:.1f} MB, "
          f"growth {(hwm - rss_before) / 1024:.1f} MB (target < 1 MB), relayed in {seconds:.1f} s")


@dataclass
class Figures:
    rate: dict[str, list[float]]  # msg/s per path
    cpu_ms: dict[str, list[float]]  # the front end's own CPU ms per message
    machine_ms: dict[str, list[float]]  # the whole machine's busy CPU ms per message
    busy: dict[str, list[float]]  # the machine's busy share (1.0: every CPU busy)


def rounds(postfix: PrivatePostfix, fronts: dict[str, Front], n: int, messages: int,
           source: Callable[[int, int], float] = smtp_source) -> Figures:
    """*n* interleaved rounds of *source*'s traffic, the order rotating:
    msg/s of every path, CPU ms per message of every front end, and the
    machine's CPU ms per message and busy share for every path."""
    fig = Figures({"direct": [], **{mode: [] for mode in fronts}}, {mode: [] for mode in fronts}, {}, {})
    modes = list(fig.rate)
    for r in range(n):
        for mode in modes[r % len(modes):] + modes[:r % len(modes)]:
            port = postfix.port if mode == "direct" else fronts[mode].port
            pid = None if mode == "direct" else fronts[mode].pid()
            c0 = cpu_seconds(pid) if pid else 0.0
            b0, t0 = machine_cpu()
            fig.rate[mode].append(source(port, messages))
            b1, t1 = machine_cpu()
            if pid:
                fig.cpu_ms[mode].append((cpu_seconds(pid) - c0) * 1000 / messages)
            fig.machine_ms.setdefault(mode, []).append((b1 - b0) * 1000 / messages)
            fig.busy.setdefault(mode, []).append((b1 - b0) / (t1 - t0))
        print(f"round {r + 1}: " + "  ".join(f"{m} {fig.rate[m][-1]:.0f}" for m in modes) + " msg/s;  CPU "
              + ", ".join(f"{m} {fig.cpu_ms[m][-1]:.3f}" for m in fronts) + " ms/msg;  machine "
              + ", ".join(f"{m} {fig.machine_ms[m][-1]:.2f}" for m in modes) + " ms/msg", flush=True)
    return fig


def report(fig: Figures, n: int, what: str, targets: bool = True) -> None:
    med = {m: statistics.median(v) for m, v in fig.rate.items()}
    machine = {m: statistics.median(v) for m, v in fig.machine_ms.items()}
    busy = {m: statistics.median(v) for m, v in fig.busy.items()}
    print()
    print(f"median of {n} interleaved rounds ({what}):")
    print(f"  {'path':<28} {'msg/s':>6} {'ratio':>6} {'CPU ms/msg':>11}  (range)        "
          f"{'machine ms/msg':>14} {'busy':>5} {'ceiling':>7}  target")
    print(f"  {'Postfix alone':<28} {med['direct']:6.0f} {1:6.2f} {'':11}  {'':13}  "
          f"{machine['direct']:14.2f} {busy['direct']:5.0%}")
    for mode, values in fig.cpu_ms.items():
        base = mode.split(",")[0]
        cpu = statistics.median(values)
        target = []
        if targets and base in TARGET_RATIO:
            target.append(f"ratio >= {TARGET_RATIO[base]:.2f}")
        if targets and base in TARGET_CPU:
            target.append(f"CPU <= {TARGET_CPU[base]:.2f} ms")
        print(f"  {mode:<28} {med[mode]:6.0f} {med[mode] / med['direct']:6.2f} {cpu:11.3f}  "
              f"({min(values):.3f}-{max(values):.3f})  {machine[mode]:14.2f} {busy[mode]:5.0%} "
              f"{machine['direct'] / machine[mode]:7.2f}  {', '.join(target)}")
    print("  machine ms/msg: every process and the kernel, per message; busy: the machine's CPUs in use;"
          " ceiling: the best ratio a CPU-bound run allows (machine ms/msg direct / through the front end)")


if __name__ == "__main__":
    main()
