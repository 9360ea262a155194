"""Error and command limits: smtpd's soft/hard error limits, postscreen's
command count limit.

How it works: every 4xx/5xx reply the session sends counts as an error
(Postfix's ``error_count``).  From ``soft_limit`` errors on, each further
error reply is held back ``error_sleep`` (smtpd_error_sleep_time) -- the
tarpit that slows down dictionary attacks; :func:`error_delay` says how
long.  At ``hard_limit`` errors the next command gets ``421 4.7.0
mx.example.com Error: too many errors`` and the connection is closed,
logged as ``too many errors after RCPT from unknown[a]:p``
(:func:`check_error_limit`).  ``command_count_limit`` bounds the commands a
client may send before its first recipient passes screening (the part of the
session postscreen would screen; 0 = no limit): ``421 4.7.0 ... Error: too
many commands``.  The read timeout for one command is ``command_time_limit``
until then (when shorter than ``server.command_timeout``, which applies after).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..options import ConfigError, one_of, opt, parse_bool, parse_duration, parse_int
from ..verdict import Outcome, Reply, Result, verdict_for
from ._common import passed, skip


@dataclass(frozen=True)
class ErrorsConfig:
    """``[errors]``: smtpd_*_error_limit, postscreen_command_*_limit."""

    enabled: bool = field(default=True, metadata=opt(parse_bool, ""))
    action: str = field(default="drop", metadata=opt(one_of("ignore", "drop"), ""))
    soft_limit: int = field(default=10, metadata=opt(parse_int, "smtpd_soft_error_limit"))
    hard_limit: int = field(default=20, metadata=opt(parse_int, "smtpd_hard_error_limit"))
    error_sleep: float = field(default=1.0, metadata=opt(parse_duration, "smtpd_error_sleep_time"))
    command_count_limit: int = field(default=20, metadata=opt(parse_int, "postscreen_command_count_limit"))
    command_time_limit: float = field(default=300.0, metadata=opt(parse_duration, "postscreen_command_time_limit"))

    def validate(self) -> None:
        if self.hard_limit and self.soft_limit > self.hard_limit:
            raise ConfigError("soft_limit", f"must not exceed hard_limit ({self.hard_limit})")
        if self.command_time_limit <= 0:
            raise ConfigError("command_time_limit", "must be positive")


def error_delay(cfg: ErrorsConfig, errors: int) -> float:
    """Seconds to hold back an error reply when the session already made
    *errors* errors."""
    if not cfg.enabled or cfg.action == "ignore" or not cfg.soft_limit or errors < cfg.soft_limit:
        return 0.0
    return cfg.error_sleep


def _limit(check: str, cfg: ErrorsConfig, reply: Reply, reason: str) -> Result:
    return Result(check, Outcome.FAIL, reason, verdict_for(cfg.action, reply, as_given=True))


def check_error_limit(cfg: ErrorsConfig, errors: int, hostname: str, command: str, who: str) -> Result:
    """Before each command: the hard error limit."""
    if not cfg.enabled or not cfg.hard_limit:
        return skip("errors", "disabled")
    if errors < cfg.hard_limit:
        return passed("errors", f"{errors} errors")
    reply = Reply(421, "4.7.0", f"{hostname} Error: too many errors")
    return _limit("errors", cfg, reply, f"too many errors after {command or 'CONNECT'} from {who}")


def check_command_count(cfg: ErrorsConfig, commands: int, hostname: str, who: str) -> Result:
    """*commands*: commands so far (this one included) before the first
    recipient passed screening."""
    if not cfg.enabled or not cfg.command_count_limit:
        return skip("command_count", "disabled")
    if commands <= cfg.command_count_limit:
        return passed("command_count", f"{commands} commands")
    reply = Reply(421, "4.7.0", f"{hostname} Error: too many commands")
    return _limit("command_count", cfg, reply, f"COMMAND COUNT LIMIT from {who} after {commands - 1} commands")
