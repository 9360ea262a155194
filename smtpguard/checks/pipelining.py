"""Unauthorized command pipelining (RFC 2920), decided from buffered bytes.

How it works: after reading each command line the listener looks at the
bytes already received past it (no timing is involved).  More input is
allowed only when the client saw ``250-PIPELINING`` in our EHLO reply and
the command may stand inside a pipelined group (RSET, MAIL, RCPT, SEND,
SOML, SAML).  A client that sent HELO (not EHLO), sends ahead before our
EHLO reply, or sends past a command that must end a group (EHLO, HELO,
DATA, VRFY, EXPN, NOOP, QUIT, ...) fails.  Postscreen's log line:
``COMMAND PIPELINING from [a]:p after EHLO: MAIL FROM:<x>\\r\\n``.  Default
action ``enforce`` (reject every RCPT and DATA with ``550 5.5.1 Protocol
error``), as postscreen_pipelining_action and Postfix's
reject_unauth_pipelining.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..options import one_of, opt, parse_bool, parse_duration
from ..verdict import ACTIONS, Result, ScreenTest
from ._common import PROTOCOL_ERROR, escape, failed, passed, skip

NAME = ScreenTest.PIPELINING

# RFC 2920 section 3.1: these may appear anywhere in a pipelined group;
# every other command must be the last one of its group.
MID_GROUP = frozenset({"RSET", "MAIL", "RCPT", "SEND", "SOML", "SAML"})


@dataclass(frozen=True)
class PipeliningConfig:
    """``[pipelining]``: postscreen_pipelining_*, reject_unauth_pipelining."""

    enabled: bool = field(default=True, metadata=opt(parse_bool, "postscreen_pipelining_enable"))
    action: str = field(default="enforce", metadata=opt(one_of(*ACTIONS), "postscreen_pipelining_action"))
    ttl: float = field(default=30 * 86400.0, metadata=opt(parse_duration, "postscreen_pipelining_ttl"))


def check_pipelining(cfg: PipeliningConfig, command: str, advertised: bool, pending: bytes, peer: str) -> Result:
    """*command*: the verb just read (upper case), *advertised*: the client
    got our EHLO reply (with PIPELINING) before it, *pending*: bytes already
    received after the command line."""
    if not cfg.enabled:
        return skip(NAME, "disabled")
    if not pending:
        return passed(NAME, "no input ahead")
    if advertised and command in MID_GROUP:
        return passed(NAME, f"pipelined after {command}")
    line = f"COMMAND PIPELINING from {peer} after {command or 'CONNECT'}: {escape(pending)}"
    return failed(NAME, cfg.action, PROTOCOL_ERROR, line)
