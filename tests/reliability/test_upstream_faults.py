"""The upstream Postfix under faults: a slow reply to the final dot, and
never-lose with Postfix stopped, killed and frozen."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import pytest

from tests.integration.guard import Guard, RawClient
from tests.lab import PrivatePostfix, wait_until

MakeGuard = Callable[..., Guard]


@pytest.mark.parametrize("short", ["upstream.timeout", "server.data_timeout"])
def test_slow_end_of_data_reply_waits_data_done_timeout(backend: PrivatePostfix, make_guard: MakeGuard,
                                                        short: str) -> None:
    """Postfix's cleanup frozen while it takes the message: smtpd answers the
    final dot late.  Neither the per-command upstream timeout nor the
    client's idle timer in DATA (1 s here) may apply to that reply (RFC 1047;
    Postfix's smtp_data_done_timeout, 600 s): a 4xx there while Postfix
    queues the message anyway makes a duplicate."""
    if short == "upstream.timeout":
        g = make_guard(backend.port, upstream_extra='timeout = "1s"\n')
    else:
        g = make_guard(backend.port, '[server]\ndata_timeout = "1s"\n')
    c = RawClient(g.port, timeout=30)
    c.reply()
    c.cmd("EHLO client.example")
    assert c.cmd("MAIL FROM:<a@sender.test>").startswith("250")
    assert c.cmd("RCPT TO:<bob@example.test>").startswith("250")
    assert c.cmd("DATA").startswith("354")
    c.send(b"Subject: slow end of data\r\n\r\nbody\r\n")
    cleanups = wait_until(lambda: backend.pids("cleanup"), 10, "Postfix's cleanup process")
    for pid in cleanups:
        os.kill(pid, signal.SIGSTOP)
    try:
        c.send(b".\r\n")
        time.sleep(2.5)  # the fault: longer than upstream.timeout, far shorter than data_done_timeout
    finally:
        for pid in cleanups:
            os.kill(pid, signal.SIGCONT)
    reply = c.reply()
    assert reply.startswith("250 2.0.0 Ok: queued as"), reply
    c.cmd("QUIT")
    assert len(backend.wait_for_messages(1)) == 1
