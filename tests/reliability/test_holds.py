"""Clients that hold connections: silent ones (defect 6 of issue 16), under
stress mode, while a good client is still served."""

from __future__ import annotations

from collections.abc import Callable

from tests.integration.guard import Guard, RawClient
from tests.integration.ops import scrape, value
from tests.lab import PrivatePostfix
from tests.reliability.figures import record

MakeGuard = Callable[..., Guard]


def test_silent_clients_under_stress_are_let_go(backend: PrivatePostfix, make_guard: MakeGuard) -> None:
    """max_connections 10, stress from 50%: the silent clients that came
    under stress get the stress command timeout (1 s here) instead of
    command_timeout (300 s), so their slots come back; a good client is served."""
    g = make_guard(backend.port, '[server]\nmax_connections = 10\n'
                   '[stress]\nthreshold = 50\ncommand_timeout = "1s"\n[pregreet]\ngreet_wait = "0s"\n')
    silent = []
    for i in range(8):
        c = RawClient(g.port, source=f"127.0.7.{i + 1}", timeout=30)
        assert c.reply().startswith("220 "), i  # the banner, then nothing
        silent.append(c)
    g.wait_for_log(r"warning: entering stress mode: 5 of 10 connections in use")
    assert value(scrape(g.metrics_port), "smtpguard_stress_mode") == 1
    # The ones that came under stress are timed out; the four before it are not.
    for c in silent[4:]:
        assert c.closed(timeout=10)
        assert c.buf.startswith(b"421 4.4.2 mx.guard.test Error: timeout exceeded")
    for c in silent[:4]:
        assert not c.closed(timeout=0.1)  # started before stress: command_timeout, 300 s
    for c in silent[:2]:
        c.close()
    for ip in ("127.0.7.1", "127.0.7.2"):
        g.wait_for_log(rf"DISCONNECT \[{ip}\]")
    good = RawClient(g.port, source="127.0.8.1")
    good.reply()
    assert good.transaction()[-1].startswith("250 2.0.0 Ok: queued as")
    good.cmd("QUIT")
    g.wait_for_log(r"warning: leaving stress mode: 3 of 10 connections in use")
    backend.wait_for_messages(1)
    record("silent clients under stress mode", silent=len(silent), let_go_after_s=1, good_client_served=1)
