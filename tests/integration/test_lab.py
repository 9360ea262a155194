"""Proof that the real-component lab fixtures (tests/lab.py, tests/conftest.py) work.

Nothing here touches smtpguard; these tests pin down the behaviour of the
private Postfix, redis-server and dnsmasq that the end-to-end tests rely on.
"""

from __future__ import annotations

import os
import re
import signal
import smtplib
import socket
import threading
import time
import uuid
from collections.abc import Callable
from email.utils import formatdate

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.resolver
import dns.reversename
import pytest
import redis

from tests.lab import (
    DnsBlackhole,
    DnsServer,
    PostfixFactory,
    PrivatePostfix,
    RedisServer,
    ci_enabled,
    free_port,
    missing_requirements,
)


def _message(token: str, to: str = "rcpt@example.test") -> bytes:
    """A complete RFC 5322 message (Date and Message-ID present, so Postfix's
    cleanup adds no headers of its own besides Received)."""
    return (
        f"From: Sender <sender@client.test>\r\n"
        f"To: <{to}>\r\n"
        f"Subject: lab {token}\r\n"
        f"Date: {formatdate(localtime=False)}\r\n"
        f"Message-ID: <{token}@client.test>\r\n"
        f"MIME-Version: 1.0\r\n"
        f"Content-Type: text/plain; charset=us-ascii\r\n"
        f"\r\n"
        f"body line 1 {token}\r\n"
        f"..a line starting with a dot\r\n"
        f"last line\r\n"
    ).encode()


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
    both = free_port("both")
    with socket.socket() as t, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        t.bind(("127.0.0.1", both))
        u.bind(("127.0.0.1", both))


@pytest.mark.parametrize(
    ("env", "expected"),
    [({}, False), ({"CI": ""}, False), ({"CI": "false"}, False), ({"CI": "0"}, False),
     ({"CI": "true"}, True), ({"CI": "1"}, True), ({"CI": "yes"}, True)],
)  # fmt: skip
def test_ci_detection(env: dict[str, str], expected: bool) -> None:
    assert ci_enabled(env) is expected


def test_missing_binary_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tests.lab.which", lambda name: None)
    reason = missing_requirements("dns")
    assert reason is not None and "dnsmasq" in reason


# --------------------------------------------------------------------------
# Postfix
# --------------------------------------------------------------------------


def test_backend_delivers_exact_bytes(backend: PrivatePostfix) -> None:
    token = uuid.uuid4().hex
    msg = _message(token)
    with smtplib.SMTP(backend.host, backend.port, timeout=10) as smtp:
        code, banner = smtp.ehlo("client.test")
        assert code == 250
        refused = smtp.sendmail("sender@client.test", ["rcpt@example.test"], msg)
    assert refused == {}

    [delivered] = backend.wait_for_messages(1)
    # virtual(8) stores LF line endings and prepends its own trace headers;
    # everything we sent follows them byte for byte (dot-unstuffed).
    assert delivered.endswith(msg.replace(b"\r\n", b"\n"))
    head = delivered[: len(delivered) - len(msg.replace(b"\r\n", b"\n"))]
    assert head.startswith(b"Return-Path: <sender@client.test>\n")
    assert b"Delivered-To: rcpt@example.test\n" in head
    assert b"by backend.test (Postfix)" in head
    assert backend.maildir.is_dir() and len(list(backend.maildir.iterdir())) == 1
    backend.wait_for_log(r"to=<rcpt@example\.test>, relay=virtual, .*status=sent")


def test_backend_starts_each_test_empty(backend: PrivatePostfix) -> None:
    """The previous test's message and log lines are gone (flush + mark)."""
    assert backend.messages() == []
    assert "relay=virtual" not in backend.log()
    # and the same mechanics within one test
    backend.submit(_message("flushed"))
    backend.wait_for_messages(1)
    backend.flush_maildir()
    backend.mark()
    assert backend.messages() == []
    assert backend.log() == ""
    assert "flushed@client.test" in backend.full_log()


