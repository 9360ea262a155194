"""Relay benchmark: smtpguard in front of a real Postfix versus Postfix alone.

Prints figures, asserts nothing (the machines are shared and noisy):

* throughput: ``smtp-source -s 20 -m N -l 2048`` (20 parallel sessions, one
  2 KB message per connection) straight to a private Postfix and through
  smtpguard, interleaved over several rounds; medians and their ratios.
  Two smtpguards: one relays every session (XCLIENT), the other has
  ``[handoff] socket`` set and hands its clients to Postfix's smtpd pass
  service.  smtp-source's client passed its tests in the warm-up run, so it
  is PASS OLD afterwards, as a regular sender is;
* smtpguard's own CPU per message (utime+stime of its process from
  ``/proc/PID/stat`` around each run through it);
* memory: VmHWM minus VmRSS-before of a fresh smtpguard while it relays one
  50 MB message (the body is streamed, so this should stay small).

Postfix accepts ``@bench.test`` and discards it (``discard:`` transport), so
the backend cost is the same on both paths and no disk fills up.

With ``--baseline DIR`` (another checkout of smtpguard, e.g. ``git worktree
add /tmp/base v0.1``) two more smtpguards run that checkout's code in the same
interleaved rounds, so a change's cost is measured before and after in one
run, on the same machine load.

Usage: ``python bench/relay.py [--rounds 5] [--messages 2000] [--baseline DIR]``
(root: it starts a private Postfix).
"""

from __future__ import annotations

import argparse
import smtplib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.procstat import cpu_seconds, status_kib  # noqa: E402
from tests.integration.guard import Guard  # noqa: E402
from tests.lab import PrivatePostfix  # noqa: E402

BENCH_POSTFIX = {
    "relay_domains": "bench.test",
    "transport_maps": "inline:{bench.test=discard:}",
    "message_size_limit": str(80 * 1024 * 1024),
    "default_process_limit": "200",
}


def smtp_source(port: int, messages: int) -> float:
    """Run smtp-source; return messages per second."""
    start = time.monotonic()
    subprocess.run(
        ["smtp-source", "-s", "20", "-m", str(messages), "-l", "2048", "-f", "a@sender.test",
         "-t", "b@bench.test", f"127.0.0.1:{port}"],
        check=True, stdout=subprocess.DEVNULL,
    )
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--big-mb", type=int, default=50)
    ap.add_argument("--baseline", type=Path, help="another checkout to measure in the same rounds")
    args = ap.parse_args()

    postfix = PrivatePostfix(extra=BENCH_POSTFIX, name="bench", pass_service=True)
    postfix.start()
    workdir = Path(tempfile.mkdtemp(prefix="smtpguard-bench-"))
    guards: dict[str, Guard] = {}
    handoff = f'[handoff]\nsocket = "{postfix.pass_socket}"\n'
    # smtpguard asks this Postfix (postconf -c) whether its pass service refuses bare newlines.
    checked = handoff + f'postfix_config_directory = "{postfix.conf_dir}"\n'
    setups = [("relayed", "", None), ("handed off", checked, None)]
    if args.baseline:  # a checkout from before the check may not know the key
        setups += [("relayed, baseline", "", args.baseline), ("handed off, baseline", handoff, args.baseline)]
    for mode, extra, source in setups:
        (workdir / mode).mkdir()
        guards[mode] = Guard(workdir / mode, postfix.port, extra, source=source)
    rate: dict[str, list[float]] = {"direct": [], **{mode: [] for mode in guards}}
    cpu_ms: dict[str, list[float]] = {mode: [] for mode in guards}
    try:
        for g in guards.values():
            g.start()
            smtp_source(g.port, 200)  # warm-up: the client passes its tests (PASS NEW)
        modes = list(rate)
        for r in range(args.rounds):
            for mode in modes[r % len(modes):] + modes[:r % len(modes)]:  # rotate the order
                if mode == "direct":
                    rate[mode].append(smtp_source(postfix.port, args.messages))
                    continue
                pid = guards[mode].proc.pid  # type: ignore[union-attr]
                c0 = cpu_seconds(pid)
                rate[mode].append(smtp_source(guards[mode].port, args.messages))
                cpu_ms[mode].append((cpu_seconds(pid) - c0) * 1000 / args.messages)
            print(f"round {r + 1}: " + "   ".join(f"{m} {rate[m][-1]:5.0f} msg/s" for m in modes)
                  + "   smtpguard CPU " + ", ".join(f"{m} {cpu_ms[m][-1]:.3f}" for m in guards) + " ms/msg",
                  flush=True)
        for g in guards.values():
            g.stop()
        (workdir / "big").mkdir()
        rss_before, hwm, seconds = big_message_rss(postfix, workdir / "big", args.big_mb * 1024 * 1024)
    finally:
        for g in guards.values():
            g.stop()
        postfix.cleanup()

    med = {m: statistics.median(v) for m, v in rate.items()}
    print()
    print(f"throughput, median of {args.rounds} interleaved rounds ({args.messages} x 2 KB, 20 sessions, "
          f"1 msg/connection):")
    print(f"  direct to Postfix                 {med['direct']:6.0f} msg/s")
    for mode in guards:
        print(f"  through smtpguard, {mode:<20} {med[mode]:6.0f} msg/s   ratio {med[mode] / med['direct']:.2f}"
              "   (target >= 0.75)")
    print("smtpguard CPU per message, median (target <= 1.0 ms):")
    for mode, values in cpu_ms.items():
        print(f"  {mode:<20} {statistics.median(values):.3f} ms   (range {min(values):.3f}-{max(values):.3f})")
    print(f"{args.big_mb} MB message: RSS before {rss_before / 1024:.1f} MB, peak {hwm / 1024:.1f} MB, "
          f"growth {(hwm - rss_before) / 1024:.1f} MB (target <= 8 MB), relayed in {seconds:.1f} s")


if __name__ == "__main__":
    main()
