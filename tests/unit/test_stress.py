"""Stress mode (smtpguard.stress): when it starts and ends, and what a
session that starts under stress gets."""

from __future__ import annotations

import logging

import pytest

from smtpguard.config import from_dict
from smtpguard.metrics import METRICS
from smtpguard.net import parse_ip
from smtpguard.pipeline import Pipeline
from smtpguard.session import Session
from smtpguard.store import MemoryStore
from smtpguard.stress import STRESS, StressConfig, command_timeout, connection_count_limit, greet_wait, under_stress
from smtpguard.verdict import Action


@pytest.mark.parametrize(("sessions", "was", "expected"), [
    (0, False, False), (799, False, False), (800, False, True), (1000, False, True),
    (799, True, True), (720, True, True), (719, True, False),  # leaves below 90% of the threshold
])
def test_under_stress_from_the_session_count(sessions: int, was: bool, expected: bool) -> None:
    assert under_stress(sessions, 1000, StressConfig(), was) is expected


def test_stress_values() -> None:
    assert not under_stress(1000, 1000, StressConfig(enabled=False), False)
    assert under_stress(1, 1, StressConfig(threshold=50), False)  # at least one session
    assert connection_count_limit(50, StressConfig()) == 25
    assert connection_count_limit(0, StressConfig()) == 0  # no limit stays no limit
    assert connection_count_limit(50, StressConfig(connection_count_limit=5)) == 5
    assert command_timeout(300, StressConfig(), True) == 10 and command_timeout(300, StressConfig(), False) == 300
    assert greet_wait(6, StressConfig(), True) == 2 and greet_wait(6, StressConfig(), False) == 6
    with pytest.raises(Exception, match=r"stress\.threshold: must be a percentage"):
        from_dict({"stress": {"threshold": 0}})


async def test_sessions_that_start_under_stress(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="smtpguard")
    STRESS.active = False
    cfg = from_dict({"server": {"max_connections": 10}, "limits": {"connection_count_limit": 4}})
    p = Pipeline(cfg, MemoryStore(lambda: 0.0), lambda: 0.0)
    calm = Session(parse_ip("192.0.2.7"), 1, "192.0.2.1", 25)
    assert (await p.on_connect(calm, 7, 3)).action is Action.CONTINUE
    assert not calm.stress and greet_wait(cfg.pregreet.greet_wait, cfg.stress, calm.stress) == 6.0
    entered = METRICS.stress_entered._value.get()
    busy = Session(parse_ip("192.0.2.7"), 2, "192.0.2.1", 25)
    v = await p.on_connect(busy, 8, 3)  # 80% of 10: stress; 3 > 4 // 2 from this client
    assert busy.stress and v.action is Action.DROP and "concurrency limit" in caplog.text
    assert "entering stress mode: 8 of 10 connections in use; command_timeout 10s, greet_wait 2s" in caplog.text
    assert METRICS.stress_mode._value.get() == 1 and METRICS.stress_entered._value.get() == entered + 1
    other = Session(parse_ip("192.0.2.8"), 1, "192.0.2.1", 25)
    await p.on_connect(other, 8, 1)
    assert other.stress and greet_wait(cfg.pregreet.greet_wait, cfg.stress, other.stress) == 2.0
    await p.on_connect(Session(parse_ip("192.0.2.9"), 1, "192.0.2.1", 25), 8, 1)  # leaving takes fewer than 8 * 0.9
    assert "leaving" not in caplog.text
    await p.on_connect(Session(parse_ip("192.0.2.9"), 2, "192.0.2.1", 25), 5, 1)
    assert "leaving stress mode: 5 of 10 connections in use" in caplog.text and METRICS.stress_mode._value.get() == 0