def test_xclient_changes_logged_client(backend: PrivatePostfix) -> None:
    token = uuid.uuid4().hex
    with smtplib.SMTP(backend.host, backend.port, timeout=10) as smtp:
        smtp.ehlo("proxy.test")
        assert smtp.has_extn("xclient"), smtp.esmtp_features
        code, reply = smtp.docmd("XCLIENT", "ADDR=192.0.2.55 NAME=mail.client.example HELO=orig.client.example")
        assert code == 220, reply  # XCLIENT resets the session: new greeting, EHLO again
        smtp.ehlo_resp = smtp.helo_resp = None
        smtp.esmtp_features = {}
        smtp.ehlo("orig.client.example")
        smtp.sendmail("sender@client.test", ["rcpt@example.test"], _message(token))

    match = backend.wait_for_log(r"(\w+): client=(\S+)")
    assert match.group(2) == "mail.client.example[192.0.2.55]"
    [delivered] = backend.wait_for_messages(1)
    assert b"from orig.client.example (mail.client.example [192.0.2.55])" in delivered
    # the connection itself was logged with the real (loopback) peer
    assert "connect from localhost[127.0.0.1]" in backend.log()


def test_xclient_addr_without_name_keeps_old_name(backend: PrivatePostfix) -> None:
    """Gotcha for the proxy: XCLIENT ADDR= alone does *not* reset or look up
    the name -- Postfix keeps the name of the real peer ("localhost").  Send
    NAME=[UNAVAILABLE] (logged as "unknown") or the verified name explicitly.
    No DNS lookup happens either way."""
    for xclient, logged in (("ADDR=198.51.100.7", "localhost[198.51.100.7]"),
                            ("ADDR=198.51.100.8 NAME=[UNAVAILABLE]", "unknown[198.51.100.8]")):  # fmt: skip
        with smtplib.SMTP(backend.host, backend.port, timeout=10) as smtp:
            smtp.ehlo("proxy.test")
            t0 = time.monotonic()
            code, _ = smtp.docmd("XCLIENT", xclient)
            assert code == 220
            assert time.monotonic() - t0 < 1.0
            smtp.ehlo_resp = None
            smtp.ehlo("x.test")
            smtp.sendmail("sender@client.test", ["rcpt@example.test"], _message(uuid.uuid4().hex))
        backend.wait_for_log(r"client=" + re.escape(logged))


def test_backend_rejects_bare_lf(backend: PrivatePostfix) -> None:
    """smtpd_forbid_bare_newline=reject is active (smuggling tests rely on it)."""
    with socket.create_connection((backend.host, backend.port), timeout=10) as s:
        f = s.makefile("rb")

        def reply() -> bytes:
            line = f.readline()
            while line[3:4] == b"-":
                line = f.readline()
            return line

        assert reply().startswith(b"220")
        for cmd, expect in ((b"EHLO t.test", b"250"), (b"MAIL FROM:<a@client.test>", b"250"),
                            (b"RCPT TO:<rcpt@example.test>", b"250"), (b"DATA", b"354")):  # fmt: skip
            s.sendall(cmd + b"\r\n")
            line = reply()
            assert line.startswith(expect), line
        s.sendall(b"Subject: x\r\n\r\nbare\nnewline\r\n.\r\n")
        final = reply()
    assert final[:1] == b"5", final
    backend.wait_for_log(r"bare <LF> received")
    assert backend.messages() == []


def test_off_box_recipients_are_refused(backend: PrivatePostfix) -> None:
    """Without a relayhost nothing is ever delivered off-box: the ``error``
    default transport makes smtpd reject such recipients already at RCPT."""
    with smtplib.SMTP(backend.host, backend.port, timeout=10) as smtp:
        smtp.ehlo("client.test")
        code, reply = smtp.mail("sender@client.test")
        assert code == 250
        code, reply = smtp.rcpt("someone@example.org")
    assert code == 550 and b"does not deliver off-box" in reply, (code, reply)


def test_postconf_reload_and_reset(backend: PrivatePostfix) -> None:
    backend.postconf(smtpd_banner="$myhostname ESMTP lab-marker")
    with socket.create_connection((backend.host, backend.port), timeout=5) as s:
        assert b"lab-marker" in s.makefile("rb").readline()
    assert backend.postconf_get("smtpd_banner") == "$myhostname ESMTP lab-marker"

    assert backend.reset_config() is True
    with socket.create_connection((backend.host, backend.port), timeout=5) as s:
        assert b"lab-marker" not in s.makefile("rb").readline()


