"""The sans-IO session machine, without sockets or clock: each test is a
table of (event, expected actions) rows.

An event is a command line (``bytes``) or the answer to the request the
machine returned last (a verdict, upstream replies, an UpstreamError, a TLS
description, a body chunk).  Actions are compared by their class name and,
for :class:`Send`, the reply's first line, which keeps the tables readable.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import pytest

from smtpguard import machine as machine_module
from smtpguard.checks.errors import ErrorsConfig
from smtpguard.checks.greylist import GreylistConfig
from smtpguard.config import Config
from smtpguard.machine import (
    REQUESTS,
    AbortUpstream,
    Arm,
    Close,
    Effect,
    Greeted,
    GreetWait,
    HandOff,
    OpenUpstream,
    QuitUpstream,
    ReadBody,
    Request,
    Screen,
    Send,
    SessionMachine,
    Stage,
    StartTls,
    Unread,
    Upstream,
)
from smtpguard.net import parse_ip
from smtpguard.relay import UpstreamError, UpstreamReply
from smtpguard.session import Session
from smtpguard.verdict import CONTINUE, Action, Reply, Verdict

OK = CONTINUE
REJECT = Verdict(Action.REJECT, Reply(554, "5.7.1", "Service unavailable; Client host [192.0.2.7] blocked"))
DROP = Verdict(Action.DROP, Reply(521, "5.5.1", "Protocol error"))
REJECT_DROP = Verdict(Action.DROP, REJECT.reply)


def up(*lines: str) -> list[UpstreamReply]:
    return [UpstreamReply(int(line[:3]), line.encode() + b"\r\n") for line in lines]


def show(action: Effect | Request) -> str:
    """``Send 250 2.1.0 Ok`` / ``Screen mail`` / ``Upstream MAIL FROM:<a@b>|RCPT TO:<c@d> 2``."""
    match action:
        case Send(data=data):
            return "Send " + data.decode("ascii").split("\r\n", 1)[0]
        case Screen(stage=stage):
            return f"Screen {stage.value}"
        case Upstream(data=data, replies=replies):
            return f"Upstream {'|'.join(data.decode().splitlines())} {replies}"
        case Arm(seconds=seconds):
            return f"Arm {seconds:g}"
        case Unread(data=data):
            return f"Unread {data.decode().strip()}"
    return type(action).__name__


Row = tuple[Any, Sequence[str]]


@dataclasses.dataclass(frozen=True)
class Ahead:
    """A command line and the client's input already received after it (pipelining)."""

    line: bytes
    pending: bytes


def run(rows: Sequence[Row], cfg: Config | None = None, tls: bool = False,
        session: Session | None = None) -> SessionMachine:
    machine = SessionMachine(cfg or Config(), session or Session(parse_ip("192.0.2.7"), 40123, "192.0.2.1", 25), tls,
                             clock=lambda: 100.0)
    for event, expected in rows:
        if isinstance(event, Ahead):
            actions = machine.command(event.line, event.pending)
        else:
            fresh = isinstance(event, bytes) and not machine.busy  # a command line, not a body chunk
            actions = machine.command(event) if fresh else machine.answer(event)
        assert [show(a) for a in actions] == list(expected), f"after {event!r}"
    return machine


HELLO: list[Row] = [
    (b"EHLO client.example\r\n", ["Screen command"]),
    (OK, ["Screen helo"]),
    (OK, ["Send 250-localhost"]),
]
ENVELOPE: list[Row] = [
    *HELLO,
    (b"MAIL FROM:<a@sender.test>\r\n", ["Screen command"]),
    (OK, ["Screen mail"]),
    (OK, ["Send 250 2.1.0 Ok"]),
    (b"RCPT TO:<b@example.test>\r\n", ["Screen command"]),
    (OK, ["Screen rcpt"]),
    (OK, ["Screen relayed"]),
    (None, ["OpenUpstream"]),
    (0.01, ["Upstream MAIL FROM:<a@sender.test>|RCPT TO:<b@example.test> 2"]),
    (up("250 2.1.0 Ok", "250 2.1.5 Ok"), ["Send 250 2.1.5 Ok"]),
]


def test_a_relayed_message() -> None:
    machine = run([
        *ENVELOPE,
        (b"RCPT TO:<c@example.test>\r\n", ["Screen command"]),
        (OK, ["Screen rcpt"]),
        (OK, ["Screen relayed"]),
        (None, ["Upstream RCPT TO:<c@example.test> 1"]),  # the connection and MAIL are there
        (up("550 5.1.1 <c@example.test>: Recipient address rejected"), ["Send 550 5.1.1 <c@example.test>: "
                                                                        "Recipient address rejected"]),
        (b"DATA\r\n", ["Screen command"]),
        (OK, ["Screen data"]),
        (OK, ["Upstream DATA 1"]),
        (up("354 End data with <CR><LF>.<CR><LF>"), ["Send 354 End data with <CR><LF>.<CR><LF>", "ReadBody"]),
        (b"Subject: x\r\n\r\nhello\r\n", ["Upstream Subject: x||hello 0"]),
        ([], ["ReadBody"]),
        (b".\r\nQUIT\r\n", ["Upstream . 1"]),
        (up("250 2.0.0 Ok: queued as 4ABC"), ["Unread QUIT", "Send 250 2.0.0 Ok: queued as 4ABC"]),
        (b"QUIT\r\n", ["Screen command"]),
        (OK, ["Send 221 2.0.0 Bye", "Close"]),
    ])
    assert machine.counts == {"EHLO": [1, 1], "MAIL": [1, 1], "RCPT": [1, 2], "DATA": [1, 1], "QUIT": [1, 1]}
    assert machine.session.errors == 1


