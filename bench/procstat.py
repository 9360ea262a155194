"""What the benchmarks read about a process: CPU and memory from /proc, and
the open-files limit they raise to hold many connections."""

from __future__ import annotations

import os
import resource
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def raise_nofile() -> int:
    """Raise the soft open-files limit to the hard one; return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def status_kib(pid: int, key: str = "VmRSS") -> int:
    """A ``/proc/PID/status`` memory field (``VmRSS``, ``VmHWM``) in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} for process {pid}")


def rss_kib(pid: int) -> int:
    return status_kib(pid, "VmRSS")


def cpu_seconds(pid: int) -> float:
    """utime + stime of *pid*, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, all CPUs
    (``/proc/stat``'s first line; idle and iowait count as not busy)."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    total = sum(ticks)
    return (total - ticks[3] - ticks[4]) / TICK, total / TICK
