"""Replies, verdicts and check results: the vocabulary every check speaks.

A check looks at facts and returns a :class:`Result`: its *outcome* (did the
client pass, fail, or was the check skipped) with a reason for the log, and
the :class:`Verdict` the configured action turns that into.  Results are
logged and counted whatever the action; verdicts decide what the client
hears.  Keeping the two apart is what makes ``action = "ignore"`` (dry run,
Postfix's ``warn_if_reject``) possible without a second code path.

:class:`Reply` is one SMTP reply (code, enhanced status code, text); the
fixed replies smtpguard itself sends are gathered in :data:`REPLIES` so their
codes and texts are written once and match Postfix's.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .text import printable


@dataclass(frozen=True)
class Reply:
    """One SMTP reply; ``str()`` gives the wire form without CRLF."""

    code: int
    status: str  # enhanced status code, "" when none
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.status} {self.text}" if self.status else f"{self.code} {self.text}"

    def wire(self) -> bytes:
        """The reply line as sent, CRLF included; client text echoed in it
        (a HELO name, an option) is made :func:`printable` first."""
        return wire_line(str(self))

    @property
    def is_temporary(self) -> bool:
        return 400 <= self.code < 500


def wire_line(line: str) -> bytes:
    """One reply line of ours, printable ASCII, with its CRLF."""
    return printable(line).encode("ascii") + b"\r\n"


class Action(enum.Enum):
    """What a verdict does with the session."""

    CONTINUE = "continue"  # go on with the next check
    PASS = "pass"  # allowlisted: skip the remaining checks
    DEFER = "defer"  # 4xx reply at the point of decision
    REJECT = "reject"  # 5xx reply at the point of decision
    DROP = "drop"  # 521 (or the reply given) and hang up


class ScreenTest(enum.StrEnum):
    """postscreen's tests whose pass the allowlist cache keeps (its
    ``PSC_TINDX``), in its order.  The one source of their names: the
    session's tests to do and failed, the cache's keys (so stored data stays
    as it was: a member *is* its string), the check names in log lines and
    the metrics' ``check`` label; each also names its configuration section."""

    PREGREET = "pregreet"
    DNSBL = "dnsbl"
    PIPELINING = "pipelining"
    NON_SMTP = "non_smtp"
    BARE_NEWLINE = "bare_newline"


class Outcome(enum.Enum):
    """What a check found, independent of what is done about it."""

    PASS = "pass"
    FAIL = "fail"
    SKIP = "skip"


@dataclass(frozen=True)
class Verdict:
    action: Action
    reply: Reply | None = None

    @property
    def final(self) -> bool:
        return self.action is not Action.CONTINUE


CONTINUE = Verdict(Action.CONTINUE)


@dataclass(frozen=True)
class Warn:
    """An access table's ``WARN text`` for *name* (the client, HELO name or
    address looked up): smtpd logs it as ``NOQUEUE: warn:`` and goes on."""

    name: str
    text: str


@dataclass(frozen=True)
class Result:
    """A check's finding: which check, outcome, reason (for the log), verdict,
    and the access-table warnings met on the way (kept as they are, not in
    *reason*'s text, for the ``NOQUEUE: warn:`` lines)."""

    check: str
    outcome: Outcome
    reason: str = ""
    verdict: Verdict = CONTINUE
    warnings: tuple[Warn, ...] = ()


