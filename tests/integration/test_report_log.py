"""``smtpguard report`` on the log a real smtpguard wrote."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable

import pytest

from tests.integration.guard import Guard
from tests.integration.test_metrics import BODY1, BODY2, BODY3, scripted_sessions
from tests.lab import PrivatePostfix

pytestmark = pytest.mark.postfix


def test_report_on_guard_log(backend: PrivatePostfix, make_guard: Callable[..., Guard]) -> None:
    g = make_guard(backend.port, "[server]\nmax_connections = 1\n")
    scripted_sessions(backend, g)
    g.wait_for_log(r"DISCONNECT \[127\.0\.0\.15\]")
    r = subprocess.run([sys.executable, "-m", "smtpguard", "report", "--json", str(g.log_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["connections"] == 6
    assert d["relayed"] == {"messages": 3, "bytes": len(BODY1) + len(BODY2) + len(BODY3)}
    assert d["rejects"] == {"total": 2, "4xx": 1, "5xx": 1}
    assert d["top_rejected_clients"] == [{"client": "127.0.0.14", "count": 1}, {"client": "127.0.0.16", "count": 1}]
    assert {(x["stage"], x["reason"]) for x in d["reject_reasons"]} == {
        ("CONNECT", "All server ports are busy"), ("END-OF-MESSAGE", "Error: bare <CR> or <LF> received")}
    text = subprocess.run([sys.executable, "-m", "smtpguard", "report", str(g.log_path)],
                          capture_output=True, text=True, timeout=60, check=True).stdout
    assert "6   connections" in text and "3   messages relayed" in text