def test_a_throttled_delivery_agent_does_not_stall_the_next_test(backend: PrivatePostfix) -> None:
    """A virtual(8) killed on its first job: master throttles the service
    (service_throttle_time, 1s in the lab, 60s by default); the next
    message is still delivered well within wait_for_messages' limit."""
    killed: list[int] = []

    def kill_virtual() -> None:
        deadline = time.monotonic() + 10
        while not killed and time.monotonic() < deadline:
            for pid in backend.pids("virtual"):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.0005)

    killer = threading.Thread(target=kill_virtual)
    killer.start()
    backend.submit("Subject: victim\r\n\r\nx\r\n")
    killer.join()
    if not killed:
        pytest.skip("virtual delivered before it could be killed")
    backend.wait_for_log(r"virtual: bad command startup -- throttling")
    backend.flush_queue()
    backend.flush_maildir()
    backend.submit("Subject: next test\r\n\r\nx\r\n")
    [msg] = backend.wait_for_messages(1, timeout=10)
    assert b"Subject: next test" in msg


def test_stop_and_start(backend: PrivatePostfix) -> None:
    backend.stop()
    assert not backend.is_running()
    with pytest.raises(OSError), socket.create_connection((backend.host, backend.port), timeout=2):
        pass
    backend.start()
    backend.start()  # idempotent
    backend.submit(_message("after-restart"))
    [msg] = backend.wait_for_messages(1)
    assert b"after-restart" in msg


def test_fixture_restarts_stopped_backend(backend: PrivatePostfix) -> None:
    """Leaves the instance stopped; the next test's `backend` must restart it."""
    backend.stop()


def test_backend_running_again(backend: PrivatePostfix) -> None:
    assert backend.is_running()
    backend.submit(_message("again"))
    assert len(backend.wait_for_messages(1)) == 1


def test_two_instances_sender_relays_to_backend(backend: PrivatePostfix, postfix_factory: PostfixFactory) -> None:
    """A second private Postfix in the "sending MTA" role runs next to the
    session backend and relays to it over loopback."""
    sender = postfix_factory.sender(relay_port=backend.port)
    sender.start()
    assert sender.port != backend.port and sender.dir != backend.dir
    assert backend.is_running() and sender.is_running()

    token = uuid.uuid4().hex
    sender.submit(_message(token), mail_from="someone@sender.test")
    [delivered] = backend.wait_for_messages(1)
    assert token.encode() in delivered
    assert b"by sender.test (Postfix)" in delivered and b"by backend.test (Postfix)" in delivered
    sender.wait_for_log(rf"postfix-sender/smtp\[\d+\]: \w+: to=<rcpt@example\.test>, "
                        rf"relay=127\.0\.0\.1\[127\.0\.0\.1\]:{backend.port}, .*status=sent")  # fmt: skip
    # each instance logs only to its own file, under its own syslog_name
    assert "postfix-backend/" not in sender.full_log()
    assert "postfix-sender/" not in backend.full_log()


def test_sender_retries_quickly(postfix_factory: PostfixFactory) -> None:
    """With the fast backoff settings a deferred message is retried within seconds."""
    late = postfix_factory(name="late", domain="late.test")  # configured, not started yet
    sender = postfix_factory.sender(relay_port=late.port)
    sender.start()
    sender.submit(_message("retry", "rcpt@late.test"), rcpt_to="rcpt@late.test")
    sender.wait_for_log(r"to=<rcpt@late\.test>, .*status=deferred \(connect to .*Connection refused\)")
    t0 = time.monotonic()
    late.start()
    try:
        [msg] = late.wait_for_messages(1, timeout=20)
    except AssertionError as e:
        raise AssertionError(f"{e}\n--- sender log ---\n{sender.full_log()}") from None
    assert b"retry" in msg
    assert time.monotonic() - t0 < 10


# --------------------------------------------------------------------------
# redis
# --------------------------------------------------------------------------


def test_redis_ping_tcp_and_unix(redis_server: RedisServer, redis_url: str) -> None:
    assert redis_url == f"redis://127.0.0.1:{redis_server.port}/0"
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.ping() is True
        client.set("lab:key", "1")
    finally:
        client.close()
    unix = redis.Redis(unix_socket_path=str(redis_server.socket))
    try:
        assert unix.ping() is True
        assert unix.get("lab:key") == b"1"
    finally:
        unix.close()
    assert redis_server.ping()