REPLIES: dict[str, Reply] = {
    "ok": Reply(250, "2.0.0", "Ok"),
    "sender_ok": Reply(250, "2.1.0", "Ok"),
    "bye": Reply(221, "2.0.0", "Bye"),
    "vrfy_disabled": Reply(502, "5.5.1", "VRFY command is disabled"),
    "vrfy": Reply(252, "2.0.0", "Cannot VRFY user, but will accept message and attempt delivery"),
    "unknown_command": Reply(502, "5.5.2", "Error: command not recognized"),
    "not_implemented": Reply(502, "5.5.1", "Error: command not implemented"),
    "bad_syntax": Reply(500, "5.5.2", "Error: bad syntax"),
    "line_too_long": Reply(500, "5.5.2", "Error: command line too long"),
    "need_helo": Reply(503, "5.5.1", "Error: send HELO/EHLO first"),
    "need_mail": Reply(503, "5.5.1", "Error: need MAIL command"),
    "need_rcpt": Reply(503, "5.5.1", "Error: need RCPT command"),
    "nested_mail": Reply(503, "5.5.1", "Error: nested MAIL command"),
    "no_valid_rcpt": Reply(554, "5.5.1", "Error: no valid recipients"),
    "helo_syntax": Reply(501, "5.5.4", "Syntax: HELO hostname"),
    "ehlo_syntax": Reply(501, "5.5.4", "Syntax: EHLO hostname"),
    "mail_syntax": Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>"),
    "rcpt_syntax": Reply(501, "5.5.4", "Syntax: RCPT TO:<address>"),
    "bad_sender": Reply(501, "5.1.7", "Bad sender address syntax"),
    "bad_recipient": Reply(501, "5.1.3", "Bad recipient address syntax"),
    "data_syntax": Reply(501, "5.5.4", "Syntax: DATA"),
    "too_big": Reply(552, "5.3.4", "Message size exceeds fixed limit"),
    "file_too_big": Reply(552, "5.3.4", "Error: message file too big"),
    "data_line_too_long": Reply(552, "5.3.4", "Error: message line too long"),
    "bare_newline": Reply(550, "5.5.2", "Error: bare <CR> or <LF> received"),
    "nul_in_data": Reply(550, "5.5.2", "Error: NUL character in message data"),
    "upstream_unavailable": Reply(451, "4.4.1", "Error: mail service temporarily unavailable, try again later"),
    "upstream_lost": Reply(451, "4.4.2", "Error: lost connection to mail service, try again later"),
    # Postfix refused a recipient it had accepted when the transaction was
    # replayed without a greylisted one (smtpguard.machine): nothing was sent.
    "upstream_changed": Reply(451, "4.3.0", "Error: mail service changed its answer, try again later"),
    # A pipelined recipient whose group never reached Postfix: the session
    # ended first (a drop verdict, a timeout).  Temporary: the client tries it again.
    "not_forwarded": Reply(451, "4.3.0", "Error: recipient not processed, try again later"),
    "internal_error": Reply(421, "4.3.0", "Error: internal error, closing connection"),
    "timeout": Reply(421, "4.4.2", "Error: timeout exceeded"),
    "shutdown": Reply(421, "4.3.2", "Service shutting down, closing connection"),
    "busy": Reply(421, "4.3.2", "All server ports are busy"),
    "not_accepted": Reply(521, "5.7.0", "Error: I can break rules, too. Goodbye."),
}


ACTIONS = ("ignore", "enforce", "drop", "tempfail")


def verdict_for(action: str, reply: Reply, *, as_given: bool = False) -> Verdict:
    """Turn a failed check's configured *action* into a verdict: the one
    place the actions are mapped.

    ``ignore`` logs and counts only (postscreen's ignore, Postfix's
    ``warn_if_reject``); ``enforce`` rejects with the check's 5xx *reply*
    (the session decides when: postscreen delivers it at RCPT), and defers
    with a 4xx one (Postfix's 450 defaults are no rejections); ``drop``
    sends 521 (*reply*'s text) and hangs up; ``tempfail`` sends the 4xx
    form of *reply*.

    *as_given*: *reply*'s own code decides, whatever the action but
    ``ignore``: 421 and 521 hang up, any other 4xx defers (an access table's
    result, as smtpd does; anvil's and the error limits' 421; a DNS
    failure's 450, a failed store's 451).
    """
    if action == "ignore":
        return CONTINUE
    if as_given and reply.code in (421, 521):
        return Verdict(Action.DROP, reply)
    if reply.is_temporary and (as_given or action == "enforce"):
        return Verdict(Action.DEFER, reply)
    if action == "enforce":
        return Verdict(Action.REJECT, reply)
    if action == "drop":
        return Verdict(Action.DROP, Reply(521, "5.7.1", reply.text) if reply.code != 521 else reply)
    if action == "tempfail":
        status = "4" + reply.status[1:] if reply.status else ""
        return Verdict(Action.DEFER, Reply(450 if reply.code != 421 else 421, status, reply.text))
    raise ValueError(f"unknown action {action!r}")