@pytest.mark.parametrize(("line", "reply"), [
    (b"HELO\r\n", "501 5.5.4 Syntax: HELO hostname"),
    (b"EHLO\r\n", "501 5.5.4 Syntax: EHLO hostname"),
    (b"EHLO two words\r\n", "501 5.5.2 <two words>: Helo command rejected: Invalid name"),
    (b"MAIL FROM:<a@b> SIZE=\xc2\xb2\r\n", "501 5.5.4 Bad message size syntax"),
    (b"RCPT TO:<b@example.test>\r\n", "503 5.5.1 Error: need MAIL command"),
    (b"DATA\r\n", "503 5.5.1 Error: need MAIL command"),
    (b"DATA x\r\n", "501 5.5.4 Syntax: DATA"),
    (b"STARTTLS\r\n", "502 5.5.1 Error: command not implemented"),
    (b"XCLIENT ADDR=127.0.0.1\r\n", "502 5.5.2 Error: command not recognized"),
    (b"\r\n", "500 5.5.2 Error: bad syntax"),
    (b"VRFY a\r\n", "502 5.5.1 VRFY command is disabled"),
    (b"NOOP\r\n", "250 2.0.0 Ok"),
    (b"RSET\r\n", "250 2.0.0 Ok"),
])
def test_answered_here_without_a_check(line: bytes, reply: str) -> None:
    """Commands whose reply needs neither a check nor Postfix."""
    machine = run([(line, ["Screen command"]), (OK, [f"Send {reply}"])])
    assert machine.session.errors == (1 if reply[0] in "45" else 0)


@pytest.mark.parametrize(("stage", "before", "line"), [
    ("helo", [], b"HELO client.example\r\n"),
    ("mail", HELLO, b"MAIL FROM:<a@sender.test>\r\n"),
    ("rcpt", ENVELOPE[:-6], b"RCPT TO:<b@example.test>\r\n"),
])
def test_a_reject_is_answered_and_the_session_goes_on(stage: str, before: list[Row], line: bytes) -> None:
    machine = run([*before, (line, ["Screen command"]), (OK, [f"Screen {stage}"]),
                   (REJECT, [f"Send {REJECT.reply}"])])
    assert not machine.busy and machine.session.errors == 1
    if stage == "mail":
        assert machine.session.sender is None  # the transaction did not start


def test_a_drop_verdict_ends_the_session() -> None:
    run([(b"EHLO client.example\r\n", ["Screen command"]), (OK, ["Screen helo"]),
         (DROP, [f"Send {DROP.reply}", "Close"])])


def test_a_command_check_drops_before_the_command_is_read() -> None:
    """The pipelining and error-limit checks answer at Stage.COMMAND."""
    run([(b"MAIL FROM:<a@b>\r\n", ["Screen command"]), (DROP, [f"Send {DROP.reply}", "Close"])])


def test_the_command_screen_sees_the_pipelined_input() -> None:
    machine = SessionMachine(Config(), Session(parse_ip("192.0.2.7"), 1, "192.0.2.1", 25), False)
    [screen] = machine.command(b"EHLO x\r\n", b"MAIL FROM:<a@b>\r\n")
    assert screen == Screen(Stage.COMMAND, line=b"EHLO x\r\n", command="EHLO", pending=b"MAIL FROM:<a@b>\r\n")
    [screen] = machine.answer(OK)
    machine.answer(OK)
    [screen] = machine.command(b"NOOP\r\n")
    assert screen.previous == "EHLO"


def test_error_sleep_is_armed_past_the_soft_limit() -> None:
    cfg = dataclasses.replace(Config(), errors=ErrorsConfig(soft_limit=2, hard_limit=5, error_sleep=1.5))
    bad = (b"FOO\r\n", ["Screen command"])
    run([bad, (OK, ["Send 502 5.5.2 Error: command not recognized"]),
         bad, (OK, ["Send 502 5.5.2 Error: command not recognized"]),
         bad, (OK, ["Arm 1.5", "Send 502 5.5.2 Error: command not recognized"]),  # the third error waits
         (b"NOOP\r\n", ["Screen command"]), (OK, ["Send 250 2.0.0 Ok"])], cfg)


def test_an_overlong_line_is_answered_at_once() -> None:
    machine = SessionMachine(Config(), Session(parse_ip("192.0.2.7"), 1, "192.0.2.1", 25), False)
    assert [show(a) for a in machine.line_too_long()] == ["Send 500 5.5.2 Error: command line too long"]


def test_mail_and_rcpt_go_separately_when_the_client_sent_no_helo() -> None:
    """Postfix then got no EHLO from us, so it did not offer PIPELINING."""
    run([
        (b"MAIL FROM:<a@sender.test>\r\n", ["Screen command"]), (OK, ["Screen mail"]), (OK, ["Send 250 2.1.0 Ok"]),
        (b"RCPT TO:<b@example.test>\r\n", ["Screen command"]), (OK, ["Screen rcpt"]), (OK, ["Screen relayed"]),
        (None, ["OpenUpstream"]),
        (0.01, ["Upstream MAIL FROM:<a@sender.test> 1"]),
        (up("250 2.1.0 Ok"), ["Upstream RCPT TO:<b@example.test> 1"]),
        (up("250 2.1.5 Ok"), ["Send 250 2.1.5 Ok"]),
    ])


def test_postfix_refusing_mail_is_relayed() -> None:
    run([*ENVELOPE[:-1],
         (up("553 5.7.1 <a@sender.test>: Sender address rejected", "503 5.5.1 Error: need MAIL command"),
          ["Send 553 5.7.1 <a@sender.test>: Sender address rejected"])])


@pytest.mark.parametrize("failing", ["OpenUpstream", "Upstream"])
def test_postfix_unreachable_at_rcpt_is_451(failing: str) -> None:
    rows = ENVELOPE[:-2] if failing == "OpenUpstream" else ENVELOPE[:-1]
    machine = run([*rows, (UpstreamError("connect to 127.0.0.1:10025: refused"),
                           ["AbortUpstream", "Send 451 4.4.1 Error: mail service temporarily unavailable, "
                                             "try again later"])])
    assert not machine.upstream_connected and machine.session.rcpts == []


