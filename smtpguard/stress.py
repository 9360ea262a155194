"""Stress-adaptive limits, after Postfix's STRESS_README.

When smtpguard holds many connections -- a bot flood, or clients that
connect and say nothing -- the normal timeouts let each of them keep a slot
for minutes (``server.command_timeout`` 300 s): 20 addresses x 50
connections fill the default 1,000.  Postfix answers that with "stress
mode": above its process limit, shorter timeouts (``smtpd_timeout``
``${stress?10}``, ``postscreen_greet_wait`` ``${stress?2}``) free the slots
of the idle clients while real senders, who answer in milliseconds, notice
nothing.

smtpguard does the same from the share of ``server.max_connections`` in use:
:func:`under_stress` decides (a pure function of the session count, with a
little hysteresis so the mode does not flap at the threshold), the
:class:`StressMonitor` keeps the current mode, logs ``entering stress mode`` /
``leaving stress mode`` and sets ``smtpguard_stress_mode``; the pipeline asks it
at every connect (:meth:`StressMonitor.update`) and a session that starts
under stress is given the ``[stress]`` values for its whole life (its greet
wait and its command timeout, which the session machine takes from
:func:`greet_wait` and :func:`command_timeout` with ``Session.stress``; the
per-client connection limit it is checked against).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from .metrics import METRICS
from .options import ConfigError, opt, parse_bool, parse_duration, parse_int

log = logging.getLogger("smtpguard")

#: stress mode ends when the sessions fall this far below the threshold
LEAVE_BELOW = 0.9


@dataclass(frozen=True)
class StressConfig:
    """``[stress]``: the values used while smtpguard is under stress."""

    enabled: bool = field(default=True, metadata=opt(
        parse_bool, "stress (STRESS_README)",
        "Adapt to overload as Postfix does: sessions that start while more than `threshold` percent of "
        "`server.max_connections` are in use get the shorter stress values below."))
    threshold: int = field(
        default=80,
        metadata=opt(parse_int, "the process limit (Postfix enters stress mode when it is reached)",
                     "Percentage of `server.max_connections` in use from which smtpguard is under stress."),
    )
    command_timeout: float = field(default=10.0, metadata=opt(
        parse_duration, "smtpd_timeout = ${stress?10}",
        "Idle time allowed per command for a session that started under stress (instead of "
        "`server.command_timeout`); in DATA, the time allowed for each line of the message (instead of "
        "`server.data_timeout`; Postfix's `smtpd_per_record_deadline = ${stress?yes}`)."))
    greet_wait: float = field(default=2.0, metadata=opt(
        parse_duration, "postscreen_greet_wait = ${stress?2}",
        "Pregreet wait for a session that started under stress (instead of `pregreet.greet_wait`)."))
    connection_count_limit: int = field(
        default=0,
        metadata=opt(parse_int, "smtpd_client_connection_count_limit",
                     "Per-client connection limit under stress; 0: half of `limits.connection_count_limit`."),
    )

    def validate(self) -> None:
        if not 0 < self.threshold <= 100:
            raise ConfigError("threshold", "must be a percentage from 1 to 100")


def under_stress(sessions: int, max_connections: int, cfg: StressConfig, was: bool) -> bool:
    """Is smtpguard under stress with *sessions* open?  From ``threshold``
    of *max_connections* on; once in, until the sessions fall below
    :data:`LEAVE_BELOW` of that."""
    if not cfg.enabled:
        return False
    enter = max(1, math.ceil(cfg.threshold * max_connections / 100))
    return sessions >= (enter * LEAVE_BELOW if was else enter)


def connection_count_limit(normal: int, cfg: StressConfig) -> int:
    """The per-client connection limit under stress (0 stays "no limit")."""
    if cfg.connection_count_limit:
        return cfg.connection_count_limit
    return max(1, normal // 2) if normal else 0


def command_timeout(normal: float, cfg: StressConfig, stressed: bool) -> float:
    """A session's idle timeout: *normal*, or the stress value for a session
    that started under stress."""
    return min(normal, cfg.command_timeout) if stressed else normal


def greet_wait(normal: float, cfg: StressConfig, stressed: bool) -> float:
    """A session's pregreet wait: *normal*, or the stress value for a
    session that started under stress."""
    return min(normal, cfg.greet_wait) if stressed else normal


class StressMonitor:
    """The process's stress mode; one per process (:data:`STRESS`)."""

    def __init__(self) -> None:
        self.active = False

    def update(self, sessions: int, max_connections: int, cfg: StressConfig) -> bool:
        """Decide with the current session count; log and count a change."""
        now = under_stress(sessions, max_connections, cfg, self.active)
        if now != self.active:
            self.active = now
            METRICS.stress_mode.set(1 if now else 0)
            if now:
                METRICS.stress_entered.inc()
                log.warning("entering stress mode: %d of %d connections in use; command_timeout %gs, "
                            "greet_wait %gs", sessions, max_connections, cfg.command_timeout, cfg.greet_wait)
            else:
                log.warning("leaving stress mode: %d of %d connections in use", sessions, max_connections)
        return now


STRESS = StressMonitor()
