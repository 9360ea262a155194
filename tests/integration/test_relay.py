"""End to end: clients -> smtpguard (subprocess) -> the private real Postfix."""

from __future__ import annotations

import hashlib
import signal
import smtplib
import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from tests.integration.guard import Guard, RawClient
from tests.lab import PrivatePostfix, free_port

pytestmark = pytest.mark.postfix

SMUGGLING = [b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\r", b"\r.\n", b"\r\n\x00.\r\n", b"\r\n.\r\r\n"]


def body_of(delivered: bytes) -> bytes:
    """The body of a delivered Maildir file (Postfix stores LF line ends)."""
    return delivered.split(b"\n\n", 1)[1]


def test_delivers_exact_body_with_real_client_identity(backend: PrivatePostfix, guard: Guard) -> None:
    body = b"Hello,\r\n.leading dot line\r\n..two dots\r\n\r\nUTF-8: \xc3\xa4\r\nend\r\n"
    with smtplib.SMTP("127.0.0.1", guard.port, source_address=("127.0.0.7", 0)) as c:
        c.ehlo("client7.example")
        c.sendmail("alice@sender.test", ["bob@example.test"], b"Subject: t1\r\n\r\n" + body)
    [msg] = backend.wait_for_messages(1)
    assert body_of(msg) == body.replace(b"\r\n", b"\n")
    assert b"Received: from client7.example (unknown [127.0.0.7])" in msg
    backend.wait_for_log(r"client=unknown\[127\.0\.0\.7\]")
    m = guard.wait_for_log(r"(\w+): relayed from unknown\[127\.0\.0\.7\]:\d+: 250 2\.0\.0 Ok: queued as (\w+)")
    assert m.group(1) == m.group(2)
    guard.wait_for_log(r"CONNECT from \[127\.0\.0\.7\]:\d+ to \[127\.0\.0\.1\]:\d+")
    guard.wait_for_log(r"DISCONNECT \[127\.0\.0\.7\]:\d+ ehlo=1 mail=1 rcpt=1 data=1 quit=1 commands=5")


def test_ehlo_features_vrfy_and_no_auth(guard: Guard) -> None:
    c = RawClient(guard.port)
    assert c.reply() == "220-mx.guard.test ESMTP\r\n220 mx.guard.test ESMTP\r\n"  # pregreet test
    ehlo = c.cmd("EHLO client.example")
    assert ehlo.splitlines() == ["250-mx.guard.test", "250-PIPELINING", "250-SIZE 10240000",
                                 "250-ENHANCEDSTATUSCODES", "250-8BITMIME", "250-DSN", "250 SMTPUTF8"]
    assert "AUTH" not in ehlo
    assert c.cmd("VRFY bob@example.test") == "502 5.5.1 VRFY command is disabled\r\n"
    assert c.cmd("HELP") == "502 5.5.2 Error: command not recognized\r\n"
    assert c.cmd("NOOP") == "250 2.0.0 Ok\r\n"
    assert c.cmd("QUIT") == "221 2.0.0 Bye\r\n"


def test_postfix_rcpt_reject_relayed_verbatim(backend: PrivatePostfix, guard: Guard) -> None:
    c = RawClient(guard.port, source="127.0.0.8")
    c.reply()
    c.cmd("EHLO client.example")
    assert c.cmd("MAIL FROM:<a@sender.test>").startswith("250 2.1.0")
    reply = c.cmd("RCPT TO:<someone@elsewhere.invalid>")
    assert reply == "454 4.7.1 <someone@elsewhere.invalid>: Relay access denied\r\n"
    backend.wait_for_log(r"NOQUEUE: reject: RCPT from unknown\[127\.0\.0\.8\]: 454 4\.7\.1 .*Relay access denied")
    assert c.cmd("RCPT TO:<bob@example.test>").startswith("250 2.1.5")
    assert c.cmd("DATA").startswith("354 ")
    c.send(b"Subject: partial rcpt\r\n\r\nbody\r\n.\r\n")
    assert c.reply().startswith("250 2.0.0 Ok: queued as ")
    c.cmd("QUIT")
    [msg] = backend.wait_for_messages(1)
    assert b"Subject: partial rcpt" in msg


def test_data_without_valid_recipients(guard: Guard) -> None:
    c = RawClient(guard.port)
    c.reply()
    c.cmd("EHLO client.example")
    assert c.cmd("DATA") == "503 5.5.1 Error: need MAIL command\r\n"
    c.cmd("MAIL FROM:<a@sender.test>")
    assert c.cmd("DATA") == "554 5.5.1 Error: no valid recipients\r\n"
    assert c.cmd("MAIL FROM:<b@sender.test>") == "503 5.5.1 Error: nested MAIL command\r\n"


def test_multiple_transactions_and_rset(backend: PrivatePostfix, guard: Guard) -> None:
    with smtplib.SMTP("127.0.0.1", guard.port) as c:
        c.ehlo("client.example")
        for i in range(3):
            c.sendmail("a@sender.test", ["r1@example.test", "r2@example.test"], f"Subject: m{i}\r\n\r\nx\r\n")
        c.mail("a@sender.test")
        c.rcpt("r1@example.test")
        assert c.rset()[0] == 250
        c.sendmail("a@sender.test", ["r3@example.test"], "Subject: after-rset\r\n\r\nx\r\n")
    msgs = backend.wait_for_messages(7)  # 3 x 2 recipients + 1
    subjects = sorted(m.split(b"Subject: ")[1].split(b"\n")[0] for m in msgs)
    assert subjects == [b"after-rset", b"m0", b"m0", b"m1", b"m1", b"m2", b"m2"]


def test_dsn_parameters_pass_through(backend: PrivatePostfix, guard: Guard) -> None:
    with smtplib.SMTP("127.0.0.1", guard.port) as c:
        c.ehlo("client.example")
        c.sendmail("dsn@example.test", ["r1@example.test"], "Subject: dsn\r\n\r\nx\r\n",
                   mail_options=["RET=HDRS", "ENVID=env+2B42"],
                   rcpt_options=["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;r+2Bx@example.test"])
    msgs = backend.wait_for_messages(2)  # the message and Postfix's success notification
    [dsn] = [m for m in msgs if b"delivery status notification" in m.lower() or b"Original-Envelope-Id" in m]
    assert b"Original-Envelope-Id: env+2B42" in dsn or b"Original-Envelope-Id: env+42" in dsn
    assert b"r+x@example.test" in dsn or b"r+2Bx@example.test" in dsn


def test_pipelining_client_delivers(backend: PrivatePostfix, guard: Guard) -> None:
    c = RawClient(guard.port)
    c.reply()
    c.cmd("EHLO client.example")
    c.send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<p1@example.test>\r\nRCPT TO:<p2@example.test>\r\nDATA\r\n")
    assert [c.reply()[:3] for _ in range(4)] == ["250", "250", "250", "354"]
    c.send(b"Subject: pipelined\r\n\r\nhi\r\n.\r\nMAIL FROM:<b@sender.test>\r\nRCPT TO:<p3@example.test>\r\n"
           b"DATA\r\n")
    assert [c.reply()[:3] for _ in range(4)] == ["250", "250", "250", "354"]
    c.send(b"Subject: second\r\n\r\nhi\r\n.\r\nQUIT\r\n")
    assert c.reply()[:3] == "250"
    assert c.reply() == "221 2.0.0 Bye\r\n"
    assert len(backend.wait_for_messages(3)) == 3


def test_pipelined_recipients_reach_postfix_together_and_replies_keep_their_order(
        backend: PrivatePostfix, guard: Guard) -> None:
    """MAIL and three recipients in one write to Postfix (the machine's
    pipelined group); Postfix refuses the middle one; each reply in its place."""
    c = RawClient(guard.port, source="127.0.0.9")
    c.reply()
    c.cmd("EHLO client.example")
    c.send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<g1@example.test>\r\nRCPT TO:<someone@elsewhere.invalid>\r\n"
           b"RCPT TO:<g2@example.test>\r\nDATA\r\n")
    assert [c.reply() for _ in range(5)] == [
        "250 2.1.0 Ok\r\n", "250 2.1.5 Ok\r\n", "454 4.7.1 <someone@elsewhere.invalid>: Relay access denied\r\n",
        "250 2.1.5 Ok\r\n", "354 End data with <CR><LF>.<CR><LF>\r\n"]
    c.send(b"Subject: group\r\n\r\nhi\r\n.\r\nQUIT\r\n")
    assert c.reply().startswith("250 2.0.0 Ok: queued as ")
    assert c.reply() == "221 2.0.0 Bye\r\n"
    assert len(backend.wait_for_messages(2)) == 2  # g1 and g2
    guard.wait_for_log(r"DISCONNECT \[127\.0\.0\.9\]:\d+ ehlo=1 mail=1 rcpt=2/3 data=1 quit=1 commands=6/7")