def test_postfix_lost_during_data_is_451_and_the_body_is_still_read() -> None:
    run([
        *ENVELOPE,
        (b"DATA\r\n", ["Screen command"]), (OK, ["Screen data"]), (OK, ["Upstream DATA 1"]),
        (up("354 go ahead"), ["Send 354 go ahead", "ReadBody"]),
        (b"line\r\n", ["Upstream line 0"]),
        (UpstreamError("write to 127.0.0.1:10025: broken pipe"), ["ReadBody"]),
        (b"more\r\n.\r\n", ["AbortUpstream",
                            "Send 451 4.4.2 Error: lost connection to mail service, try again later"]),
    ])


def test_client_gone_in_data_aborts_the_upstream_message() -> None:
    run([
        *ENVELOPE,
        (b"DATA\r\n", ["Screen command"]), (OK, ["Screen data"]), (OK, ["Upstream DATA 1"]),
        (up("354 go ahead"), ["Send 354 go ahead", "ReadBody"]),
        (b"", ["AbortUpstream", "Close"]),
    ])


def test_a_bare_newline_in_data_is_refused_and_postfix_never_gets_the_message() -> None:
    cfg = Config()
    cfg = dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, bare_newline="reject"))
    run([
        *ENVELOPE,
        (b"DATA\r\n", ["Screen command"]), (OK, ["Screen data"]), (OK, ["Upstream DATA 1"]),
        (up("354 go ahead"), ["Send 354 go ahead", "ReadBody"]),
        (b"bare\nline\r\n.\r\n", ["AbortUpstream", "Send 550 5.5.2 Error: bare <CR> or <LF> received"]),
    ], cfg)


def test_rset_and_a_new_ehlo_reset_the_transaction_upstream() -> None:
    machine = run([
        *ENVELOPE,
        (b"RSET\r\n", ["Screen command"]), (OK, ["Upstream RSET 1"]), (up("250 2.0.0 Ok"), ["Send 250 2.0.0 Ok"]),
        (b"MAIL FROM:<x@sender.test>\r\n", ["Screen command"]), (OK, ["Screen mail"]), (OK, ["Send 250 2.1.0 Ok"]),
        (b"RCPT TO:<b@example.test>\r\n", ["Screen command"]), (OK, ["Screen rcpt"]), (OK, ["Screen relayed"]),
        (None, ["Upstream MAIL FROM:<x@sender.test>|RCPT TO:<b@example.test> 2"]),
        (up("250 2.1.0 Ok", "250 2.1.5 Ok"), ["Send 250 2.1.5 Ok"]),
        (b"EHLO again.example\r\n", ["Screen command"]), (OK, ["Upstream RSET 1"]),
        (up("250 2.0.0 Ok"), ["Screen helo"]),
    ])
    assert machine.session.sender is None and machine.session.helo == "again.example"


def test_starttls() -> None:
    machine = run([
        *HELLO,
        (b"STARTTLS\r\n", ["Screen command"]),
        (OK, ["Send 220 2.0.0 Ready to start TLS", "StartTls"]),
        ("TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)", ["QuitUpstream"]),
        (b"MAIL FROM:<a@b>\r\n", ["Screen command"]),  # the session goes on, on TLS
    ], tls=True)
    assert machine.session.helo is None and machine.session.tls is not None and not machine.tls_available


def test_failed_tls_handshake_ends_the_session() -> None:
    run([(b"STARTTLS\r\n", ["Screen command"]), (OK, ["Send 220 2.0.0 Ready to start TLS", "StartTls"]),
         (None, ["Close"])], tls=True)


def test_requests_and_answers_must_alternate() -> None:
    machine = SessionMachine(Config(), Session(parse_ip("192.0.2.7"), 1, "192.0.2.1", 25), False)
    with pytest.raises(RuntimeError):
        machine.answer(OK)
    machine.command(b"NOOP\r\n")
    with pytest.raises(RuntimeError):
        machine.command(b"NOOP\r\n")


def test_every_action_type_is_covered() -> None:
    """The tables above exercise each action the adapter must perform;
    REQUESTS, the adapter's test for "needs an answer", lists them all."""
    requests = {Screen, HandOff, GreetWait, OpenUpstream, Upstream, StartTls, ReadBody}
    assert requests == set(Request.__args__) == set(REQUESTS)  # type: ignore[attr-defined]
    assert {Send, Arm, AbortUpstream, QuitUpstream, Unread, Close} == set(Effect.__args__)  # type: ignore[attr-defined]


# ---------------------------------------------------------------- before the first command

PREGREET_DUE = "pregreet"


def greeting_machine(todo: frozenset[str] = frozenset(), greet_wait: float = 6.0) -> SessionMachine:
    cfg = Config()
    cfg = dataclasses.replace(cfg, pregreet=dataclasses.replace(cfg.pregreet, greet_wait=greet_wait))
    s = Session(parse_ip("192.0.2.7"), 40123, "192.0.2.1", 25, started=90.0)
    s.todo = todo
    return SessionMachine(cfg, s, False, clock=lambda: 100.0)


def test_greeting_without_a_wait() -> None:
    m = greeting_machine()
    assert [show(a) for a in m.connect()] == ["Screen connect"]
    assert [show(a) for a in m.answer(OK)] == ["Screen banner"]
    assert [show(a) for a in m.answer(OK)] == ["Send 220 localhost ESMTP"]
    assert m.greeted and not m.busy


def test_pregreet_wait_then_banner() -> None:
    m = greeting_machine(frozenset({PREGREET_DUE}))
    assert [show(a) for a in m.connect()] == ["Screen connect"]
    [first, wait] = m.answer(OK)
    assert show(first) == "Send 220-localhost ESMTP" and wait == GreetWait(6.0, False)
    [screen] = m.answer(Greeted(b"", 0.0, eof=False))
    assert screen == Screen(Stage.GREET, line=b"", after=0.0)
    assert [show(a) for a in m.answer(OK)] == ["Screen banner"]
    assert [show(a) for a in m.answer(OK)] == ["Send 220 localhost ESMTP"]


