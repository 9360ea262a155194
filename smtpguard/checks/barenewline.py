"""Bare newline: a command line ended with LF instead of CRLF.

How it works: RFC 5321 ends every command line with CRLF; a line that ends
in a bare LF comes from a sloppy or hand-written client.  Postscreen's log
line: ``BARE NEWLINE from [a]:p after MAIL``.  Default action ``ignore``
(log and count only), like postscreen_bare_newline_action; ``enforce``
rejects every RCPT with ``550 5.5.1 Protocol error``.  (Bare LF inside
message *data* is the DATA scanner's business: ``server.bare_newline``.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..options import one_of, opt, parse_bool, parse_duration
from ..verdict import ACTIONS, Result, ScreenTest
from ._common import PROTOCOL_ERROR, failed, passed, skip

NAME = ScreenTest.BARE_NEWLINE


@dataclass(frozen=True)
class BareNewlineConfig:
    """``[bare_newline]``: postscreen_bare_newline_*."""

    enabled: bool = field(default=True, metadata=opt(parse_bool, "postscreen_bare_newline_enable"))
    action: str = field(default="ignore", metadata=opt(one_of(*ACTIONS), "postscreen_bare_newline_action"))
    ttl: float = field(default=30 * 86400.0, metadata=opt(parse_duration, "postscreen_bare_newline_ttl"))


def check_bare_newline(cfg: BareNewlineConfig, line: bytes, command: str, peer: str) -> Result:
    """*line*: the command line as received, with its line ending."""
    if not cfg.enabled:
        return skip(NAME, "disabled")
    if not line.endswith(b"\n") or line.endswith(b"\r\n"):
        return passed(NAME, "CRLF")
    return failed(NAME, cfg.action, PROTOCOL_ERROR, f"BARE NEWLINE from {peer} after {command or 'CONNECT'}")
