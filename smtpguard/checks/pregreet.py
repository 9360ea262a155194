"""Pregreet: did the client talk before our greeting was complete?

How it works: the listener sends the first line of a multi-line banner
(``220-mx.example.com ESMTP``), waits ``greet_wait`` and then hands this
check what the client sent during the wait and when it started sending.
A well-behaved client waits for the final ``220`` line; many bots do not.
The check logs postscreen's line ``PREGREET 11 after 0.20 from
[192.0.2.7]:40123: EHLO bot\\r\\n``.  Default action ``enforce``: keep
talking and reject every RCPT with ``550 5.5.1 Protocol error``.
Clients whose pregreet pass is still in the allowlist cache (``ttl``)
skip the wait.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..options import one_of, opt, parse_bool, parse_duration
from ..verdict import ACTIONS, Result, ScreenTest
from ._common import PROTOCOL_ERROR, escape, failed, passed, skip

NAME = ScreenTest.PREGREET


@dataclass(frozen=True)
class PregreetConfig:
    """``[pregreet]``: postscreen_greet_*."""

    enabled: bool = field(default=True, metadata=opt(parse_bool, "postscreen_greet_action (any but ignore)"))
    action: str = field(default="enforce", metadata=opt(one_of(*ACTIONS), "postscreen_greet_action"))
    greet_wait: float = field(default=6.0, metadata=opt(parse_duration, "postscreen_greet_wait"))
    ttl: float = field(default=86400.0, metadata=opt(parse_duration, "postscreen_greet_ttl"))


def check_pregreet(cfg: PregreetConfig, received: bytes, after: float, peer: str) -> Result:
    """*received*: the bytes the client sent during the wait (empty when it
    waited), *after*: seconds from the ``220-`` line to its first byte,
    *peer*: ``[a]:p``."""
    if not cfg.enabled:
        return skip(NAME, "disabled")
    if not received:
        return passed(NAME, "no pregreet")
    line = f"PREGREET {len(received)} after {after:.2f} from {peer}: {escape(received)}"
    return failed(NAME, cfg.action, PROTOCOL_ERROR, line)