def test_a_pregreet_drop_refuses() -> None:
    m = greeting_machine(frozenset({PREGREET_DUE}))
    m.connect()
    m.answer(OK)
    m.answer(Greeted(b"EHLO bot\r\n", 0.2, eof=False))
    assert [show(a) for a in m.answer(DROP)] == [f"Send {DROP.reply}", "Close"]
    assert m.closed and not m.greeted


def test_a_client_gone_in_the_greet_wait_is_a_hangup(caplog: pytest.LogCaptureFixture) -> None:
    m = greeting_machine(frozenset({PREGREET_DUE}))
    m.connect()
    m.answer(OK)
    caplog.set_level("INFO", "smtpguard")
    assert [show(a) for a in m.answer(Greeted(b"", 0.0, eof=True))] == ["Close"]
    assert "HANGUP after 10.00 from [192.0.2.7]:40123 in tests before SMTP handshake" in caplog.text


@pytest.mark.parametrize("stage", ["connect", "banner"])
def test_a_drop_before_the_banner_is_logged_as_a_connect_reject(stage: str, caplog: pytest.LogCaptureFixture) -> None:
    m = greeting_machine()
    caplog.set_level("INFO", "smtpguard")
    m.connect()
    if stage == "banner":
        m.answer(OK)
    assert [show(a) for a in m.answer(REJECT_DROP)] == [f"Send {REJECT_DROP.reply}", "Close"]
    assert ("NOQUEUE: reject: CONNECT from unknown[192.0.2.7]:40123: 554 5.7.1 Service unavailable; "
            "Client host [192.0.2.7] blocked; proto=SMTP") in caplog.text


@pytest.mark.parametrize(("went", "expected"), [(True, ["Close"]), (False, ["Screen banner"])])
def test_hand_off(went: bool, expected: list[str], caplog: pytest.LogCaptureFixture) -> None:
    m = greeting_machine()
    m.connect()
    assert m.answer(Verdict(Action.PASS)) == [HandOff()]
    assert [show(a) for a in m.answer(went)] == expected
    caplog.set_level("INFO", "smtpguard")
    m.finish()
    assert ("DISCONNECT" in caplog.text) is not went  # postscreen logs none for a passed connection


def test_timeouts_follow_the_stage() -> None:
    m = greeting_machine()
    server, errors = m.cfg.server, m.cfg.errors
    assert m.timeout == server.command_timeout  # the greet wait
    m.connect(), m.answer(OK), m.answer(OK)
    assert m.timeout == min(server.command_timeout, errors.command_time_limit)  # screening
    m.session.screened = True
    assert m.timeout == server.command_timeout


def test_a_session_under_stress_gets_the_stress_timeout_and_greet_wait() -> None:
    """smtpguard.stress: a session that started under stress (the pipeline
    set ``session.stress`` at connect) waits the [stress] greet_wait and
    command_timeout when they are shorter; in DATA too (Postfix's one
    smtpd_timeout = ${stress?10}), as a deadline per line (the listener)."""
    m = greeting_machine(frozenset({PREGREET_DUE}))
    m.connect()
    m.session.stress = True  # as Pipeline.on_connect decides
    [_, wait] = m.answer(OK)
    assert wait == GreetWait(m.cfg.stress.greet_wait, False) == GreetWait(2.0, False)
    m.answer(Greeted(b"", 0.0, eof=False)), m.answer(OK), m.answer(OK)
    assert m.greeted and m.timeout == 10.0  # not command_time_limit nor command_timeout (300 s)
    m.session.screened = True
    assert m.timeout == 10.0
    m.in_data = True
    assert m.timeout == 10.0 < m.cfg.server.data_timeout
    m.session.stress = False
    assert m.timeout == m.cfg.server.data_timeout


def test_the_reply_to_the_final_dot_waits_data_done_timeout() -> None:
    """RFC 1047: while Postfix's reply to the final dot is outstanding, the
    machine's timeout (the client's idle timer) is upstream.data_done_timeout
    and a little more, not server.data_timeout, so only the upstream's own
    timer ends that wait; once the reply came, the stage's timeout again."""
    cfg = Config()
    cfg = dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, data_timeout=5.0, command_timeout=30.0),
                              upstream=dataclasses.replace(cfg.upstream, data_done_timeout=600.0))
    timeouts: list[float] = []
    machine = SessionMachine(cfg, Session(parse_ip("192.0.2.7"), 40123, "192.0.2.1", 25), False, clock=lambda: 100.0)
    for event, expected, timeout in [
        *((event, expected, 30.0) for event, expected in ENVELOPE),
        (b"DATA\r\n", ["Screen command"], 30.0),
        (OK, ["Screen data"], 30.0),
        (OK, ["Upstream DATA 1"], 30.0),
        (up("354 End data with <CR><LF>.<CR><LF>"), ["Send 354 End data with <CR><LF>.<CR><LF>", "ReadBody"], 5.0),
        (b"Subject: x\r\n\r\nhello\r\n", ["Upstream Subject: x||hello 0"], 5.0),  # a body drain: data_timeout
        ([], ["ReadBody"], 5.0),
        (b".\r\n", ["Upstream . 1"], 601.0),  # the end of data at Postfix, its reply outstanding
        (up("250 2.0.0 Ok: queued as 4ABC"), ["Send 250 2.0.0 Ok: queued as 4ABC"], 30.0),
    ]:
        fresh = isinstance(event, bytes) and not machine.busy
        actions = machine.command(event) if fresh else machine.answer(event)
        assert [show(a) for a in actions] == list(expected), f"after {event!r}"
        timeouts.append(machine.timeout)
        assert machine.timeout == timeout, f"after {event!r}"
    assert max(timeouts) == cfg.upstream.data_done_timeout + 1.0


def test_postfix_failing_the_final_dot_ends_the_data_done_wait() -> None:
    m = run([*ENVELOPE, (b"DATA\r\n", ["Screen command"]), (OK, ["Screen data"]), (OK, ["Upstream DATA 1"]),
             (up("354 go ahead"), ["Send 354 go ahead", "ReadBody"]), (b"x\r\n.\r\n", ["Upstream x|. 1"])])
    assert m.timeout > m.cfg.upstream.data_done_timeout
    assert [show(a) for a in m.answer(UpstreamError("timeout waiting for a reply"))] == [
        "AbortUpstream", "Send 451 4.4.2 Error: lost connection to mail service, try again later"]
    assert m.timeout == m.cfg.server.command_timeout