def test_redis_url_starts_empty(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.dbsize() == 0
    finally:
        client.close()


# --------------------------------------------------------------------------
# DNS
# --------------------------------------------------------------------------

RECORDS = [
    "--host-record=mx.example.test,192.0.2.10",
    "--txt-record=example.test,v=spf1 ip4:192.0.2.0/24 -all",
    "--ptr-record=5.113.0.203.in-addr.arpa,mail.client.example",
    "--mx-host=example.test,mx.example.test,10",
    "--address=/2.0.0.127.zen.test/127.0.0.2",
]


def test_dnsmasq_answers_fixture_records(dns_server: Callable[..., DnsServer]) -> None:
    server = dns_server(RECORDS)
    r = server.resolver()

    assert [a.to_text() for a in r.resolve("mx.example.test", "A")] == ["192.0.2.10"]
    assert [b"".join(t.strings) for t in r.resolve("example.test", "TXT")] == [b"v=spf1 ip4:192.0.2.0/24 -all"]
    ptr = r.resolve(dns.reversename.from_address("203.0.113.5"), "PTR")
    assert [p.target.to_text() for p in ptr] == ["mail.client.example."]
    mx = r.resolve("example.test", "MX")
    assert [(m.preference, m.exchange.to_text()) for m in mx] == [(10, "mx.example.test.")]
    # host-record also creates the reverse entry
    assert [p.target.to_text() for p in r.resolve(dns.reversename.from_address("192.0.2.10"), "PTR")] == [
        "mx.example.test."
    ]
    # DNSBL-style: listed -> 127.0.0.2, not listed -> NXDOMAIN (thanks to --local=/#/)
    assert [a.to_text() for a in r.resolve("2.0.0.127.zen.test", "A")] == ["127.0.0.2"]
    with pytest.raises(dns.resolver.NXDOMAIN):
        r.resolve("1.2.3.4.zen.test", "A")
    with pytest.raises(dns.resolver.NXDOMAIN):
        r.resolve("unknown.invalid", "A")
    # it really is our dnsmasq answering
    assert "query[TXT] example.test" in server.log()


def test_dnsmasq_over_tcp(dns_server: Callable[..., DnsServer]) -> None:
    server = dns_server(RECORDS)
    reply = dns.query.tcp(dns.message.make_query("mx.example.test", "A"), server.address, port=server.port, timeout=3)
    assert reply.answer[0][0].to_text() == "192.0.2.10"


def test_dnsmasq_without_local_refuses_unknown(dns_server: Callable[..., DnsServer]) -> None:
    """Documents dnsmasq's default: with no upstream, unknown names are REFUSED."""
    server = dns_server(RECORDS, nxdomain_by_default=False)
    reply = dns.query.udp(dns.message.make_query("unknown.invalid", "A"), server.address, port=server.port, timeout=3)
    assert reply.rcode() == dns.rcode.REFUSED


def test_timeout_zone_times_out(dns_server: Callable[..., DnsServer]) -> None:
    server = dns_server(RECORDS, timeout_zones=["timeout.test"])
    r = server.resolver(timeout=0.5, lifetime=1.0)
    t0 = time.monotonic()
    with pytest.raises(dns.resolver.LifetimeTimeout):
        r.resolve("1.2.3.4.timeout.test", "A")
    assert time.monotonic() - t0 >= 0.9  # a real timeout, not a quick SERVFAIL
    assert [a.to_text() for a in r.resolve("mx.example.test", "A")] == ["192.0.2.10"]  # others unaffected
    assert "forwarded 1.2.3.4.timeout.test" in server.log()


def test_forwarding_to_unbound_port_also_times_out(dns_server: Callable[..., DnsServer]) -> None:
    """dnsmasq 2.90 ignores ICMP port-unreachable from a dead upstream and
    never sends SERVFAIL: the client simply times out."""
    dead = free_port("udp")
    server = dns_server([f"--server=/dead.test/127.0.0.1#{dead}"])
    q = dns.message.make_query("x.dead.test", "A")
    with pytest.raises(dns.exception.Timeout):
        dns.query.udp(q, server.address, port=server.port, timeout=1.0)


def test_dns_blackhole_never_answers(dns_blackhole: DnsBlackhole) -> None:
    q = dns.message.make_query("anything.test", "A")
    with pytest.raises(dns.exception.Timeout):
        dns.query.udp(q, dns_blackhole.address, port=dns_blackhole.port, timeout=0.5)
    with pytest.raises(dns.exception.Timeout):
        dns.query.tcp(q, dns_blackhole.address, port=dns_blackhole.port, timeout=0.5)
    assert dns_blackhole.server_arg("x.test") == f"--server=/x.test/127.0.0.1#{dns_blackhole.port}"


def test_dnsmasq_bad_option_fails_fast(dns_server: Callable[..., DnsServer]) -> None:
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="dnsmasq exited"):
        dns_server(["--no-such-option"])
    assert time.monotonic() - t0 < 5
