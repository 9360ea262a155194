"""``smtpguard report``: a pflogsumm-like summary of smtpguard's log.

Reads smtpguard's Postfix-format lines (files, ``.gz`` rotations, or ``-``
for stdin) and prints: totals (connections, messages and bytes relayed,
rejects), rejects by reason, top rejected clients, greylisting pass rate and
the distribution of the delay greylisting imposed.

What it reads (the stable keywords of :mod:`smtpguard.logs`):

``CONNECT from [ip]:port to ...``          a connection
``NOQUEUE: reject: STAGE from name[ip]:port: CODE X.Y.Z text; from=<s> to=<r> ...``
                                           a reject (counted by reason, client, stage)
``QUEUEID: relayed from name[ip]:port: 250 ...; from=<s> nrcpt=N size=B``
                                           a message Postfix accepted
``PASS NEW``, ``PASS OLD``, ``PREGREET``, ``HANGUP``, ``DNSBL rank`` ...
                                           postscreen's screening events, counted

Greylisting is recognised from its reply text (``... Greylisted ...``, as
postgrey and smtpguard's greylist check word it).  A greylisted triplet is
keyed by client network (/24, /64), sender and recipient; it counts as
*passed* when a message from the same client network and sender is relayed
later (the relayed line names no recipients, so a pass is credited to every
pending triplet of that network and sender).  The delay is the time from
the first deferral to that delivery.

The state store holds the same facts with exact per-triplet timestamps; a
store-based report (``--state URL``) is future work (see docs/operations.md).
Timestamps are syslog's ``Mon DD HH:MM:SS`` (the year is taken as the
current one, stepping back across a year boundary) or RFC 3339.
"""

from __future__ import annotations

import gzip
import ipaddress
import json
import math
import re
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

_SYSLOG = re.compile(r"^(?P<mon>[A-Z][a-z]{2}) {1,2}(?P<day>\d{1,2}) (?P<hms>\d\d:\d\d:\d\d) \S+ "
                     r"(?P<prog>[^\[\s]+)\[\d+\]: (?P<msg>.*)$")
_RFC3339 = re.compile(r"^(?P<ts>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:\d\d)) \S+ "
                      r"(?P<prog>[^\[\s]+)\[\d+\]: (?P<msg>.*)$")
_REJECT = re.compile(r"^NOQUEUE: reject: (?P<stage>[A-Z-]+) from (?P<name>[^\[\s]*)\[(?P<ip>[^\]]+)\](?::\d+)?: "
                     r"(?P<code>\d{3}) (?:(?P<status>\d\.\d{1,3}\.\d{1,3}) )?(?P<text>.*?)"
                     r"(?:; (?P<fields>(?:from|to|proto|helo)=.*))?$")
_RELAYED = re.compile(r"^(?P<qid>\w+): relayed from (?P<name>[^\[\s]*)\[(?P<ip>[^\]]+)\](?::\d+)?: 250 .*?; "
                      r"from=<(?P<sender>[^>]*)> nrcpt=(?P<nrcpt>\d+) size=(?P<size>\d+)")
_CONNECT = re.compile(r"^CONNECT from \[")
# postscreen's keywords, as the screening checks log them.
_EVENTS = re.compile(r"^(PASS NEW|PASS OLD|ALLOWLISTED|PREGREET|HANGUP|DNSBL rank|COMMAND PIPELINING|"
                     r"NON-SMTP COMMAND|BARE NEWLINE|COMMAND COUNT LIMIT|COMMAND TIME LIMIT|COMMAND LENGTH LIMIT)\b")
_FIELD = re.compile(r"(from|to|helo)=<([^>]*)>")

# Delay buckets (upper bounds in seconds) for the greylisting histogram.
DELAY_BUCKETS: tuple[tuple[float, str], ...] = (
    (300, "< 5m"), (600, "5-10m"), (1800, "10-30m"), (3600, "30m-1h"), (4 * 3600, "1-4h"),
    (24 * 3600, "4-24h"), (float("inf"), ">= 24h"),
)