def test_timed_out_in_data_aborts_the_upstream_message(caplog: pytest.LogCaptureFixture) -> None:
    m = run([*ENVELOPE, (b"DATA\r\n", ["Screen command"]), (OK, ["Screen data"]), (OK, ["Upstream DATA 1"]),
             (up("354 go ahead"), ["Send 354 go ahead", "ReadBody"])])
    assert m.timeout == m.cfg.server.data_timeout
    caplog.set_level("INFO", "smtpguard")
    assert [show(a) for a in m.timed_out()] == ["AbortUpstream", "Send 421 4.4.2 localhost Error: timeout exceeded",
                                                "Close"]
    assert "timeout after DATA from unknown[192.0.2.7]:40123" in caplog.text


def test_disconnect_counts_like_postfix(caplog: pytest.LogCaptureFixture) -> None:
    m = run([*ENVELOPE, (b"FOO\r\n", ["Screen command"]), (OK, ["Send 502 5.5.2 Error: command not recognized"])])
    caplog.set_level("INFO", "smtpguard")
    m.lost()
    m.finish()
    assert "lost connection after UNKNOWN from unknown[192.0.2.7]:40123" in caplog.text
    assert "DISCONNECT [192.0.2.7]:40123 ehlo=1 mail=1 rcpt=1 unknown=0/1 commands=3/4" in caplog.text


# ------------------------------------------------------------ greylisting after Postfix (issue 14)

GREY_CFG = dataclasses.replace(Config(), greylist=GreylistConfig(enabled=True))
GREYLISTED = Verdict(Action.DEFER, Reply(450, "4.2.0", "<b@example.test>: Recipient address rejected: Greylisted, "
                                                       "see http://postgrey.schweikert.ch/help/example.test.html"))
RELAY_DENIED = "554 5.7.1 <x@other.example>: Relay access denied"
MAIL_RCPT_B = "Upstream MAIL FROM:<a@sender.test>|RCPT TO:<b@example.test> 2"


def rcpt(address: str, then: str) -> list[Row]:
    """A RCPT that passes the screening before Postfix; *then* is what comes next."""
    return [(f"RCPT TO:<{address}>\r\n".encode(), ["Screen command"]), (OK, ["Screen rcpt"]), (OK, [then])]


def test_postfix_refusing_a_recipient_is_answered_at_once_and_never_greylisted() -> None:
    """A relay attempt (or an unknown user) gets Postfix's 5xx on the first
    try: greylisting is not asked, so no triplet is stored for it."""
    machine = run([
        *ENVELOPE[:-6],
        *rcpt("x@other.example", "Screen relayed"),
        (None, ["OpenUpstream"]),
        (0.01, ["Upstream MAIL FROM:<a@sender.test>|RCPT TO:<x@other.example> 2"]),
        (up("250 2.1.0 Ok", RELAY_DENIED), [f"Send {RELAY_DENIED}"]),
        *rcpt("y@other.example", "Screen relayed"),
        (None, ["Upstream RCPT TO:<y@other.example> 1"]),
        (up("450 4.7.1 <y@other.example>: Relay access denied"),
         ["Send 450 4.7.1 <y@other.example>: Relay access denied"]),
    ], GREY_CFG)
    assert machine.session.rcpts == []


def test_a_recipient_postfix_accepted_is_greylisted_and_postfix_is_reset_at_data() -> None:
    machine = run([
        *ENVELOPE[:-6],
        *rcpt("b@example.test", "Screen relayed"),
        (None, ["OpenUpstream"]),
        (0.01, [MAIL_RCPT_B]),
        (up("250 2.1.0 Ok", "250 2.1.5 Ok"), ["Screen greylist"]),  # Postfix's 250 is held back
        (GREYLISTED, [f"Send {GREYLISTED.reply}"]),
        # No recipient is left: Postfix's transaction is reset, it never gets DATA.
        (b"DATA\r\n", ["Screen command"]),
        (OK, ["Upstream RSET 1"]),
        (up("250 2.0.0 Ok"), ["Send 554 5.5.1 Error: no valid recipients"]),
        # The client's transaction goes on (as in smtpd): the next recipient sends MAIL again.
        *rcpt("b@example.test", "Screen relayed"),
        (None, [MAIL_RCPT_B]),
        (up("250 2.1.0 Ok", "250 2.1.5 Ok"), ["Screen greylist"]),
        (GREYLISTED, [f"Send {GREYLISTED.reply}"]),
        (b"QUIT\r\n", ["Screen command"]),
        (OK, ["Send 221 2.0.0 Bye", "Close"]),
    ], GREY_CFG)
    assert machine.session.rcpts == []
    assert machine.counts == {"EHLO": [1, 1], "MAIL": [1, 1], "RCPT": [0, 2], "DATA": [0, 1], "QUIT": [1, 1]}


# Postfix accepts b and c; greylisting defers b and passes c; then DATA.
MIXED: list[Row] = [
        *ENVELOPE[:-6],
        *rcpt("b@example.test", "Screen relayed"),
        (None, ["OpenUpstream"]),
        (0.01, [MAIL_RCPT_B]),
        (up("250 2.1.0 Ok", "250 2.1.5 Ok"), ["Screen greylist"]),
        (GREYLISTED, [f"Send {GREYLISTED.reply}"]),
        *rcpt("c@example.test", "Screen relayed"),
        (None, ["Upstream RCPT TO:<c@example.test> 1"]),
        (up("250 2.1.5 Ok"), ["Screen greylist"]),
        (OK, ["Send 250 2.1.5 Ok"]),
        (b"DATA\r\n", ["Screen command"]),
        (OK, ["Screen data"]),
        (OK, ["Upstream RSET|MAIL FROM:<a@sender.test>|RCPT TO:<c@example.test> 3"]),
]


