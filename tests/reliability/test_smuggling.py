"""SMTP smuggling (design.md's end-of-data variants) through both paths:
relayed by smtpguard, and handed off to Postfix's smtpd pass service.

A client is handed off only when the pass service refuses or normalizes
bare newlines (``[handoff] require_forbid_bare_newline``, default on);
against a pass service that accepts them, smtpguard relays the client and
nothing is smuggled either way."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator

import pytest

from tests.integration.guard import Guard, RawClient
from tests.lab import PrivatePostfix, wait_until
from tests.reliability.figures import record

MakeGuard = Callable[..., Guard]

#: design.md's end-of-data variants, and the two a bare CR or LF alone make
VECTORS = [b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\r", b"\r.\n", b"\r\n\x00.\r\n", b"\r\n.\r\r\n",
           b"\r\n.\n", b"\n.\r"]
POSTFIX_BANNER = "220 backend.test ESMTP Postfix\r\n"


def smuggle(port: int, source: str, vector: bytes) -> tuple[str, str]:
    """One message carrying *vector* then a second, forged transaction;
    the banner and the reply to the end of data."""
    c = RawClient(port, source=source)
    banner = c.reply()
    c.cmd("EHLO client.example")
    c.cmd("MAIL FROM:<a@sender.test>")
    c.cmd("RCPT TO:<victim@example.test>")
    assert c.cmd("DATA").startswith("354")
    c.send(b"Subject: carrier\r\n\r\nfirst" + vector
           + b"MAIL FROM:<admin@sender.test>\r\nRCPT TO:<smuggled@example.test>\r\nDATA\r\n"
           + b"Subject: smuggled\r\n\r\nevil\r\n.\r\n")
    try:
        reply = c.reply()
        c.cmd("QUIT")
    except ConnectionError:
        reply = "closed"
    c.close()
    return banner, reply


def smuggled(backend: PrivatePostfix) -> int:
    """Messages delivered that Postfix read as a transaction of their own."""
    return sum(1 for m in backend.messages() if b"Subject: smuggled" in m.split(b"\n\n", 1)[0]) \
        + backend.log().count("to=<smuggled@example.test>")


@pytest.fixture
def pass_service(backend: PrivatePostfix) -> Iterator[Callable[[str], None]]:
    """Set the pass service's smtpd_forbid_bare_newline (master.cf -o)."""
    def setting(value: str) -> None:
        backend._run(backend._postconf_cmd("-P", f"smtpguard/pass/smtpd_forbid_bare_newline={value}"))
        backend._backdate_config()
        backend.reload()
    yield setting
    backend.reset_config()


def handoff(backend: PrivatePostfix) -> str:
    return f'[handoff]\nsocket = "{backend.pass_socket}"\npostfix_config_directory = "{backend.conf_dir}"\n'


def first_pass(g: Guard, source: str) -> None:
    """A relayed session that passes the tests: the next ones are PASS OLD."""
    c = RawClient(g.port, source=source)
    c.reply()
    assert c.transaction(subject="first")[-1].startswith("250 ")
    c.cmd("QUIT")
    g.wait_for_log(rf"PASS NEW \[{source}\]")


def test_vulnerable_pass_service_gets_no_client(backend: PrivatePostfix, pass_service: Callable[[str], None],
                                                make_guard: MakeGuard) -> None:
    pass_service("no")  # Postfix 3.7's default: bare newlines accepted
    g = make_guard(backend.port, handoff(backend))
    g.wait_for_log(r"warning: handoff: .*smtpd_forbid_bare_newline = no.*"
                   r"-o smtpd_forbid_bare_newline=normalize")
    first_pass(g, "127.0.0.91")
    backend.mark()
    for vector in VECTORS:
        banner, reply = smuggle(g.port, "127.0.0.91", vector)
        assert banner != POSTFIX_BANNER  # relayed by smtpguard, not handed off
        assert reply.startswith("550 5.5.2"), (vector, reply)
    assert smuggled(backend) == 0
    record("smuggling: pass service allows bare newlines", vectors=len(VECTORS), handed_off=0, smuggled=0)
    assert "PASS OLD [127.0.0.91]" in g.log()
    # Fixed in Postfix, then a reload: asked again, clients are handed off.
    pass_service("normalize")
    assert g.proc is not None
    g.proc.send_signal(signal.SIGHUP)
    g.wait_for_log(r"handoff: the pass service smtpguard refuses or normalizes bare newlines "
                   r"\(smtpd_forbid_bare_newline = normalize, from master.cf smtpguard/pass\)")
    g.wait_for_log(r"reload: configuration .* loaded")
    banner, _ = smuggle(g.port, "127.0.0.91", b"\n.\n")
    assert banner == POSTFIX_BANNER


@pytest.mark.parametrize("setting", ["normalize", "reject"])
def test_safe_pass_service_gets_the_client_and_nothing_is_smuggled(
        backend: PrivatePostfix, pass_service: Callable[[str], None], make_guard: MakeGuard, setting: str) -> None:
    pass_service(setting)
    g = make_guard(backend.port, handoff(backend))
    first_pass(g, "127.0.0.92")
    backend.mark()
    delivered = 0
    for vector in VECTORS:
        banner, reply = smuggle(g.port, "127.0.0.92", vector)
        assert banner == POSTFIX_BANNER, vector  # handed off: Postfix's own smtpd
        if reply.startswith("250"):
            delivered += 1
    if delivered:
        wait_until(lambda: len(backend.messages()) >= delivered + 1, 20, f"{delivered} carrier messages")
    assert smuggled(backend) == 0
    record(f"smuggling: pass service {setting}", vectors=len(VECTORS), handed_off=len(VECTORS), smuggled=0)
    assert "warning: handoff" not in g.full_log()
