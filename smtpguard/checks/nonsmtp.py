"""Non-SMTP commands: HTTP requests and message headers sent as commands.

How it works: a command whose verb is one of ``forbidden_commands``
(postscreen_forbidden_commands: ``CONNECT GET POST``) or whose first word
looks like a header label (``Subject:``, ``Host:``) is not SMTP: an open
proxy relaying a bot, or a client that lost its place.  Postscreen's log
line: ``NON-SMTP COMMAND from [a]:p after CONNECT: GET / HTTP/1.1``.
Default action ``drop``: ``521`` and hang up (postscreen_non_smtp_command_action).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..options import list_of, one_of, opt, parse_bool, parse_duration, parse_str
from ..verdict import ACTIONS, Result, ScreenTest
from ._common import PROTOCOL_ERROR, escape, failed, passed, skip

NAME = ScreenTest.NON_SMTP
_HEADER = re.compile(rb"[!-9;-~]+:")  # a header field name and its colon, no space before it


def parse_verb(value: object) -> str:
    """A command verb, stored in upper case."""
    return parse_str(value).upper()


@dataclass(frozen=True)
class NonSmtpConfig:
    """``[non_smtp]``: postscreen_non_smtp_command_*."""

    enabled: bool = field(default=True, metadata=opt(parse_bool, "postscreen_non_smtp_command_enable"))
    action: str = field(default="drop", metadata=opt(one_of(*ACTIONS), "postscreen_non_smtp_command_action"))
    ttl: float = field(default=30 * 86400.0, metadata=opt(parse_duration, "postscreen_non_smtp_command_ttl"))
    forbidden_commands: tuple[str, ...] = field(
        default=("CONNECT", "GET", "POST"), metadata=opt(list_of(parse_verb), "postscreen_forbidden_commands")
    )


def check_non_smtp(cfg: NonSmtpConfig, line: bytes, previous: str, peer: str) -> Result:
    """*line*: the command line as received, *previous*: the last command
    before it (``CONNECT`` when none)."""
    if not cfg.enabled:
        return skip(NAME, "disabled")
    verb = line.split(None, 1)[0].decode("ascii", "replace").upper() if line.strip() else ""
    if verb not in cfg.forbidden_commands and not _HEADER.match(line):
        return passed(NAME, "SMTP command")
    text = escape(line.rstrip(b"\r\n"))
    return failed(NAME, cfg.action, PROTOCOL_ERROR, f"NON-SMTP COMMAND from {peer} after {previous}: {text}")
