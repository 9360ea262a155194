"""End to end screening: clients -> smtpguard (subprocess) -> the private Postfix.

Every test runs the real listener with a short greet wait (see
``tests/integration/guard.py``) and checks what the client hears, what
smtpguard logs and what reached Postfix.
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.guard import Guard, RawClient
from tests.lab import PrivatePostfix, wait_until

pytestmark = pytest.mark.postfix

BANNER = "220-mx.guard.test ESMTP\r\n220 mx.guard.test ESMTP\r\n"
PROTOCOL_ERROR = "550 5.5.1 Protocol error\r\n"

MakeGuard = Callable[..., Guard]


def nothing_reached_postfix(backend: PrivatePostfix) -> bool:
    time.sleep(0.2)
    return "connect from" not in backend.log() and not backend.messages()


# ---------------------------------------------------------------- pregreet

def test_pregreeting_bot_is_rejected_and_nothing_reaches_postfix(backend: PrivatePostfix, guard: Guard) -> None:
    c = RawClient(guard.port, source="127.0.0.21")
    assert c.line() == "220-mx.guard.test ESMTP\r\n"
    c.send(b"EHLO bot.example\r\n")  # talks before the final 220
    assert c.line() == "220 mx.guard.test ESMTP\r\n"
    assert c.reply().startswith("250-mx.guard.test")
    assert c.cmd("MAIL FROM:<bot@sender.test>").startswith("250")
    assert c.cmd("RCPT TO:<bob@example.test>") == PROTOCOL_ERROR
    assert c.cmd("RCPT TO:<carol@example.test>") == PROTOCOL_ERROR
    assert c.cmd("DATA") == "554 5.5.1 Error: no valid recipients\r\n"
    assert c.cmd("QUIT") == "221 2.0.0 Bye\r\n"
    guard.wait_for_log(r"PREGREET 18 after \d+\.\d\d from \[127\.0\.0\.21\]:\d+: EHLO bot\.example\\r\\n")
    guard.wait_for_log(r"NOQUEUE: reject: RCPT from unknown\[127\.0\.0\.21\]:\d+: 550 5\.5\.1 Protocol error; "
                       r"from=<bot@sender\.test> to=<bob@example\.test> proto=ESMTP helo=<bot\.example>")
    assert nothing_reached_postfix(backend)


def test_pregreet_drop_hangs_up(backend: PrivatePostfix, make_guard: MakeGuard) -> None:
    g = make_guard(backend.port, '[pregreet]\ngreet_wait = "5s"\naction = "drop"\n')
    c = RawClient(g.port, source="127.0.0.22")
    assert c.line() == "220-mx.guard.test ESMTP\r\n"
    c.send(b"HELO bot\r\n")
    assert c.reply() == "521 5.7.1 Protocol error\r\n"  # at once, not after the 5s wait
    assert c.closed()
    g.wait_for_log(r"PREGREET 10 after .* from \[127\.0\.0\.22\]:\d+: HELO bot\\r\\n")
    g.wait_for_log(r"DISCONNECT \[127\.0\.0\.22\]:\d+ commands=0")
    assert nothing_reached_postfix(backend)


def test_hangup_in_the_greet_wait_and_shutdown_during_it(backend: PrivatePostfix, make_guard: MakeGuard) -> None:
    g = make_guard(backend.port, '[pregreet]\ngreet_wait = "30s"\n')
    c = RawClient(g.port, source="127.0.0.57")
    assert c.line() == "220-mx.guard.test ESMTP\r\n"
    c.close()
    g.wait_for_log(r"HANGUP after \d+\.\d\d from \[127\.0\.0\.57\]:\d+ in tests before SMTP handshake")
    waiting = RawClient(g.port, source="127.0.0.58")
    assert waiting.line() == "220-mx.guard.test ESMTP\r\n"
    # A clean exit within 20s: the waiting client was not kept for its 30s
    # wait nor for the 30s shutdown_timeout (stop() kills after 20s).
    assert g.stop(timeout=20) == 0
    assert waiting.reply() == "421 4.3.2 Service shutting down, closing connection\r\n"


def test_good_client_delivers_then_pass_old_skips_the_wait(backend: PrivatePostfix, guard: Guard) -> None:
    c = RawClient(guard.port, source="127.0.0.23")
    assert c.reply() == BANNER
    replies = c.transaction()
    assert replies[-1].startswith("250 2.0.0 Ok: queued as")
    c.cmd("QUIT")
    backend.wait_for_messages(1)
    guard.wait_for_log(r"PASS NEW \[127\.0\.0\.23\]:\d+")
    # Its tests are cached now: the next connection is PASS OLD, no 220- and no wait.
    c = RawClient(guard.port, source="127.0.0.23")
    assert c.reply() == "220 mx.guard.test ESMTP\r\n"
    guard.wait_for_log(r"PASS OLD \[127\.0\.0\.23\]:\d+")
    assert c.transaction(subject="again")[-1].startswith("250 2.0.0 Ok: queued as")
    assert len(backend.wait_for_messages(2)) == 2


def test_ignore_mode_logs_but_delivers(backend: PrivatePostfix, make_guard: MakeGuard) -> None:
    g = make_guard(backend.port, '[pregreet]\ngreet_wait = "0.2s"\naction = "ignore"\n')
    c = RawClient(g.port, source="127.0.0.24")
    c.line()
    c.send(b"EHLO early.example\r\n")
    c.line()
    assert c.reply().startswith("250-mx.guard.test")
    assert c.cmd("MAIL FROM:<a@sender.test>").startswith("250")
    assert c.cmd("RCPT TO:<bob@example.test>").startswith("250")
    assert c.cmd("DATA").startswith("354")
    c.send(b"Subject: ignored\r\n\r\nx\r\n.\r\n")
    assert c.reply().startswith("250 2.0.0 Ok: queued as")
    g.wait_for_log(r"PREGREET 20 after .* from \[127\.0\.0\.24\]:\d+: EHLO early\.example\\r\\n")
    assert len(backend.wait_for_messages(1)) == 1


# ---------------------------------------------------------------- pipelining

def test_pipelining_ehlo_client_delivers(backend: PrivatePostfix, guard: Guard) -> None:
    c = RawClient(guard.port, source="127.0.0.25")
    c.reply()
    assert "250-PIPELINING" in c.cmd("EHLO client.example")
    c.send(b"MAIL FROM:<a@sender.test>\r\nRSET\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<p1@example.test>\r\n"
           b"RCPT TO:<p2@example.test>\r\nDATA\r\n")
    assert [c.reply()[:3] for _ in range(6)] == ["250", "250", "250", "250", "250", "354"]
    c.send(b"Subject: pipelined\r\n\r\nhi\r\n.\r\nQUIT\r\n")
    assert c.reply().startswith("250 2.0.0 Ok: queued as")
    assert c.reply() == "221 2.0.0 Bye\r\n"
    assert len(backend.wait_for_messages(2)) == 2
    assert "PIPELINING from" not in guard.log()


@pytest.mark.parametrize(("burst", "after"), [
    (b"HELO bot.example\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n", "HELO"),
    (b"EHLO bot.example\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n", "EHLO"),
])
def test_unauthorized_pipelining_bot_is_rejected(backend: PrivatePostfix, guard: Guard, burst: bytes,
                                                 after: str) -> None:
    c = RawClient(guard.port, source="127.0.0.26")
    c.reply()
    c.send(burst)
    assert c.reply().startswith("250")  # HELO/EHLO
    assert c.reply().startswith("250 2.1.0")  # MAIL
    assert c.reply() == PROTOCOL_ERROR  # RCPT
    assert c.reply() == "554 5.5.1 Error: no valid recipients\r\n"  # DATA
    guard.wait_for_log(rf"COMMAND PIPELINING from \[127\.0\.0\.26\]:\d+ after {after}: "
                       r"MAIL FROM:<a@sender\.test>\\r\\n")
    guard.wait_for_log(r"NOQUEUE: reject: RCPT from unknown\[127\.0\.0\.26\]:\d+: 550 5\.5\.1 Protocol error; "
                       r"from=<a@sender\.test> to=<bob@example\.test>")
    assert nothing_reached_postfix(backend)


def test_pipelining_the_message_after_data_is_rejected(backend: PrivatePostfix, guard: Guard) -> None:
    c = RawClient(guard.port, source="127.0.0.27")
    c.reply()
    c.cmd("EHLO client.example")
    c.cmd("MAIL FROM:<a@sender.test>")
    assert c.cmd("RCPT TO:<bob@example.test>").startswith("250")
    c.send(b"DATA\r\nSubject: too early\r\n")  # did not wait for 354
    assert c.reply() == PROTOCOL_ERROR
    guard.wait_for_log(r"COMMAND PIPELINING from \[127\.0\.0\.27\]:\d+ after DATA: Subject: too early")
    time.sleep(0.3)
    assert not backend.messages()


# ---------------------------------------------------------------- non-SMTP, bare newline

def test_http_request_is_dropped(backend: PrivatePostfix, guard: Guard) -> None:
    c = RawClient(guard.port, source="127.0.0.28")
    c.reply()
    c.send(b"GET / HTTP/1.1\r\nHost: mx.guard.test\r\n\r\n")
    assert c.reply() == "521 5.7.1 Protocol error\r\n"
    assert c.closed()
    guard.wait_for_log(r"NON-SMTP COMMAND from \[127\.0\.0\.28\]:\d+ after CONNECT: GET / HTTP/1\.1")
    assert nothing_reached_postfix(backend)


def test_header_as_command_is_dropped(guard: Guard) -> None:
    c = RawClient(guard.port, source="127.0.0.29")
    c.reply()
    c.cmd("EHLO client.example")
    assert c.cmd("Subject: hello") == "521 5.7.1 Protocol error\r\n"
    guard.wait_for_log(r"NON-SMTP COMMAND from \[127\.0\.0\.29\]:\d+ after EHLO: Subject: hello")


def test_bare_newline_logged_by_default_enforced_when_configured(backend: PrivatePostfix,
                                                                 make_guard: MakeGuard) -> None:
    g = make_guard(backend.port)
    c = RawClient(g.port, source="127.0.0.31")
    c.reply()
    c.send(b"EHLO client.example\n")
    c.reply()
    assert c.transaction(helo="NOOP")[-1].startswith("250 2.0.0")
    g.wait_for_log(r"BARE NEWLINE from \[127\.0\.0\.31\]:\d+ after EHLO")
    g2 = make_guard(backend.port, '[bare_newline]\naction = "enforce"\n')
    c = RawClient(g2.port, source="127.0.0.32")
    c.reply()
    c.send(b"EHLO client.example\n")
    c.reply()
    c.cmd("MAIL FROM:<a@sender.test>")
    assert c.cmd("RCPT TO:<bob@example.test>") == PROTOCOL_ERROR


# ---------------------------------------------------------------- error limits

def test_soft_limit_delays_then_hard_limit_disconnects(make_guard: MakeGuard, backend: PrivatePostfix) -> None:
    g = make_guard(backend.port, '[errors]\nsoft_limit = 2\nhard_limit = 4\nerror_sleep = "0.5s"\n')
    c = RawClient(g.port, source="127.0.0.33")
    c.reply()
    for _ in range(2):  # below the soft limit: answered at once
        assert c.cmd("FOO") == "502 5.5.2 Error: command not recognized\r\n"
    for _ in range(2):  # over it: each error reply is held back error_sleep (a lower bound, never flaky)
        start = time.monotonic()
        assert c.cmd("FOO") == "502 5.5.2 Error: command not recognized\r\n"
        assert time.monotonic() - start >= 0.45
    assert c.cmd("NOOP") == "421 4.7.0 mx.guard.test Error: too many errors\r\n"
    assert c.closed()
    g.wait_for_log(r"too many errors after UNKNOWN from unknown\[127\.0\.0\.33\]:\d+")


def test_command_count_limit_before_delivery(make_guard: MakeGuard, backend: PrivatePostfix) -> None:
    g = make_guard(backend.port, "[errors]\ncommand_count_limit = 5\n")
    c = RawClient(g.port, source="127.0.0.34")
    c.reply()
    for _ in range(5):
        assert c.cmd("NOOP").startswith("250")
    assert c.cmd("NOOP") == "421 4.7.0 mx.guard.test Error: too many commands\r\n"
    assert c.closed()


# ---------------------------------------------------------------- connection limits

def test_sixth_concurrent_connection_from_one_ip_gets_421(make_guard: MakeGuard, backend: PrivatePostfix) -> None:
    g = make_guard(backend.port, "[limits]\nconnection_count_limit = 5\n")
    held = [RawClient(g.port, source="127.0.0.35") for _ in range(5)]
    for c in held:
        assert c.reply() == BANNER
    sixth = RawClient(g.port, source="127.0.0.35")
    assert sixth.reply() == "421 4.7.0 Error: too many connections from 127.0.0.35\r\n"
    assert sixth.closed()
    g.wait_for_log(r"warning: Connection concurrency limit exceeded: 6 from \[127\.0\.0\.35\]:\d+ for service smtp")
    other = RawClient(g.port, source="127.0.0.36")  # another client is not affected
    assert other.reply() == BANNER
    held[0].cmd("QUIT")
    held[0].closed()

    def accepted() -> bool:
        c = RawClient(g.port, source="127.0.0.35")
        ok = c.reply() == "220 mx.guard.test ESMTP\r\n" or c.reply().startswith("220")
        c.close()
        return ok

    wait_until(accepted, timeout=10, what="a slot for 127.0.0.35 after one closed")


def test_connection_rate_limit(make_guard: MakeGuard, backend: PrivatePostfix) -> None:
    g = make_guard(backend.port, "[limits]\nconnection_rate_limit = 3\n")
    for _ in range(3):
        c = RawClient(g.port, source="127.0.0.37")
        assert c.reply().startswith("220")
        c.cmd("QUIT")
    c = RawClient(g.port, source="127.0.0.37")
    assert c.reply() == "421 4.7.0 Error: too many connections from 127.0.0.37\r\n"
    g.wait_for_log(r"warning: Connection rate limit exceeded: 4 from \[127\.0\.0\.37\]:\d+ for service smtp")


def test_global_cap(make_guard: MakeGuard, backend: PrivatePostfix) -> None:
    g = make_guard(backend.port, "[server]\nmax_connections = 2\n")
    held = [RawClient(g.port, source=f"127.0.0.{i}") for i in (38, 39)]
    for c in held:
        c.reply()
    c = RawClient(g.port, source="127.0.0.40")
    assert c.reply() == "421 4.3.2 All server ports are busy\r\n"


# ---------------------------------------------------------------- HELO, addresses

@pytest.mark.parametrize(("name", "reply"), [
    ("friend", "554 5.7.1 <friend>: Helo command rejected: Access denied"),
    ("localhost", "554 5.7.1 <localhost>: Helo command rejected: You are not me"),
    ("localhost.localdomain", "554 5.7.1 <localhost.localdomain>: Helo command rejected: You are not me"),
    ("guard.test", "554 5.7.1 <guard.test>: Helo command rejected: You are not me"),
    ("mx.guard.test", "554 5.7.1 <mx.guard.test>: Helo command rejected: You are not me"),
    ("[127.0.0.1]", "554 5.7.1 <[127.0.0.1]>: Helo command rejected: You are not me"),
    ("127.0.0.1", "554 5.7.1 <127.0.0.1>: Helo command rejected: You are not me"),
])
def test_helo_access_table_seed_examples(backend: PrivatePostfix, make_guard: MakeGuard, tmp_path: Path,
                                         name: str, reply: str) -> None:
    table = tmp_path / "helo_access"
    table.write_text(
        "# the classic helo_access file\n"
        "friend                  REJECT\n"
        "localhost               REJECT You are not me\n"
        "localhost.localdomain   REJECT You are not me\n"
        "guard.test              REJECT You are not me\n"  # our domain (and its hosts: parent matching)
        "[127.0.0.1]             REJECT You are not me\n"
        "127.0.0.1               REJECT You are not me\n"
    )
    g = make_guard(backend.port, f'[helo]\naccess_table = "texthash:{table}"\n')
    c = RawClient(g.port, source="127.0.0.41")
    c.reply()
    assert c.cmd(f"EHLO {name}").startswith("250-")  # smtpd_delay_reject: answered at RCPT
    assert c.cmd("MAIL FROM:<a@sender.test>").startswith("250")
    assert c.cmd("RCPT TO:<bob@example.test>") == reply + "\r\n"
    g.wait_for_log(rf"NOQUEUE: reject: RCPT from unknown\[127\.0\.0\.41\]:\d+: {re.escape(reply)}; "
                   rf"from=<a@sender\.test> to=<bob@example\.test> proto=ESMTP helo=<{re.escape(name)}>")
    assert nothing_reached_postfix(backend)


def test_helo_rules_bare_ip_and_required(backend: PrivatePostfix, make_guard: MakeGuard) -> None:
    g = make_guard(backend.port, "[helo]\nrequired = true\nreject_non_fqdn = true\n")
    c = RawClient(g.port, source="127.0.0.42")
    c.reply()
    assert c.cmd("MAIL FROM:<a@sender.test>") == "503 5.5.1 Error: send HELO/EHLO first\r\n"
    c.cmd("HELO 192.0.2.1")
    c.cmd("MAIL FROM:<a@sender.test>")
    assert c.cmd("RCPT TO:<bob@example.test>") == (
        "504 5.5.2 <192.0.2.1>: Helo command rejected: need fully-qualified hostname\r\n")
    c.cmd("RSET")
    c.cmd("HELO friend")
    c.cmd("MAIL FROM:<a@sender.test>")
    assert c.cmd("RCPT TO:<bob@example.test>") == (
        "504 5.5.2 <friend>: Helo command rejected: need fully-qualified hostname\r\n")
    c.cmd("HELO good.example")  # a new HELO is judged afresh
    assert c.transaction(helo="NOOP")[-1].startswith("250 2.0.0")


def test_helo_ignore_mode_warns_and_delivers(backend: PrivatePostfix, make_guard: MakeGuard) -> None:
    g = make_guard(backend.port, '[helo]\naction = "ignore"\nreject_non_fqdn = true\n')
    c = RawClient(g.port, source="127.0.0.43")
    c.reply()
    assert c.transaction(helo="EHLO friend")[-1].startswith("250 2.0.0")
    g.wait_for_log(r"NOQUEUE: reject_warning: EHLO from unknown\[127\.0\.0\.43\]:\d+: 504 5\.5\.2 <friend>: "
                   r"Helo command rejected: need fully-qualified hostname; proto=ESMTP helo=<friend>")
    backend.wait_for_messages(1)


def test_sender_and_recipient_syntax(backend: PrivatePostfix, make_guard: MakeGuard) -> None:
    g = make_guard(backend.port, "[addresses]\nstrict_syntax = true\nreject_non_fqdn_sender = true\n"
                                 "reject_non_fqdn_recipient = true\n")
    c = RawClient(g.port, source="127.0.0.44")
    c.reply()
    c.cmd("EHLO client.example")
    assert c.cmd("MAIL FROM:<a..b@sender.test>") == "501 5.1.7 Bad sender address syntax\r\n"
    assert c.cmd("MAIL FROM:<a@sender>").startswith("250")  # answered at RCPT (smtpd_delay_reject)
    assert c.cmd("RCPT TO:<bob@example.test>") == (
        "504 5.5.2 <a@sender>: Sender address rejected: need fully-qualified address\r\n")
    c.cmd("RSET")
    c.cmd("MAIL FROM:<a@sender.test>")
    assert c.cmd("RCPT TO:<bob..x@example.test>") == "501 5.1.3 Bad recipient address syntax\r\n"
    assert c.cmd("RCPT TO:<bob@example>") == (
        "504 5.5.2 <bob@example>: Recipient address rejected: need fully-qualified address\r\n")
    assert c.cmd("RCPT TO:<bob@example.test>").startswith("250")


# ---------------------------------------------------------------- access tables

def test_client_sender_recipient_tables_and_sighup_reload(backend: PrivatePostfix, make_guard: MakeGuard,
                                                          tmp_path: Path) -> None:
    clients = tmp_path / "client_access.cidr"
    clients.write_text(
        "# postscreen_access_list / check_client_access\n"
        "127.0.0.50/32   REJECT\n"
        "127.0.0.51      permit\n"
        "127.0.0.52      521 5.7.1 go away\n"
        "127.0.0.53      DEFER try again later\n"
    )
    senders = tmp_path / "sender_access"
    senders.write_text("/^spam@/ REJECT no spam please\n")
    rcpts = tmp_path / "recipient_access"
    rcpts.write_text("nobody@example.test    550 5.1.1 no such user here\n")
    g = make_guard(backend.port,
                   f'[access]\nclient_table = "cidr:{clients}"\n'
                   f'[addresses]\nsender_access_table = "regexp:{senders}"\n'
                   f'recipient_access_table = "texthash:{rcpts}"\n')

    c = RawClient(g.port, source="127.0.0.50")
    c.reply()
    assert c.transaction()[-1] == "554 5.7.1 <unknown[127.0.0.50]>: Client host rejected: Access denied\r\n"

    c = RawClient(g.port, source="127.0.0.51")
    assert c.reply() == "220 mx.guard.test ESMTP\r\n"  # allowlisted: no pregreet test
    g.wait_for_log(r"ALLOWLISTED \[127\.0\.0\.51\]:\d+")
    assert c.transaction()[-1].startswith("250 2.0.0")

    c = RawClient(g.port, source="127.0.0.52")
    assert c.reply() == "521 5.7.1 <unknown[127.0.0.52]>: Client host rejected: go away\r\n"
    assert c.closed()

    c = RawClient(g.port, source="127.0.0.53")
    c.reply()
    assert c.transaction()[-1] == "450 4.7.1 <unknown[127.0.0.53]>: Client host rejected: try again later\r\n"

    c = RawClient(g.port, source="127.0.0.54")
    c.reply()
    assert c.transaction(sender="spam@sender.test")[-1] == (
        "554 5.7.1 <spam@sender.test>: Sender address rejected: no spam please\r\n")
    c.cmd("RSET")
    assert c.transaction(helo="NOOP", rcpt="nobody@example.test")[-1] == (
        "550 5.1.1 <nobody@example.test>: Recipient address rejected: no such user here\r\n")

    # SIGHUP: the edited table is read again ...
    clients.write_text("127.0.0.55 REJECT changed my mind\n")
    g.mark()
    assert g.proc is not None
    g.proc.send_signal(signal.SIGHUP)
    g.wait_for_log(r"reload: configuration \S+ loaded \(generation 2")
    c = RawClient(g.port, source="127.0.0.55")
    c.reply()
    assert c.transaction()[-1] == "554 5.7.1 <unknown[127.0.0.55]>: Client host rejected: changed my mind\r\n"
    # ... and a broken edit refuses the reload, naming file and line; the old tables stay.
    clients.write_text("127.0.0.56 REJECT\nnot-a-network REJECT\n")
    g.proc.send_signal(signal.SIGHUP)
    g.wait_for_log(rf"error: reload: configuration \S+ refused, the running configuration stays: "
                   rf".*{clients}, line 2: ")
    c = RawClient(g.port, source="127.0.0.56")
    c.reply()
    assert c.transaction()[-1].startswith("250 2.0.0")
    c = RawClient(g.port, source="127.0.0.55")
    c.reply()
    assert c.transaction()[-1].startswith("554 5.7.1")


def test_bad_table_line_stops_startup_naming_file_and_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    table = tmp_path / "helo_access"
    table.write_text("friend REJECT\nlocalhost FROBNICATE\n")
    conf = tmp_path / "smtpguard.toml"
    conf.write_text(f'[helo]\naccess_table = "texthash:{table}"\n')
    out = subprocess.run([sys.executable, "-m", "smtpguard", "check-config", "-c", str(conf)],
                         capture_output=True, text=True)
    assert out.returncode == 1
    assert f"helo.access_table: {table}, line 2: unsupported access action" in out.stderr
