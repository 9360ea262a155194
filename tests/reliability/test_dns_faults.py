"""The DNS under faults (issue 16): the private dnsmasq smtpguard asks is
stopped, then frozen (SIGSTOP), while mail flows.  Every session is still
answered within the DNS timeouts (docs/dns.md, "Failure policy"): a DNSBL
that does not answer counts as not listed, the client-name and sender-domain
checks follow ``on_dns_error`` (``tempfail``: 450 at RCPT, ``skip``:
nothing), never a 5xx, never an internal error; and since temporary
failures are not cached, mail is accepted again as soon as the DNS is back.

Two smtpguards run side by side against the one dnsmasq, one with
``on_dns_error = "tempfail"`` (the default) and one with ``"skip"``; every
session uses a client address and a sender domain of its own, so nothing is
answered from smtpguard's cache."""

from __future__ import annotations

import collections
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from tests.integration.guard import Guard, RawClient
from tests.lab import DnsServer, PrivatePostfix, frozen
from tests.reliability.figures import record, size

MakeGuard = Callable[..., Guard]

GREET_WAIT = 0.3
TIMEOUT, LIFETIME = 0.5, 1.0
#: the most a session may take with the DNS gone: the greet wait, the client
#: names (PTR, then the names' addresses) and the sender domain (MX, then
#: A/AAAA), each question within its lifetime, and a margin for 2 shared cores
BOUND = GREET_WAIT + 4 * LIFETIME + 1.5
CLIENTS = 2000  # client addresses with a forward-confirmed name, 127.0.16.1 ...


def hosts_file(path: Path) -> Path:
    """/etc/hosts-style records for dnsmasq --addn-hosts: each client
    address with its name (A and PTR), and one sender domain per client."""
    lines = []
    for n in range(CLIENTS):
        ip = f"127.0.{16 + n // 250}.{n % 250 + 1}"
        lines.append(f"{ip} h{n}.client.test")
        lines.append(f"192.0.2.25 s{n}.sender.test")
    path.write_text("\n".join(lines) + "\n")
    return path


def config(dns: DnsServer, on_dns_error: str) -> str:
    return (f'[dns]\nnameservers = ["{dns.address}:{dns.port}"]\ntimeout = "{TIMEOUT}s"\nlifetime = "{LIFETIME}s"\n'
            f'[pregreet]\ngreet_wait = "{GREET_WAIT}s"\n'
            '[dnsbl]\nsites = ["zen.test*2", "bl.test"]\n'
            f'[client_name]\nenabled = true\nrequire = "fcrdns"\non_dns_error = "{on_dns_error}"\n'
            f'[sender_domain]\nenabled = true\non_dns_error = "{on_dns_error}"\n'
            '[limits]\nconnection_count_limit = 0\n')


class Phase:
    """*sessions* client addresses, each sending one message to both
    smtpguards, *threads* sessions at a time per smtpguard; the reply to RCPT (or to the end of data) and the time
    taken, per smtpguard."""

    def __init__(self, guards: dict[str, Guard], numbers: Iterator[int], sessions: int, threads: int = 4) -> None:
        self.guards = guards
        self.lock = threading.Lock()
        self.replies: dict[str, collections.Counter[str]] = {k: collections.Counter() for k in guards}
        self.longest: dict[str, float] = dict.fromkeys(guards, 0.0)
        self.work = [(name, n) for n in itertools.islice(numbers, sessions) for name in guards]
        workers = [threading.Thread(target=self._run, daemon=True) for _ in range(threads * len(guards))]
        for w in workers:
            w.start()
        for w in workers:
            w.join(sessions * BOUND * 2 + 30)

    def _run(self) -> None:
        while True:
            with self.lock:
                if not self.work:
                    return
                name, n = self.work.pop(0)
            try:
                took, reply = session(self.guards[name].port, n)
            except (AssertionError, OSError, ConnectionError) as exc:
                took, reply = 0.0, f"error: {exc!r}"
            with self.lock:
                self.replies[name][reply] += 1
                self.longest[name] = max(self.longest[name], took)


def session(port: int, n: int) -> tuple[float, str]:
    """One message from client *n*; the time and the last reply's code and
    enhanced status (``250 2.0.0``, ``450 4.7.25``...)."""
    start = time.monotonic()
    c = RawClient(port, source=f"127.0.{16 + n // 250}.{n % 250 + 1}", timeout=30)
    try:
        assert c.reply().splitlines()[-1].startswith("220 ")  # after the 220- teaser and the greet wait
        replies = c.transaction(sender=f"a@s{n}.sender.test", subject=f"dns {n}")
        c.cmd("QUIT")
    finally:
        c.close()
    last = next((r for r in replies if not r.startswith(("250", "354"))), replies[-1])
    return time.monotonic() - start, last[:9]


def test_dns_down_and_frozen_while_mail_flows(tmp_path: Path, backend: PrivatePostfix, make_guard: MakeGuard,
                                              dns_server: Callable[..., DnsServer]) -> None:
    dns = dns_server(["--local-ttl=300", f"--addn-hosts={hosts_file(tmp_path / 'hosts')}"])
    guards = {mode: make_guard(backend.port, config(dns, mode)) for mode in ("tempfail", "skip")}
    numbers = itertools.count()
    per_phase = size(4, 200)
    ok = collections.Counter({"250 2.0.0": per_phase})
    results = {}

    def phase(name: str) -> Phase:
        p = Phase(guards, numbers, per_phase)
        results[name] = p
        return p

    assert phase("DNS up").replies == {"tempfail": ok, "skip": ok}
    dns.stop()  # down: nothing listens on its port
    down = phase("DNS down")
    dns.start()
    assert phase("DNS back").replies == {"tempfail": ok, "skip": ok}  # failures were not cached
    with frozen(dns.proc):  # its socket stays bound: queries time out
        stopped = phase("DNS frozen")
    assert phase("DNS thawed").replies == {"tempfail": ok, "skip": ok}

    for name, p in results.items():
        for mode in guards:
            record(f"DNS: {name}, on_dns_error = {mode}", sessions=per_phase,
                   replies=dict(p.replies[mode]), longest_s=f"{p.longest[mode]:.2f}")
    for p in (down, stopped):
        # The client name's PTR fails first: 450 4.7.25 at RCPT; the DNSBL counts as not listed.
        assert p.replies["tempfail"] == collections.Counter({"450 4.7.2": per_phase}), p.replies
        assert p.replies["skip"] == ok, p.replies
        assert max(p.longest.values()) < BOUND, p.longest
    assert max(p.longest[m] for p in results.values() for m in guards) < BOUND
    for g in guards.values():
        log = g.full_log()
        assert "internal error" not in log and "Traceback" not in log
        assert "warning: DNS lookup error for " in log
        assert "list=lookup failed" in log or "lookup failed)" in log
    backend.wait_for_messages(per_phase * 8)  # 3 phases x 2 smtpguards, 2 x skip
