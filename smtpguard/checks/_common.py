"""Small helpers shared by the screening checks (no I/O)."""

from __future__ import annotations

from ..verdict import Outcome, Reply, Result, verdict_for

# postscreen's reply for its protocol tests in enforce mode (delivered at RCPT).
PROTOCOL_ERROR = Reply(550, "5.5.1", "Protocol error")


def escape(data: bytes, limit: int = 100) -> str:
    """Bytes as postscreen logs them: printable ASCII as is, ``\\r``,
    ``\\n``, ``\\t``, ``\\\\`` and octal ``\\ooo`` for the rest; at most
    *limit* bytes."""
    out = []
    for b in data[:limit]:
        if b == 0x5C:
            out.append("\\\\")
        elif b == 0x0D:
            out.append("\\r")
        elif b == 0x0A:
            out.append("\\n")
        elif b == 0x09:
            out.append("\\t")
        elif 0x20 <= b < 0x7F:
            out.append(chr(b))
        else:
            out.append(f"\\{b:03o}")
    return "".join(out)


def skip(check: str, why: str) -> Result:
    return Result(check, Outcome.SKIP, why)


def passed(check: str, why: str) -> Result:
    return Result(check, Outcome.PASS, why)


def failed(check: str, action: str, reply: Reply, reason: str) -> Result:
    """A failure whose *reason* is the log line and whose verdict the
    configured *action* gives for *reply*."""
    return Result(check, Outcome.FAIL, reason, verdict_for(action, reply))