def client_net(ip: str) -> str:
    """postgrey's client network: /24 for IPv4, /64 for IPv6."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    prefix = 24 if addr.version == 4 else 64
    return str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False))


def reason(text: str) -> str:
    """A reject text without the per-client parts, so equal reasons group
    (in the spirit of pflogsumm): ``<a@b>: `` prefixes and ``[ip]`` dropped,
    ``client [1.2.3.4] blocked using zen`` -> ``blocked using zen``."""
    text = re.sub(r"^<[^>]*>: ", "", text)
    text = re.sub(r"(?:Service unavailable; )?(?:client|Client host|[A-Za-z ]+address) \[[^\]]*\] blocked",
                  "blocked", text)
    text = re.sub(r",? ?\[[0-9A-Fa-f.:]+\]", "", text)
    return text.strip()


@dataclass
class Triplet:
    first: float
    passed_at: float | None = None


@dataclass
class Report:
    first: float | None = None
    last: float | None = None
    lines: int = 0
    connections: int = 0
    relayed: int = 0
    relayed_bytes: int = 0
    rejects: int = 0
    rejects_by_class: Counter[str] = field(default_factory=Counter)
    reasons: Counter[tuple[str, str]] = field(default_factory=Counter)  # (stage, reason)
    clients: Counter[str] = field(default_factory=Counter)
    greylist: dict[tuple[str, str, str], Triplet] = field(default_factory=dict)
    events: Counter[str] = field(default_factory=Counter)

    # ------------------------------------------------------------- input

    def add(self, when: float, msg: str) -> None:
        self.lines += 1
        self.first = when if self.first is None else min(self.first, when)
        self.last = when if self.last is None else max(self.last, when)
        if _CONNECT.match(msg):
            self.connections += 1
            return
        m = _EVENTS.match(msg)
        if m:
            self.events[m[1]] += 1
            return
        m = _REJECT.match(msg)
        if m:
            self._reject(when, m)
            return
        m = _RELAYED.match(msg)
        if m:
            self.relayed += 1
            self.relayed_bytes += int(m["size"])
            net, sender = client_net(m["ip"]), m["sender"].lower()
            for (t_net, t_sender, _), triplet in self.greylist.items():
                if t_net == net and t_sender == sender and triplet.passed_at is None:
                    triplet.passed_at = when

    def _reject(self, when: float, m: re.Match[str]) -> None:
        fields = dict(_FIELD.findall(m["fields"] or ""))
        text = m["text"]
        if "Greylisted" in text:
            key = (client_net(m["ip"]), fields.get("from", "").lower(), fields.get("to", "").lower())
            self.greylist.setdefault(key, Triplet(first=when))
        self.rejects += 1
        self.rejects_by_class[f"{m['code'][0]}xx"] += 1
        self.reasons[(m["stage"], reason(text))] += 1
        self.clients[m["ip"]] += 1

    # ------------------------------------------------------------- output

    @property
    def cache_hit_ratio(self) -> float | None:
        """PASS OLD / (PASS OLD + PASS NEW): how often the allowlist cache spared the tests."""
        old, new = self.events["PASS OLD"], self.events["PASS NEW"]
        return old / (old + new) if old + new else None

    @property
    def greylist_passed(self) -> int:
        return sum(1 for t in self.greylist.values() if t.passed_at is not None)

    def delays(self) -> list[float]:
        return sorted(t.passed_at - t.first for t in self.greylist.values() if t.passed_at is not None)

    def delay_histogram(self) -> list[tuple[str, int]]:
        counts = Counter[str]()
        for d in self.delays():
            counts[next(label for bound, label in DELAY_BUCKETS if d < bound)] += 1
        return [(label, counts[label]) for _, label in DELAY_BUCKETS]

    def as_dict(self, top: int) -> dict[str, Any]:
        delays = self.delays()
        triplets = len(self.greylist)
        return {
            "period": {"first": _iso(self.first), "last": _iso(self.last)},
            "lines": self.lines,
            "connections": self.connections,
            "relayed": {"messages": self.relayed, "bytes": self.relayed_bytes},
            "rejects": {"total": self.rejects, **dict(sorted(self.rejects_by_class.items()))},
            "reject_reasons": [{"stage": s, "reason": r, "count": n} for (s, r), n in _top(self.reasons, top)],
            "top_rejected_clients": [{"client": c, "count": n} for c, n in _top(self.clients, top)],
            "screening_events": dict(sorted(self.events.items())),
            "allowlist_cache_hit_ratio": self.cache_hit_ratio,
            "greylist": {
                "triplets": triplets,
                "passed": self.greylist_passed,
                "pass_rate": (self.greylist_passed / triplets) if triplets else None,
                "delay_seconds": {"median": _quantile(delays, 0.5), "p90": _quantile(delays, 0.9),
                                  "max": delays[-1] if delays else None},
                "delay_histogram": dict(self.delay_histogram()),
            },
        }

    def render(self, top: int = 10) -> str:
        d = self.as_dict(top)
        out = [f"smtpguard report: {d['period']['first'] or '-'} .. {d['period']['last'] or '-'}", "",
               "Grand totals", "------------",
               f"{self.connections:8d}   connections",
               f"{self.relayed:8d}   messages relayed ({_size(self.relayed_bytes)})",
               f"{self.rejects:8d}   rejected ("
               + ", ".join(f"{n} {c}" for c, n in sorted(self.rejects_by_class.items())) + ")"
               if self.rejects else f"{0:8d}   rejected",
               "", f"Rejects by reason (top {top})", "-" * len(f"Rejects by reason (top {top})")]
        out += [f"{n:8d}   {s:<14} {r}" for (s, r), n in _top(self.reasons, top)] or ["    none"]
        out += ["", f"Top rejected clients (top {top})", "-" * len(f"Top rejected clients (top {top})")]
        out += [f"{n:8d}   {c}" for c, n in _top(self.clients, top)] or ["    none"]
        out += ["", "Screening events", "----------------"]
        out += [f"{n:8d}   {e}" for e, n in _top(self.events, len(self.events))] or ["    none"]
        if self.cache_hit_ratio is not None:
            out.append(f"           allowlist cache hits (PASS OLD / PASS OLD+NEW): {self.cache_hit_ratio:.1%}")
        g = d["greylist"]
        out += ["", "Greylisting", "-----------"]
        if not g["triplets"]:
            out.append("    no greylisted triplets")
        else:
            out += [f"{g['triplets']:8d}   triplets greylisted",
                    f"{g['passed']:8d}   passed later ({g['pass_rate']:.1%} pass rate)"]
            if g["passed"]:
                ds = g["delay_seconds"]
                out += [f"           delay: median {_dur(ds['median'])}, p90 {_dur(ds['p90'])}, "
                        f"max {_dur(ds['max'])}", "", "    delay distribution"]
                width = max(n for _, n in self.delay_histogram()) or 1
                out += [f"    {label:>7} {n:6d}  {'#' * round(40 * n / width)}" for label, n in self.delay_histogram()]
        return "\n".join(out) + "\n"


# ----------------------------------------------------------------- reading

def parse_time(line: str, now: datetime | None = None) -> tuple[float, str, str] | None:
    """``(unix time, program, message)`` of one log line, or None."""
    m = _SYSLOG.match(line)
    if m:
        now = now or datetime.now()
        stamp = datetime.strptime(f"{now.year} {m['mon']} {m['day']} {m['hms']}", "%Y %b %d %H:%M:%S")
        if (stamp - now).days > 180:  # e.g. December's lines read in January
            stamp = stamp.replace(year=now.year - 1)
        return time.mktime(stamp.timetuple()), m["prog"], m["msg"]
    m = _RFC3339.match(line)
    if m:
        return datetime.fromisoformat(m["ts"].replace("Z", "+00:00")).timestamp(), m["prog"], m["msg"]
    return None


def _open(path: str) -> IO[str]:
    if path == "-":
        return sys.stdin
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return Path(path).open(encoding="utf-8", errors="replace")


def read_lines(paths: Iterable[str]) -> Iterator[str]:
    for path in paths:
        f = _open(path)
        try:
            yield from f
        finally:
            if f is not sys.stdin:
                f.close()


def build(lines: Iterable[str], syslog_name: str | None = None, now: datetime | None = None) -> Report:
    """A :class:`Report` from log lines; with *syslog_name* only lines whose
    program starts with ``syslog_name/`` (or is exactly it) are read."""
    report = Report()
    for line in lines:
        parsed = parse_time(line.rstrip("\n"), now)
        if parsed is None:
            continue
        when, prog, msg = parsed
        if syslog_name and not (prog == syslog_name or prog.startswith(syslog_name + "/")):
            continue
        report.add(when, msg)
    return report


def main(paths: list[str], top: int = 10, as_json: bool = False, syslog_name: str | None = None) -> int:
    try:
        report = build(read_lines(paths or ["-"]), syslog_name)
    except OSError as exc:
        print(f"smtpguard: error: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(json.dumps(report.as_dict(top), indent=2) + "\n" if as_json else report.render(top))
    return 0


# ----------------------------------------------------------------- helpers

def _top(counter: Counter[Any], n: int) -> list[tuple[Any, int]]:
    """Most frequent first; ties in key order, so the output is stable."""
    return sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))[:n]


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return values[max(0, math.ceil(q * len(values)) - 1)]  # nearest rank


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t).isoformat(sep=" ", timespec="seconds")


def _dur(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} bytes"
    value = float(n)
    for unit in ("kB", "MB", "GB"):
        value /= 1024
        if value < 1024 or unit == "GB":
            break
    return f"{value:.1f} {unit}"
