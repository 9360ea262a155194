"""Clients that hold a connection by sending slowly (issue 16): slowloris
(a command trickled one byte at a time), an endless line with no LF, and a
message body trickled one byte at a time.  The listener's own limits let
them go -- the command deadline (``server.command_timeout``, not reset by
the bytes of an unfinished line), ``line_length_limit`` (an over-long
line is discarded as it comes) and stress mode -- while a good client is
served within a bound and smtpguard's memory stays flat."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

from tests.integration.guard import Guard, RawClient
from tests.lab import PrivatePostfix, wait_until
from tests.reliability.figures import record, size
from tests.reliability.test_fuzz import rss_kib

MakeGuard = Callable[..., Guard]


class Holder(threading.Thread):
    """A client that sends *chunk* every *interval* seconds after *prefix*,
    until smtpguard closes the connection; when that was, and what it said."""

    def __init__(self, port: int, source: str, prefix: list[str], chunk: bytes, interval: float) -> None:
        super().__init__(daemon=True)
        self.client = RawClient(port, source=source, timeout=120)
        self.prefix, self.chunk, self.interval = prefix, chunk, interval
        self.started = 0.0
        self.held_s: float | None = None  # from the first slow byte to the close
        self.sent = 0
        self.stop = threading.Event()

    def run(self) -> None:
        c = self.client
        try:
            assert c.reply().startswith("220 ")
            for command in self.prefix:
                reply = c.cmd(command)
                assert reply[:3] in ("250", "354"), (command, reply)
            self.started = time.monotonic()
            c.sock.settimeout(self.interval)
            while not self.stop.is_set():
                c.send(self.chunk)
                self.sent += len(self.chunk)
                try:
                    if not c.sock.recv(4096, socket.MSG_PEEK):
                        break  # closed
                    c.buf += c.sock.recv(4096)
                    if b"421" in c.buf:
                        break
                except TimeoutError:
                    pass
        except (ConnectionError, OSError):
            pass  # a reset: we were still sending into a closed connection
        finally:
            if not self.stop.is_set():
                self.held_s = time.monotonic() - self.started
            c.close()


def good_sessions(port: int, n: int, source: str = "127.0.8.1") -> list[float]:
    """*n* complete sessions (connect, one message, QUIT), each timed."""
    took = []
    for i in range(n):
        start = time.monotonic()
        c = RawClient(port, source=source, timeout=30)
        assert c.reply().startswith("220 ")
        assert c.transaction(subject=f"good {i}")[-1].startswith("250 2.0.0 Ok: queued as")
        c.cmd("QUIT")
        c.close()
        took.append(time.monotonic() - start)
    return took


def test_slowloris_and_endless_lines_are_let_go_at_the_command_deadline(backend: PrivatePostfix,
                                                                        make_guard: MakeGuard) -> None:
    """A command trickled one byte at a time, and an endless line without LF
    at ~1.6 MB/s: the bytes do not push back the command deadline, the
    endless line is discarded as it comes; a good client meanwhile is
    served at once and memory stays flat."""
    timeout = size(2, 10)
    per_kind = size(5, 100)
    g = make_guard(backend.port, f'[server]\ncommand_timeout = "{timeout}s"\nmax_connections = 1000\n'
                   '[pregreet]\ngreet_wait = "0s"\n[limits]\nconnection_count_limit = 0\n'
                   '[stress]\nenabled = false\n')
    assert g.proc is not None
    before = rss_kib(g.proc.pid)
    trickle = [Holder(g.port, f"127.0.10.{i % 250 + 1}", [], b"E", 0.2) for i in range(per_kind)]
    endless = [Holder(g.port, f"127.0.11.{i % 250 + 1}", ["EHLO endless.example"], b"A" * 16384, 0.01)
               for i in range(per_kind)]
    holders = trickle + endless
    for h in holders:
        h.start()
    took = good_sessions(g.port, size(5, 50))
    peak = rss_kib(g.proc.pid)
    for h in holders:
        h.join(timeout + 30)
    after = rss_kib(g.proc.pid)
    assert all(h.held_s is not None for h in holders)
    held = [h.held_s for h in holders if h.held_s is not None]
    record("slowloris + endless line (no LF), command_timeout", holders=len(holders),
           command_timeout_s=timeout, longest_hold_s=f"{max(held):.1f}",
           endless_bytes_sent=sum(h.sent for h in endless), good_sessions=len(took),
           good_longest_s=f"{max(took):.3f}", rss_before_kib=before, rss_peak_kib=peak, rss_after_kib=after)
    assert max(held) < timeout + 3, held  # the deadline, not the trickle, decides
    assert max(took) < 2.0, took
    for h in trickle:
        assert h.client.buf.startswith(b"421 4.4.2 mx.guard.test Error: timeout exceeded"), h.client.buf
    assert peak - before < 20 * 1024 and after - before < 20 * 1024, (before, peak, after)
    assert "internal error" not in g.full_log()
    backend.wait_for_messages(len(took))


def test_trickled_data_under_stress_is_let_go(backend: PrivatePostfix, make_guard: MakeGuard) -> None:
    """Message bodies trickled one byte at a time (no LF): each byte is
    activity, so ``server.data_timeout`` (an idle timer, as smtpd_timeout)
    never fires.  Sessions that started under stress get Postfix's
    stress behaviour (``smtpd_timeout = ${stress?10}``,
    ``smtpd_per_record_deadline = ${stress?yes}``): the stress timeout is a
    deadline for each line of the body, so they are let go and a good
    client is served."""
    stress_timeout = 1
    g = make_guard(backend.port, '[server]\nmax_connections = 10\n'
                   f'[stress]\nthreshold = 50\ncommand_timeout = "{stress_timeout}s"\n'
                   '[pregreet]\ngreet_wait = "0s"\n')
    assert g.proc is not None
    before = rss_kib(g.proc.pid)
    prefix = ["EHLO trickle.example", "MAIL FROM:<a@sender.test>", "RCPT TO:<bob@example.test>", "DATA"]
    calm = [Holder(g.port, f"127.0.12.{i + 1}", prefix, b"x", 0.2) for i in range(4)]
    for h in calm:
        h.start()
    wait_until(lambda: all(h.started for h in calm), 10, "four clients in DATA")
    # The fifth connection makes stress (50% of 10): it and the next ones start under it.
    stressed = [Holder(g.port, f"127.0.12.{i + 5}", prefix, b"x", 0.2) for i in range(4)]
    g.wait_for_log(r"warning: entering stress mode: 5 of 10 connections in use")
    for h in stressed:
        h.start()
    for h in stressed:
        h.join(stress_timeout + 10)
    held = [h.held_s for h in stressed]
    assert all(s is not None and s < stress_timeout + 2 for s in held), held
    for h in stressed:
        assert b"421 4.4.2 mx.guard.test Error: timeout exceeded" in h.client.buf, h.client.buf
    assert all(h.is_alive() for h in calm)  # not under stress: data_timeout, an idle timer (smtpd's)
    for h in calm:
        h.stop.set()
    for h in calm:
        h.join(5)
    took = good_sessions(g.port, 3)
    after = rss_kib(g.proc.pid)
    record("trickled DATA (1 byte / 0.2 s) under stress", holders=len(calm) + len(stressed),
           under_stress=len(stressed), stress_timeout_s=stress_timeout,
           longest_stressed_hold_s=f"{max(s or 0 for s in held):.1f}",
           good_longest_s=f"{max(took):.3f}", rss_before_kib=before, rss_after_kib=after)
    assert max(took) < 2.0, took
    assert after - before < 20 * 1024, (before, after)
    assert "internal error" not in g.full_log()
