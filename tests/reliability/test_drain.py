"""Drain under load: SIGTERM while clients keep sending.  smtpguard stops
accepting, lets the transactions in progress finish (Postfix's answer reaches
their clients), tells idle sessions ``421``, and exits 0 within
``shutdown_timeout``; every message a client got 250 for is in Postfix's
Maildir, and no client gets a 5xx for the shutdown."""

from __future__ import annotations

import signal
from collections.abc import Callable

from tests.integration.guard import Guard
from tests.lab import PrivatePostfix, wait_until
from tests.reliability.figures import record, size
from tests.reliability.test_never_lose import Load, _delivered

MakeGuard = Callable[..., Guard]


def test_sigterm_under_load_drains_without_losing_or_half_acknowledging(backend: PrivatePostfix,
                                                                        make_guard: MakeGuard) -> None:
    before = size(100, 2000)
    g = make_guard(backend.port, '[server]\nshutdown_timeout = "20s"\n[pregreet]\ngreet_wait = "0s"\n')
    assert g.proc is not None
    load = Load(g.port, total=10 * before, threads=8)
    load.start()
    wait_until(lambda: load.sent >= before, 120, f"{before} messages sent")
    g.proc.send_signal(signal.SIGTERM)
    code = g.proc.wait(60)
    load.total = 0  # the clients stop after their current attempt
    load.join(60)
    delivered = wait_until(lambda: _delivered(backend) >= load.acknowledged and _delivered(backend), 60,
                           "every acknowledged message in the Maildir",
                           on_timeout=lambda: str(sorted(load.acknowledged - _delivered(backend))[:20]))
    lost = load.acknowledged - delivered
    five = sum(n for outcome, n in load.codes.items() if outcome.startswith("5"))
    record("drain: SIGTERM under 8 sending clients", sent=load.sent, acknowledged=len(load.acknowledged),
           lost=len(lost), five_xx=five, exit_code=code, outcomes=dict(load.codes))
    assert code == 0
    assert not lost and five == 0, load.codes
    log = g.full_log()
    assert "internal error" not in log and "Traceback" not in log