def test_a_greylisted_recipient_beside_an_accepted_one_never_gets_the_message() -> None:
    """Postfix accepted both; greylisting deferred the first.  Before DATA
    the upstream transaction is replayed without it (one pipelined write),
    and the replies reach the client in order."""
    machine = run([
        *MIXED,
        (up("250 2.0.0 Ok", "250 2.1.0 Ok", "250 2.1.5 Ok"), ["Upstream DATA 1"]),
        (up("354 go ahead"), ["Send 354 go ahead", "ReadBody"]),
        (b"hello\r\n.\r\n", ["Upstream hello|. 1"]),
        (up("250 2.0.0 Ok: queued as 4ABC"), ["Send 250 2.0.0 Ok: queued as 4ABC"]),
        # The next transaction starts clean: no replay.
        (b"MAIL FROM:<a@sender.test>\r\n", ["Screen command"]), (OK, ["Screen mail"]), (OK, ["Send 250 2.1.0 Ok"]),
        *rcpt("c@example.test", "Screen relayed"),
        (None, ["Upstream MAIL FROM:<a@sender.test>|RCPT TO:<c@example.test> 2"]),
        (up("250 2.1.0 Ok", "250 2.1.5 Ok"), ["Screen greylist"]),
        (OK, ["Send 250 2.1.5 Ok"]),
        (b"DATA\r\n", ["Screen command"]),
        (OK, ["Screen data"]),
        (OK, ["Upstream DATA 1"]),
    ], GREY_CFG)
    assert machine.session.rcpts == ["c@example.test"]


def test_postfix_refusing_a_replayed_recipient_fails_the_message_temporarily() -> None:
    """What Postfix now refuses was already accepted for the client: nothing
    is sent, the transaction ends with a 4xx so the client retries it all."""
    machine = run([
        *MIXED,
        (up("250 2.0.0 Ok", "250 2.1.0 Ok", "452 4.5.3 Error: too many recipients"), ["Upstream RSET 1"]),
        (up("250 2.0.0 Ok"), ["Send 451 4.3.0 Error: mail service changed its answer, try again later"]),
    ], GREY_CFG)
    assert machine.session.sender is None and machine.session.rcpts == []


def test_greylisting_after_postfix_without_pipelining_upstream() -> None:
    """No HELO from the client: Postfix got none from us either, so the
    replay goes one command at a time."""
    run([
        (b"MAIL FROM:<a@sender.test>\r\n", ["Screen command"]), (OK, ["Screen mail"]), (OK, ["Send 250 2.1.0 Ok"]),
        *rcpt("b@example.test", "Screen relayed"),
        (None, ["OpenUpstream"]),
        (0.01, ["Upstream MAIL FROM:<a@sender.test> 1"]),
        (up("250 2.1.0 Ok"), ["Upstream RCPT TO:<b@example.test> 1"]),
        (up("250 2.1.5 Ok"), ["Screen greylist"]),
        (GREYLISTED, [f"Send {GREYLISTED.reply}"]),
        *rcpt("c@example.test", "Screen relayed"),
        (None, ["Upstream RCPT TO:<c@example.test> 1"]),
        (up("250 2.1.5 Ok"), ["Screen greylist"]),
        (OK, ["Send 250 2.1.5 Ok"]),
        (b"DATA\r\n", ["Screen command"]),
        (OK, ["Screen data"]),
        (OK, ["Upstream RSET 1"]),
        (up("250 2.0.0 Ok"), ["Upstream MAIL FROM:<a@sender.test> 1"]),
        (up("250 2.1.0 Ok"), ["Upstream RCPT TO:<c@example.test> 1"]),
        (up("250 2.1.5 Ok"), ["Upstream DATA 1"]),
    ], GREY_CFG)


@pytest.mark.parametrize(("option", "tls"), [(True, True), (True, False), (False, True)])
def test_tls_trace_header_only_for_a_tls_client_and_only_when_asked(option: bool, tls: bool) -> None:
    cfg = Config()
    cfg = dataclasses.replace(cfg, tls=dataclasses.replace(cfg.tls, received_header=option))
    s = Session(parse_ip("192.0.2.7"), 40123, "192.0.2.1", 25)
    s.tls = "TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)" if tls else None
    machine = SessionMachine(cfg, s, False, clock=lambda: 100.0, wallclock=lambda: 1_796_000_000.0)
    rows = [*ENVELOPE, (b"DATA\r\n", ["Screen command"]), (OK, ["Screen data"]), (OK, ["Upstream DATA 1"]),
            (up("354 go ahead"), ["Send 354 go ahead", "ReadBody"])]
    for event, expected in rows:
        fresh = isinstance(event, bytes) and not machine.busy
        actions = machine.command(event) if fresh else machine.answer(event)
        assert [show(a) for a in actions] == list(expected), f"after {event!r}"
    [write] = machine.answer(b"Subject: x\r\n\r\nhello\r\n.\r\n")
    assert isinstance(write, Upstream)
    if option and tls:
        head, _, rest = write.data.partition(b"Subject: x")
        assert head.startswith(b"Received: from client.example (unknown [192.0.2.7])\r\n"
                               b"\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits))\r\n"
                               b"\tby localhost (smtpguard) with ESMTPS;\r\n\t"), head
        assert head.endswith(b"\r\n") and rest.endswith(b"hello\r\n.\r\n")
    else:
        assert write.data == b"Subject: x\r\n\r\nhello\r\n.\r\n"


# ------------------------------------------------------------ pipelined recipients

def ahead(address: str, pending: str, then: str, verdict: Verdict = OK) -> list[Row]:
    """A RCPT the client sent with *pending* after it; it passes (or gets
    *verdict* from) the screening before Postfix; *then* is what comes next."""
    line = f"RCPT TO:<{address}>\r\n".encode()
    return [(Ahead(line, pending.encode()), ["Screen command"]), (OK, ["Screen rcpt"]), (verdict, [then])]