@pytest.mark.parametrize("seq", SMUGGLING, ids=[repr(s) for s in SMUGGLING])
def test_smuggling_never_makes_a_second_message(backend: PrivatePostfix, guard: Guard, seq: bytes) -> None:
    c = RawClient(guard.port)
    c.reply()
    c.cmd("EHLO client.example")
    c.cmd("MAIL FROM:<a@sender.test>")
    c.cmd("RCPT TO:<victim@example.test>")
    assert c.cmd("DATA").startswith("354")
    c.send(b"Subject: carrier\r\n\r\nfirst" + seq
           + b"MAIL FROM:<admin@sender.test>\r\nRCPT TO:<smuggled@example.test>\r\nDATA\r\n"
           + b"Subject: smuggled\r\n\r\nevil\r\n.\r\n")
    assert c.reply().startswith("550 5.5.2 Error: ")  # bare CR/LF or NUL
    # The session goes on: a clean message afterwards is delivered, and only it.
    c.cmd("MAIL FROM:<a@sender.test>")
    assert c.cmd("RCPT TO:<victim@example.test>").startswith("250")
    assert c.cmd("DATA").startswith("354")
    c.send(b"Subject: clean\r\n\r\nok\r\n.\r\n")
    assert c.reply().startswith("250 2.0.0")
    c.cmd("QUIT")
    [msg] = backend.wait_for_messages(1)
    assert b"Subject: clean" in msg
    log = backend.log()
    assert "smuggled" not in log and log.count("queue active") == 1


