"""Issue 12's session defects, end to end against the private real Postfix:
each test reproduces one defect the first release had.

* a reply is never held back (the error sleep delays it, it does not park it
  until the client's next command);
* the HELO Postfix sees is always the client's: one that cannot be forwarded
  is refused with ``501 5.5.2`` whatever the HELO checks say;
* smtpguard's own MAIL rejections are logged as smtpd's ``NOQUEUE: reject:``;
* ``DISCONNECT`` counts commands as ``ok/total`` like Postfix 3.x;
* a SIGHUP never changes the settings of a session in progress.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Callable

import pytest

from tests.integration.guard import Guard, RawClient
from tests.lab import PrivatePostfix

pytestmark = pytest.mark.postfix

MakeGuard = Callable[..., Guard]


def test_line_too_long_reply_is_not_held_after_soft_limit(make_guard: MakeGuard, backend: PrivatePostfix) -> None:
    g = make_guard(backend.port, '[errors]\nsoft_limit = 1\nhard_limit = 10\nerror_sleep = "0.1s"\n')
    c = RawClient(g.port, source="127.0.0.51", timeout=8)
    c.reply()
    c.cmd("EHLO client.example")
    assert c.cmd("BOGUS").startswith("502")  # error 1: the soft limit is reached
    assert c.cmd("BOGUS").startswith("502")  # error 2: delayed error_sleep, then sent
    c.send(b"NOOP " + b"x" * 3000 + b"\r\n")  # over line_length_limit: the reply must come on its own
    try:
        assert c.reply() == "500 5.5.2 Error: command line too long\r\n"
    except TimeoutError:
        pytest.fail("the 500 reply to an over-long line was held back until the next command")
    assert c.cmd("QUIT").startswith("221")
    c.close()


@pytest.mark.parametrize("helo", ["two words", "tab\there", "nul\x00byte", "caf\u00e9.example"])
def test_unforwardable_helo_is_refused_even_with_helo_checks_off(make_guard: MakeGuard, backend: PrivatePostfix,
                                                                 helo: str) -> None:
    g = make_guard(backend.port, "[helo]\nenabled = false\n")
    c = RawClient(g.port, source="127.0.0.52")
    c.reply()
    reply = c.cmd(f"EHLO {helo}")
    assert reply.startswith("501 5.5.2 <") and reply.endswith(">: Helo command rejected: Invalid name\r\n"), reply
    assert reply.isascii() and "\x00" not in reply and "\t" not in reply  # no raw client bytes echoed
    # The session goes on; a good HELO then reaches Postfix as the client's own.
    assert c.cmd("EHLO good.example").startswith("250")
    c.transaction(helo="EHLO good.example", subject="after a refused HELO")
    c.cmd("QUIT")
    c.close()
    [msg] = backend.wait_for_messages(1)
    assert b"Received: from good.example (unknown [127.0.0.52])" in msg
    g.wait_for_log(r"NOQUEUE: reject: EHLO from unknown\[127\.0\.0\.52\]:\d+: 501 5\.5\.2 <")


def test_helo_over_255_octets_is_refused_up_front(make_guard: MakeGuard, backend: PrivatePostfix) -> None:
    g = make_guard(backend.port, "[helo]\naction = \"ignore\"\n")
    c = RawClient(g.port, source="127.0.0.53")
    c.reply()
    long_name = ".".join(["a" * 60] * 5)  # 304 octets of valid-looking labels
    assert c.cmd(f"HELO {long_name}").startswith("501 5.5.2 ")
    assert c.cmd(f"EHLO {'b' * 63}.example").startswith("250")
    replies = c.transaction(helo="NOOP", subject="after a long HELO")
    assert replies[-1].startswith("250 2.0.0 Ok: queued as"), replies  # no 451 from a refused XCLIENT
    c.close()


def test_helo_checks_ignore_still_forwards_the_clients_helo(make_guard: MakeGuard, backend: PrivatePostfix) -> None:
    """A HELO the checks would reject (a bare IP) goes to Postfix as sent when the checks only warn."""
    g = make_guard(backend.port, "[helo]\naction = \"ignore\"\n")
    c = RawClient(g.port, source="127.0.0.54")
    c.reply()
    replies = c.transaction(helo="EHLO 192.0.2.1", subject="bare ip helo")
    assert replies[-1].startswith("250"), replies
    c.close()
    [msg] = backend.wait_for_messages(1)
    assert b"Received: from 192.0.2.1 (unknown [127.0.0.54])" in msg


def test_own_size_rejection_at_mail_is_logged_like_smtpd(guard: Guard) -> None:
    c = RawClient(guard.port, source="127.0.0.55")
    c.reply()
    c.cmd("EHLO client.example")
    assert c.cmd("MAIL FROM:<a@b.example> SIZE=999999999") == "552 5.3.4 Message size exceeds fixed limit\r\n"
    c.cmd("QUIT")
    c.close()
    guard.wait_for_log(r"NOQUEUE: reject: MAIL from unknown\[127\.0\.0\.55\]:\d+: 552 5\.3\.4 Message size exceeds "
                       r"fixed limit; from=<a@b\.example> proto=ESMTP helo=<client\.example>")


def test_disconnect_counts_ok_slash_total_like_postfix(guard: Guard) -> None:
    c = RawClient(guard.port, source="127.0.0.56")
    c.reply()
    c.cmd("EHLO client.example")
    assert c.cmd("MAIL FROM:<a@sender.test>").startswith("250")
    assert c.cmd("RCPT TO:<nobody@elsewhere.invalid>").startswith("454 4.7.1")  # Postfix: relay access denied
    assert c.cmd("RCPT TO:<other@elsewhere.invalid>").startswith("454 4.7.1")
    assert c.cmd("DATA").startswith("554")
    assert c.cmd("QUIT").startswith("221")
    c.close()
    guard.wait_for_log(r"DISCONNECT \[127\.0\.0\.56\]:\d+ ehlo=1 mail=1 rcpt=0/2 data=0/1 quit=1 commands=3/6\n")


def test_reload_mid_session_keeps_the_sessions_settings(make_guard: MakeGuard, backend: PrivatePostfix) -> None:
    g = make_guard(backend.port)
    assert g.proc is not None
    old = RawClient(g.port, source="127.0.0.57")
    old.reply()
    assert old.cmd("EHLO client.example").startswith("250-mx.guard.test")
    g.mark()
    g.config.write_text(g.config.read_text().replace(
        'hostname = "mx.guard.test"', 'hostname = "mx2.guard.test"\nline_length_limit = 1000'))
    g.proc.send_signal(signal.SIGHUP)
    g.wait_for_log(r"reload: configuration \S+ loaded \(generation 2")
    # The session in progress keeps the settings it started with ...
    assert old.cmd("NOOP " + "x" * 1500) == "250 2.0.0 Ok\r\n"
    assert old.cmd("EHLO client.example").startswith("250-mx.guard.test\r\n")
    # ... the next one gets the new ones.
    new = RawClient(g.port, source="127.0.0.58")
    new.reply()
    assert new.cmd("EHLO client.example").startswith("250-mx2.guard.test\r\n")
    assert new.cmd("NOOP " + "x" * 1500) == "500 5.5.2 Error: command line too long\r\n"
    for c in (old, new):
        c.cmd("QUIT")
        c.close()


def test_no_helo_client_is_relayed_without_a_helo_of_ours(backend: PrivatePostfix, guard: Guard) -> None:
    c = RawClient(guard.port, source="127.0.0.59")
    c.reply()
    replies = c.transaction(helo="NOOP", subject="no helo")
    assert replies[-1].startswith("250 2.0.0 Ok: queued as"), replies
    c.close()
    [msg] = backend.wait_for_messages(1)
    assert b"mx.guard.test" not in msg.split(b"\n\n", 1)[0]  # Postfix never saw our name as the HELO


def test_cr_in_helo_cannot_forge_a_log_line(guard: Guard) -> None:
    forged = "Dec  2 10:00:00 mx postfix/smtpd[1]: NOQUEUE: reject: RCPT from unknown[203.0.113.99]:1: 554 5.7.1 x"
    c = RawClient(guard.port, source="127.0.0.57")
    c.reply()
    c.send(f"EHLO x\r{forged}\r\n".encode())
    assert c.reply().startswith("501 5.5.2 <x?Dec  2 10:00:00 ")  # echoed with the CR made printable
    c.cmd("QUIT")
    c.close()
    guard.wait_for_log(r"NOQUEUE: reject: EHLO from unknown\[127\.0\.0\.57\]:\d+: 501 5\.5\.2 <x\?Dec  2 ")
    raw = guard.log_path.read_bytes()
    assert b"\r" not in raw
    # A reader that splits lines on CR (Python's text mode does) sees no forged line either.
    assert not re.search(r"^Dec  2 10:00:00 mx postfix", guard.full_log(), re.M)


@pytest.mark.parametrize(("param", "reply"), [
    ("SIZE=\u00b2", "501 5.5.4 Bad message size syntax"),     # str.isdigit() says yes, int() says no
    ("SIZE=\u0663", "501 5.5.4 Bad message size syntax"),     # Arabic-Indic three
    ("BODY=8bitm\u0131me", "501 5.5.4 Unsupported BODY parameter value"),  # dotless i upper-cases to I
    ("\u017fIZE=100", "555 5.5.4 Unsupported option: ??IZE=100"),  # long s upper-cases to S; echoed per byte
])
def test_esmtp_parameters_are_ascii_only(guard: Guard, param: str, reply: str) -> None:
    c = RawClient(guard.port, source="127.0.0.58")
    c.reply()
    c.cmd("EHLO client.example")
    assert c.cmd(f"MAIL FROM:<a@b.example> {param}") == reply + "\r\n"
    assert c.cmd("MAIL FROM:<a@b.example>").startswith("250")  # the session goes on
    c.cmd("QUIT")
    c.close()