# MAIL answered here; b, c, d pipelined with DATA: b and c are owed, d forwards all three.
GROUP: list[Row] = [
    *HELLO,
    (b"MAIL FROM:<a@sender.test>\r\n", ["Screen command"]), (OK, ["Screen mail"]), (OK, ["Send 250 2.1.0 Ok"]),
    *ahead("b@example.test", "RCPT TO:<c@example.test>\r\nRCPT TO:<d@example.test>\r\nDATA\r\n",
           "Screen relayed"),
    (None, ["OpenUpstream"]),
    (0.01, []),  # owed: nothing goes out yet
    *ahead("c@example.test", "RCPT TO:<d@example.test>\r\nDATA\r\n", "Screen relayed"),
    (None, []),
]
MAIL_BCD = ("Upstream MAIL FROM:<a@sender.test>|RCPT TO:<b@example.test>|RCPT TO:<c@example.test>"
            "|RCPT TO:<d@example.test> 4")


def test_pipelined_recipients_go_to_postfix_in_one_write_and_are_answered_in_order() -> None:
    machine = run([
        *GROUP,
        *ahead("d@example.test", "DATA\r\n", "Screen relayed"),
        (None, [MAIL_BCD]),
        (up("250 2.1.0 Ok", "250 2.1.5 Ok", "550 5.1.1 <c@example.test>: Recipient address rejected",
            "250 2.1.5 Ok"),
         ["Send 250 2.1.5 Ok", "Send 550 5.1.1 <c@example.test>: Recipient address rejected", "Send 250 2.1.5 Ok"]),
        (Ahead(b"DATA\r\n", b""), ["Screen command"]), (OK, ["Screen data"]), (OK, ["Upstream DATA 1"]),
    ])
    assert machine.session.rcpts == ["b@example.test", "d@example.test"]
    assert machine.counts["RCPT"] == [2, 3] and machine.session.errors == 1


def test_a_recipient_refused_here_inside_a_group_is_answered_in_its_place() -> None:
    run([
        *GROUP[:-4],  # c is refused before Postfix: its reply waits behind b's
        *ahead("c@example.test", "RCPT TO:<d@example.test>\r\n", f"Send {REJECT.reply}", REJECT)[:-1],
        (REJECT, []),
        *ahead("d@example.test", "", "Screen relayed"),
        (None, ["Upstream MAIL FROM:<a@sender.test>|RCPT TO:<b@example.test>|RCPT TO:<d@example.test> 3"]),
        (up("250 2.1.0 Ok", "250 2.1.5 Ok", "250 2.1.5 Ok"),
         ["Send 250 2.1.5 Ok", f"Send {REJECT.reply}", "Send 250 2.1.5 Ok"]),
    ])


def test_the_last_recipient_of_a_group_refused_here_still_forwards_the_group() -> None:
    machine = run([
        *GROUP,
        *ahead("d@example.test", "DATA\r\n", "", REJECT)[:-1],
        (REJECT, ["Upstream MAIL FROM:<a@sender.test>|RCPT TO:<b@example.test>|RCPT TO:<c@example.test> 3"]),
        (up("250 2.1.0 Ok", "250 2.1.5 Ok", "250 2.1.5 Ok"),
         ["Send 250 2.1.5 Ok", "Send 250 2.1.5 Ok", f"Send {REJECT.reply}"]),
    ])
    assert machine.counts["RCPT"] == [2, 3]


def test_greylisting_judges_each_recipient_of_a_group_after_postfix() -> None:
    machine = run([
        *GROUP,
        *ahead("d@example.test", "DATA\r\n", "Screen relayed"),
        (None, [MAIL_BCD]),
        (up("250 2.1.0 Ok", "250 2.1.5 Ok", "250 2.1.5 Ok", "250 2.1.5 Ok"), ["Screen greylist"]),
        (OK, ["Send 250 2.1.5 Ok", "Screen greylist"]),
        (GREYLISTED, [f"Send {GREYLISTED.reply}", "Screen greylist"]),
        (OK, ["Send 250 2.1.5 Ok"]),
    ], GREY_CFG)
    assert machine.session.rcpts == ["b@example.test", "d@example.test"]


def test_postfix_lost_while_a_group_is_forwarded_answers_every_recipient_451() -> None:
    unavailable = "Send 451 4.4.1 Error: mail service temporarily unavailable, try again later"
    machine = run([
        *GROUP,
        *ahead("d@example.test", "DATA\r\n", "Screen relayed"),
        (None, [MAIL_BCD]),
        (UpstreamError("lost connection"), ["AbortUpstream", unavailable, unavailable, unavailable]),
    ])
    assert not machine.upstream_connected and machine.counts["RCPT"] == [0, 3]


NOT_FORWARDED = "Send 451 4.3.0 Error: recipient not processed, try again later"


def test_a_drop_inside_a_group_answers_the_owed_recipients_first() -> None:
    """b is owed; c is dropped here: b gets a 451 of its own (it never
    reached Postfix), then c its reply; no reply of b's is given to c."""
    machine = run([
        *GROUP[:-4],
        *ahead("c@example.test", "RCPT TO:<d@example.test>\r\n", "", REJECT_DROP)[:-1],
        (REJECT_DROP, [NOT_FORWARDED, f"Send {REJECT.reply}", "Close"]),
    ])
    assert machine.counts["RCPT"] == [0, 2]


def test_the_error_limit_dropping_a_command_inside_a_group_answers_the_owed_recipients_first() -> None:
    run([
        *GROUP[:-4],
        (Ahead(b"RCPT TO:<c@example.test>\r\n", b""), ["Screen command"]),
        (DROP, [NOT_FORWARDED, f"Send {DROP.reply}", "Close"]),
    ])


def test_a_timeout_with_replies_owed_answers_them_before_its_421() -> None:
    machine = run(GROUP[:-4])
    assert [show(a) for a in machine.timed_out()] == [
        NOT_FORWARDED, "Send 421 4.4.2 localhost Error: timeout exceeded", "Close"]