@pytest.mark.parametrize("seq", SMUGGLING, ids=[repr(s) for s in SMUGGLING])
def test_smuggling_normalized(backend: PrivatePostfix, make_guard: Callable[..., Guard], seq: bytes) -> None:
    g = make_guard(backend.port, '[server]\nbare_newline = "normalize"\n')
    c = RawClient(g.port)
    c.reply()
    c.cmd("EHLO client.example")
    c.cmd("MAIL FROM:<a@sender.test>")
    c.cmd("RCPT TO:<victim@example.test>")
    assert c.cmd("DATA").startswith("354")
    c.send(b"Subject: carrier\r\n\r\nfirst" + seq + b"MAIL FROM:<admin@sender.test>\r\n"
           b"RCPT TO:<smuggled@example.test>\r\nDATA\r\nSubject: smuggled\r\n\r\nevil\r\n.\r\n")
    assert c.reply().startswith("250 2.0.0")
    c.cmd("QUIT")
    [msg] = backend.wait_for_messages(1)
    assert b"Subject: carrier" in msg and b"evil" in msg  # one message, smuggled text is just content
    assert "smuggled@example.test" not in backend.log()


@pytest.mark.parametrize("command", ["XCLIENT ADDR=1.2.3.4", "XFORWARD ADDR=1.2.3.4", "BDAT 10 LAST",
                                     "AUTH PLAIN AGFAYg==", "ETRN example.test", "EXPN staff", "FOO bar"])
def test_forbidden_and_unknown_commands_never_forwarded(backend: PrivatePostfix, guard: Guard,
                                                        command: str) -> None:
    c = RawClient(guard.port, source="127.0.0.9")
    c.reply()
    c.cmd("EHLO client.example")
    c.cmd("MAIL FROM:<a@sender.test>")
    c.cmd("RCPT TO:<bob@example.test>")  # upstream is open now
    assert c.cmd(command) == "502 5.5.2 Error: command not recognized\r\n"
    assert c.cmd("DATA").startswith("354")
    c.send(b"Subject: x\r\n\r\nx\r\n.\r\n")
    assert c.reply().startswith("250")
    c.cmd("QUIT")
    backend.wait_for_messages(1)
    backend.wait_for_log(r"disconnect from unknown\[127\.0\.0\.9\]")
    verb = command.split()[0].lower()
    counts = backend.log().split("disconnect from unknown[127.0.0.9]")[1].splitlines()[0]
    # Only smtpguard's own XCLIENT reached Postfix; nothing of the client's.
    assert "xclient=0/1 " in counts and (verb == "xclient" or f"{verb}=" not in counts)
    guard.wait_for_log(rf"unknown or unsupported command: {command.split()[0]}")


