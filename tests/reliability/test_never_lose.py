"""Never lose a message: thousands of messages (``make soak``; a few hundred
in ``make test``) through smtpguard while Postfix is stopped, its smtpd
processes are killed with SIGKILL in mid-transaction, every Postfix process
is frozen with SIGSTOP, and smtpguard is reloaded.  Every message a
client got 250 for must be in Postfix's Maildir; a temporary fault must never
give a 5xx."""

from __future__ import annotations

import collections
import contextlib
import itertools
import os
import signal
import threading
import time
from collections.abc import Callable

from tests.integration.guard import Guard, RawClient
from tests.lab import LabError, PrivatePostfix, wait_until
from tests.reliability.figures import record, size

MakeGuard = Callable[..., Guard]


class Load:
    """Client threads sending one message per connection, each with a
    unique subject; what each got is counted."""

    def __init__(self, port: int, total: int, threads: int = 4) -> None:
        self.port = port
        self.total = total
        self.ids = itertools.count()
        self.acknowledged: set[str] = set()
        self.codes: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(t,), daemon=True) for t in range(threads)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self, timeout: float) -> None:
        for t in self.threads:
            t.join(timeout)

    @property
    def sent(self) -> int:
        return sum(self.codes.values())

    def _run(self, t: int) -> None:
        while (n := next(self.ids)) < self.total:
            subject = f"msg-{n}"
            outcome = self._one(f"127.0.9.{t + 1}", subject)
            with self.lock:
                self.codes[outcome] += 1
                if outcome == "250":
                    self.acknowledged.add(subject)
            if outcome != "250":
                time.sleep(0.1)  # pacing, as a client retrying later: not a wait for a result

    def _one(self, source: str, subject: str) -> str:
        try:
            c = RawClient(self.port, source=source, timeout=60)
        except OSError:
            return "refused"
        try:
            if not c.reply().startswith("220"):
                return "no banner"
            for command in ("EHLO client.example", "MAIL FROM:<a@sender.test>", "RCPT TO:<bob@example.test>"):
                reply = c.cmd(command)
                if not reply.startswith("250"):
                    return reply[:3]
            reply = c.cmd("DATA")  # the body only after a 354, as a real client
            if reply.startswith("354"):
                c.send(f"Subject: {subject}\r\n\r\nhello\r\n.\r\n".encode())
                reply = c.reply()
            c.send(b"QUIT\r\n")
            return reply[:3]
        except (OSError, ConnectionError):
            return "dropped"
        finally:
            c.close()


def _all_pids(backend: PrivatePostfix) -> list[int]:
    from tests.lab import _pids_with_cwd_under
    return _pids_with_cwd_under(backend.queue_dir)


def test_never_lose_with_postfix_stopped_killed_frozen_and_reloads(backend: PrivatePostfix,
                                                                    make_guard: MakeGuard) -> None:
    # An smtpd killed by a signal makes master throttle the service (60 s by default).
    backend.postconf(service_throttle_time="1s")
    total = size(300, 10000)
    rounds = size(1, 6)
    g = make_guard(backend.port, '[pregreet]\ngreet_wait = "0s"\n', upstream_extra='timeout = "3s"\n')
    assert g.proc is not None
    load = Load(g.port, total)
    load.start()
    faults: collections.Counter[str] = collections.Counter()

    def progressed(by: int) -> None:
        target = min(total, load.sent + by)
        wait_until(lambda: load.sent >= target or load.sent >= total, 120, f"{target} messages sent")

    for _ in range(rounds):
        progressed(total // (rounds * 5))
        backend.stop()  # postfix stop
        faults["stopped"] += 1
        progressed(5)
        _restart(backend)
        progressed(total // (rounds * 5))
        _signal(backend.pids("smtpd"), signal.SIGKILL)  # kill -9 of the smtpd processes, mid-transaction
        faults["smtpd_killed"] += 1
        progressed(total // (rounds * 5))
        frozen = _all_pids(backend)
        _signal(frozen, signal.SIGSTOP)  # every process stopped: connections hang
        faults["frozen"] += 1
        time.sleep(4)  # the fault: longer than upstream.timeout
        _signal(frozen, signal.SIGCONT)
        progressed(total // (rounds * 5))
        g.proc.send_signal(signal.SIGHUP)
        faults["reloads"] += 1
    load.join(600)
    assert load.sent == total, load.codes
    delivered = wait_until(lambda: _delivered(backend) >= load.acknowledged and _delivered(backend), 120,
                           "every acknowledged message in the Maildir",
                           on_timeout=lambda: str(sorted(load.acknowledged - _delivered(backend))[:20]))
    lost = load.acknowledged - delivered
    five = sum(n for code, n in load.codes.items() if code.startswith("5"))
    record("never-lose: Postfix stopped/smtpd killed/frozen, reloads", messages=total,
           acknowledged=len(load.acknowledged), lost=len(lost), five_xx=five,
           delivered_unacknowledged=len(delivered - load.acknowledged),
           **dict(faults), outcomes=dict(load.codes))
    assert not lost and five == 0, load.codes
    assert "internal error" not in g.full_log()


def _restart(backend: PrivatePostfix) -> None:
    """``postfix start`` after a stop under load; its integrity check (postsuper)
    now and then refuses once (seen: "open logfile ...: Permission denied" while
    the previous postlogd lets go of the log): try again."""
    for attempt in range(3):
        try:
            backend.start()
            return
        except LabError:
            if attempt == 2:
                raise


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _delivered(backend: PrivatePostfix) -> set[str]:
    subjects = set()
    for m in backend.messages():
        for line in m.split(b"\n\n", 1)[0].split(b"\n"):
            if line.startswith(b"Subject: msg-"):
                subjects.add(line[9:].decode())
    return subjects