def test_a_client_gone_with_replies_owed_has_them_counted() -> None:
    machine = run(GROUP[:-4])
    machine.finish()
    assert machine.counts["RCPT"] == [0, 1]


def test_a_group_goes_to_postfix_before_it_could_pass_the_hard_error_limit() -> None:
    """hard_limit 3, no error yet: at most 3 recipients are owed, so the
    error-limit check before the 4th command counts their refusals."""
    cfg = dataclasses.replace(Config(), errors=ErrorsConfig(soft_limit=0, hard_limit=3))
    refused = "550 5.1.1 Recipient address rejected"
    run([
        *GROUP,  # b and c owed
        *ahead("d@example.test", "RCPT TO:<e@example.test>\r\n", "Screen relayed"),
        (None, [MAIL_BCD]),  # a full group: 3 = hard_limit - errors
        (up("250 2.1.0 Ok", refused, refused, refused), [f"Send {refused}"] * 3),
        (Ahead(b"RCPT TO:<e@example.test>\r\n", b""), ["Screen command"]),
    ], cfg)


def test_an_error_sleep_armed_inside_a_group_keeps_its_place() -> None:
    """c is refused here past the soft limit: its sleep and reply wait behind b's reply."""
    cfg = dataclasses.replace(Config(), errors=ErrorsConfig(soft_limit=1, hard_limit=20, error_sleep=1.0))
    machine = run([
        *HELLO,
        (b"FOO\r\n", ["Screen command"]), (OK, ["Send 502 5.5.2 Error: command not recognized"]),
        (b"MAIL FROM:<a@sender.test>\r\n", ["Screen command"]), (OK, ["Screen mail"]),
        (OK, ["Send 250 2.1.0 Ok"]),
        *ahead("b@example.test", "RCPT TO:<c@example.test>\r\nRCPT TO:<d@example.test>\r\n", "Screen relayed"),
        (None, ["OpenUpstream"]),
        (0.01, []),
        *ahead("c@example.test", "RCPT TO:<d@example.test>\r\n", "", REJECT)[:-1],
        (REJECT, []),
        *ahead("d@example.test", "", "Screen relayed"),
        (None, ["Upstream MAIL FROM:<a@sender.test>|RCPT TO:<b@example.test>|RCPT TO:<d@example.test> 3"]),
        (up("250 2.1.0 Ok", "250 2.1.5 Ok", "250 2.1.5 Ok"),
         ["Send 250 2.1.5 Ok", "Arm 1", f"Send {REJECT.reply}", "Send 250 2.1.5 Ok"]),
    ], cfg)
    assert machine.session.errors == 2


@pytest.mark.parametrize("helo", [True, False])
def test_postfix_refusing_mail_answers_every_recipient_of_the_group(helo: bool) -> None:
    refused = "553 5.7.1 <a@sender.test>: Sender address rejected"
    if helo:  # pipelined: MAIL and the group in one write
        rows = [*GROUP, *ahead("d@example.test", "", "Screen relayed"),
                (None, [MAIL_BCD]),
                (up(refused, *["503 5.5.1 Error: need MAIL command"] * 3), [f"Send {refused}"] * 3)]
    else:  # no EHLO upstream: no group, MAIL alone
        rows = [(b"MAIL FROM:<a@sender.test>\r\n", ["Screen command"]), (OK, ["Screen mail"]),
                (OK, ["Send 250 2.1.0 Ok"]),
                *ahead("b@example.test", "RCPT TO:<c@example.test>\r\n", "Screen relayed"),
                (None, ["OpenUpstream"]), (0.01, ["Upstream MAIL FROM:<a@sender.test> 1"]),
                (up(refused), [f"Send {refused}"])]
    machine = run(rows)
    assert not machine._upstream_mail and machine.session.rcpts == []


def test_no_group_when_postfix_got_no_ehlo() -> None:
    """Without the client's HELO Postfix offered no PIPELINING: one at a time."""
    run([
        (b"MAIL FROM:<a@sender.test>\r\n", ["Screen command"]), (OK, ["Screen mail"]), (OK, ["Send 250 2.1.0 Ok"]),
        *ahead("b@example.test", "RCPT TO:<c@example.test>\r\n", "Screen relayed"),
        (None, ["OpenUpstream"]),
        (0.01, ["Upstream MAIL FROM:<a@sender.test> 1"]),
        (up("250 2.1.0 Ok"), ["Upstream RCPT TO:<b@example.test> 1"]),
        (up("250 2.1.5 Ok"), ["Send 250 2.1.5 Ok"]),
    ])


@pytest.mark.parametrize("pending", [b"RCPT TO:<c@example.test>", b"DATA\r\nRCPT TO:<c@example.test>\r\n",
                                     b"RCPT TO:<" + b"c" * 600 + b"@example.test>\r\n"])
def test_no_group_unless_a_whole_short_rcpt_line_follows(pending: bytes) -> None:
    """Half a line, another command first, or a line the reader may refuse
    as too long: forwarded at once, nothing owed."""
    run([
        *ENVELOPE[:-6],
        (Ahead(b"RCPT TO:<b@example.test>\r\n", pending), ["Screen command"]), (OK, ["Screen rcpt"]),
        (OK, ["Screen relayed"]), (None, ["OpenUpstream"]), (0.01, [MAIL_RCPT_B]),
    ])


def test_a_group_holds_at_most_group_limit_recipients(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a hard error limit the group still goes at GROUP_LIMIT."""
    monkeypatch.setattr(machine_module, "GROUP_LIMIT", 2)
    cfg = dataclasses.replace(Config(), errors=ErrorsConfig(hard_limit=0, soft_limit=0))
    run([
        *GROUP[:-1],
        (None, ["Upstream MAIL FROM:<a@sender.test>|RCPT TO:<b@example.test>|RCPT TO:<c@example.test> 3"]),
        (up("250 2.1.0 Ok", "250 2.1.5 Ok", "250 2.1.5 Ok"), ["Send 250 2.1.5 Ok", "Send 250 2.1.5 Ok"]),
    ], cfg)