def test_fifty_megabyte_message_arrives_intact(backend: PrivatePostfix, make_guard: Callable[..., Guard]) -> None:
    g = make_guard(backend.port, '[server]\nmessage_size_limit = "60m"\n')
    backend.postconf(message_size_limit=str(70 * 1024 * 1024), virtual_mailbox_limit="0")
    try:
        line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-\r\n"  # 76 bytes
        n = 50 * 1024 * 1024 // len(line)
        body = b"".join(b"%08d " % i + line[9:] for i in range(n))
        with smtplib.SMTP("127.0.0.1", g.port, timeout=120) as c:
            c.ehlo("big.example")
            c.sendmail("a@sender.test", ["big@example.test"], b"Subject: big\r\n\r\n" + body)
        [msg] = backend.wait_for_messages(1, timeout=120)
        got = body_of(msg)
        assert len(got) == len(body) - n  # CRLF stored as LF
        assert hashlib.sha256(got).digest() == hashlib.sha256(body.replace(b"\r\n", b"\n")).digest()
    finally:
        backend.postconf(message_size_limit="10240000", virtual_mailbox_limit="51200000")


def test_message_size_limit(backend: PrivatePostfix, make_guard: Callable[..., Guard]) -> None:
    g = make_guard(backend.port, '[server]\nmessage_size_limit = 2000\n')
    c = RawClient(g.port)
    c.reply()
    c.cmd("EHLO client.example")
    assert c.cmd("MAIL FROM:<a@sender.test> SIZE=5000") == "552 5.3.4 Message size exceeds fixed limit\r\n"
    c.cmd("MAIL FROM:<a@sender.test>")
    c.cmd("RCPT TO:<bob@example.test>")
    assert c.cmd("DATA").startswith("354")
    c.send(b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n" + (b"y" * 70 + b"\r\n") * 50 + b".\r\n")
    assert c.reply() == "552 5.3.4 Error: message file too big\r\n"
    c.cmd("QUIT")
    assert backend.messages() == []


def test_upstream_down_gives_4xx(backend: PrivatePostfix, make_guard: Callable[..., Guard]) -> None:
    g = make_guard(free_port())  # nothing listens there
    c = RawClient(g.port)
    c.reply()
    c.cmd("EHLO client.example")
    c.cmd("MAIL FROM:<a@sender.test>")
    assert c.cmd("RCPT TO:<bob@example.test>") == (
        "451 4.4.1 Error: mail service temporarily unavailable, try again later\r\n")
    g.wait_for_log(r"warning: unknown\[127\.0\.0\.1\]:\d+: upstream RCPT failed: connect to 127\.0\.0\.1:\d+: "
                   r"Connection refused")


def test_postfix_stopped_mid_session_gives_4xx(backend: PrivatePostfix, guard: Guard) -> None:
    c = RawClient(guard.port)
    c.reply()
    c.cmd("EHLO client.example")
    c.cmd("MAIL FROM:<a@sender.test>")
    assert c.cmd("RCPT TO:<bob@example.test>").startswith("250")
    backend.stop()
    reply = c.cmd("DATA")
    assert reply[:1] == "4" and reply[:3] in ("421", "451"), reply
    assert c.cmd("MAIL FROM:<a@sender.test>").startswith("250")
    assert c.cmd("RCPT TO:<bob@example.test>").startswith("451 4.4.1")


@pytest.fixture
def silent_upstream() -> Iterator[tuple[int, threading.Event]]:
    """A stand-in for the relay's error path: accepts, sends a banner only when
    told, then never answers (Postfix cannot be made to hang on cue)."""
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    greet = threading.Event()
    conns: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            conns.append(conn)
            if greet.is_set():
                conn.sendall(b"220 hanging.test ESMTP\r\n")

    threading.Thread(target=serve, daemon=True).start()
    yield port, greet
    srv.close()
    for conn in conns:
        conn.close()


def test_upstream_timeout_gives_4xx(make_guard: Callable[..., Guard], silent_upstream: tuple[int, threading.Event]
                                    ) -> None:
    port, greet = silent_upstream
    greet.set()  # banner, then silence after XCLIENT
    g = make_guard(port, upstream_extra="timeout = 1\n")
    c = RawClient(g.port)
    c.reply()
    c.cmd("EHLO client.example")
    c.cmd("MAIL FROM:<a@sender.test>")
    assert c.cmd("RCPT TO:<bob@example.test>").startswith("451 4.4.1")
    g.wait_for_log(r"upstream RCPT failed: 127\.0\.0\.1:\d+: timeout waiting for a reply")


def test_idle_command_timeout(make_guard: Callable[..., Guard], backend: PrivatePostfix) -> None:
    g = make_guard(backend.port, "[server]\ncommand_timeout = 1\n")
    c = RawClient(g.port)
    c.reply()
    c.cmd("EHLO client.example")
    assert c.reply() == "421 4.4.2 mx.guard.test Error: timeout exceeded\r\n"
    assert c.closed()
    g.wait_for_log(r"timeout after EHLO from unknown\[127\.0\.0\.1\]")


def test_sigterm_lets_transaction_finish(backend: PrivatePostfix, make_guard: Callable[..., Guard]) -> None:
    g = make_guard(backend.port)
    busy, idle = RawClient(g.port), RawClient(g.port)
    busy.reply()
    idle.reply()
    busy.cmd("EHLO client.example")
    idle.cmd("EHLO idle.example")
    busy.cmd("MAIL FROM:<a@sender.test>")
    assert busy.cmd("RCPT TO:<bob@example.test>").startswith("250")
    assert g.proc is not None
    g.proc.send_signal(signal.SIGTERM)
    assert idle.reply() == "421 4.3.2 Service shutting down, closing connection\r\n"
    with pytest.raises(OSError):
        RawClient(g.port, timeout=2).reply()
    assert busy.cmd("DATA").startswith("354")
    busy.send(b"Subject: during shutdown\r\n\r\nx\r\n.\r\n")
    assert busy.reply().startswith("250 2.0.0 Ok: queued as")
    assert busy.cmd("NOOP") == "421 4.3.2 Service shutting down, closing connection\r\n" or busy.closed()
    assert g.proc.wait(20) == 0
    [msg] = backend.wait_for_messages(1)
    assert b"during shutdown" in msg


def test_many_clients_from_different_addresses(backend: PrivatePostfix, guard: Guard) -> None:
    for i in range(2, 6):
        with smtplib.SMTP("127.0.0.1", guard.port, source_address=(f"127.0.{i}.1", 0)) as c:
            c.sendmail("a@sender.test", ["bob@example.test"], f"Subject: from {i}\r\n\r\nx\r\n")
    backend.wait_for_messages(4)
    for i in range(2, 6):
        assert f"client=unknown[127.0.{i}.1]" in backend.log()


def test_no_traceback_reaches_client(guard: Guard) -> None:
    c = RawClient(guard.port)
    c.reply()
    for line in ["", "EHLO", "MAIL FROM:<a@b", "RCPT", "\xff\xfe garbage", "DATA extra"]:
        reply = c.cmd(line)
        assert reply[0] in "45" and "Traceback" not in reply and "Error: (" not in reply
    assert "Traceback" not in guard.full_log()


@pytest.mark.parametrize("loop", ["auto", "asyncio"])
def test_relays_on_either_event_loop(backend: PrivatePostfix, make_guard: Callable[..., Guard], loop: str) -> None:
    """[server] event_loop: the default (auto) runs on uvloop, a declared
    dependency; asyncio's own loop relays the same way."""
    g = make_guard(backend.port, f'[server]\nevent_loop = "{loop}"\n')
    g.wait_for_log(r"(?m)daemon started -- .*; event loop " + ("uvloop 0\\.23\\.0$" if loop == "auto" else "asyncio$"))
    with smtplib.SMTP("127.0.0.1", g.port) as c:
        c.sendmail("a@sender.test", ["bob@example.test"], f"Subject: on {loop}\r\n\r\nbody\r\n".encode())
    assert any(f"Subject: on {loop}".encode() in m for m in backend.wait_for_messages(1))
