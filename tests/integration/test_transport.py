"""End to end, client-side transport: STARTTLS, PROXY protocol, IPv6.

Clients -> (haproxy) -> smtpguard (subprocess) -> the private real Postfix.
Certificates come from a throw-away CA made by ``trustme`` per test.
"""

from __future__ import annotations

import re
import signal
import smtplib
import socket
import ssl
import struct
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from tests.integration.guard import Guard, RawClient
from tests.integration.ops import scrape, value
from tests.lab import HAProxy, PostfixFactory, PrivatePostfix, wait_until, which

pytestmark = pytest.mark.postfix

TLS_LINE = (r"Anonymous TLS connection established from unknown\[{ip}\]:\d+: "
            r"TLSv1\.[23] with cipher \S+ \(\d+/\d+ bits\)")


@dataclass
class Certs:
    ca: trustme.CA
    cert: Path
    key: Path

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        return ctx

    def ca_file(self) -> Path:
        path = self.cert.parent / "ca.pem"
        self.ca.cert_pem.write_to_path(str(path))
        return path


def issue(directory: Path) -> Certs:
    """A new CA and a certificate for mx.guard.test / 127.0.0.1 / ::1."""
    ca = trustme.CA()
    leaf = ca.issue_cert("mx.guard.test", "127.0.0.1", "::1")
    directory.mkdir(exist_ok=True)
    cert, key = directory / "cert.pem", directory / "key.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    return Certs(ca, cert, key)


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return issue(tmp_path / "tls")


def tls_section(certs: Certs, level: str = "may") -> str:
    return f'[tls]\nsecurity_level = "{level}"\ncert_file = "{certs.cert}"\nkey_file = "{certs.key}"\n'


@pytest.fixture
def tls_guard(backend: PrivatePostfix, make_guard: Callable[..., Guard], certs: Certs) -> Guard:
    return make_guard(backend.port, tls_section(certs))


# ---------------------------------------------------------------- STARTTLS


def test_starttls_smtplib_delivers_with_real_client(backend: PrivatePostfix, tls_guard: Guard, certs: Certs) -> None:
    with smtplib.SMTP("127.0.0.1", tls_guard.port, source_address=("127.0.0.9", 0)) as c:
        c.ehlo("tls.example")
        assert c.has_extn("starttls")
        assert c.starttls(context=certs.client_context())[0] == 220
        c.ehlo("tls.example")
        assert not c.has_extn("starttls")  # already active
        c.sendmail("alice@sender.test", ["bob@example.test"], b"Subject: tls\r\n\r\nover TLS\r\n")
    [msg] = backend.wait_for_messages(1)
    assert b"Received: from tls.example (unknown [127.0.0.9])" in msg
    backend.wait_for_log(r"client=unknown\[127\.0\.0\.9\]")
    tls_guard.wait_for_log(TLS_LINE.format(ip=r"127\.0\.0\.9"))
    tls_guard.wait_for_log(r"relayed from unknown\[127\.0\.0\.9\]:\d+: 250 ")
    tls_guard.wait_for_log(r"DISCONNECT \[127\.0\.0\.9\]:\d+ ehlo=2 starttls=1 mail=1 rcpt=1 data=1 quit=1")


def test_large_message_over_tls_arrives_intact(backend: PrivatePostfix, tls_guard: Guard, certs: Certs) -> None:
    line = b"".join(bytes([65 + i % 26]) * 70 + b"\r\n" for i in range(64))
    body = line * 1200  # ~5.5 MB: many TLS records through the one-record read buffer
    with smtplib.SMTP("127.0.0.1", tls_guard.port) as c:
        c.starttls(context=certs.client_context())
        c.sendmail("a@sender.test", ["bob@example.test"], b"Subject: big\r\n\r\n" + body)
    [msg] = backend.wait_for_messages(1)
    assert msg.split(b"\n\n", 1)[1] == body.replace(b"\r\n", b"\n")


def test_starttls_with_openssl_s_client(backend: PrivatePostfix, tls_guard: Guard, certs: Certs) -> None:
    if which("openssl") is None:
        pytest.skip("openssl CLI not installed")
    proc = subprocess.Popen(
        ["openssl", "s_client", "-starttls", "smtp", "-connect", f"127.0.0.1:{tls_guard.port}",
         "-CAfile", str(certs.ca_file()), "-verify_return_error", "-quiet", "-crlf", "-ign_eof"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None

    def cmd(line: bytes) -> bytes:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(line + b"\n")
        proc.stdin.flush()
        while True:
            reply = proc.stdout.readline()
            if not reply or reply[3:4] != b"-":
                return reply

    try:
        assert cmd(b"EHLO openssl.example").startswith(b"250 ")
        assert cmd(b"MAIL FROM:<s_client@sender.test>").startswith(b"250 ")
        assert cmd(b"RCPT TO:<bob@example.test>").startswith(b"250 ")
        assert cmd(b"DATA").startswith(b"354 ")
        assert cmd(b"Subject: s_client\n\nhello\n.").startswith(b"250 2.0.0 Ok: queued as ")
        assert cmd(b"QUIT").startswith(b"221 ")
    finally:
        proc.stdin.close()
        proc.wait(10)
    [msg] = backend.wait_for_messages(1)
    assert b"Subject: s_client" in msg and b"(unknown [127.0.0.1])" in msg
    tls_guard.wait_for_log(TLS_LINE.format(ip=r"127\.0\.0\.1"))


def tls_wrap(c: RawClient, certs: Certs) -> None:
    c.sock = certs.client_context().wrap_socket(c.sock, server_hostname="mx.guard.test")


def test_command_pipelined_behind_starttls_is_discarded(tls_guard: Guard, certs: Certs) -> None:
    c = RawClient(tls_guard.port, source="127.0.0.10")
    c.reply()
    assert "250-STARTTLS" in c.cmd("EHLO client.example")
    # Injected plaintext behind STARTTLS (CVE-2011-0411): must never run.
    c.send(b"STARTTLS\r\nMAIL FROM:<injected@sender.test>\r\n")
    assert c.reply() == "220 2.0.0 Ready to start TLS\r\n"
    assert c.buf == b""
    tls_wrap(c, certs)
    # The session restarted: no EHLO state, no transaction.
    assert c.cmd("RCPT TO:<bob@example.test>") == "503 5.5.1 Error: need MAIL command\r\n"
    ehlo = c.cmd("EHLO client.example")
    assert "STARTTLS" not in ehlo and "250 SMTPUTF8" in ehlo
    assert c.cmd("STARTTLS") == "554 5.5.1 Error: TLS already active\r\n"
    c.cmd("QUIT")
    tls_guard.wait_for_log(r"COMMAND PIPELINING from \[127\.0\.0\.10\]:\d+ after STARTTLS: MAIL FROM:<injected@")
    assert "injected@" not in tls_guard.log().split("COMMAND PIPELINING", 1)[1].split("\n", 1)[1]


def test_encrypt_level_requires_starttls(backend: PrivatePostfix, make_guard: Callable[..., Guard],
                                         certs: Certs) -> None:
    g = make_guard(backend.port, tls_section(certs, "encrypt"))
    c = RawClient(g.port)
    c.reply()
    c.cmd("EHLO client.example")
    assert c.cmd("MAIL FROM:<a@sender.test>") == "530 5.7.0 Must issue a STARTTLS command first\r\n"
    assert c.cmd("STARTTLS") == "220 2.0.0 Ready to start TLS\r\n"
    tls_wrap(c, certs)
    c.cmd("EHLO client.example")
    assert c.cmd("MAIL FROM:<a@sender.test>").startswith("250 ")
    assert c.cmd("RCPT TO:<bob@example.test>").startswith("250 ")
    assert c.cmd("DATA").startswith("354 ")
    c.send(b"Subject: encrypted\r\n\r\nx\r\n.\r\n")
    assert c.reply().startswith("250 2.0.0 Ok: queued as ")
    c.cmd("QUIT")
    assert len(backend.wait_for_messages(1)) == 1


def test_starttls_replies(tls_guard: Guard, guard: Guard) -> None:
    c = RawClient(tls_guard.port)
    c.reply()
    c.cmd("EHLO client.example")
    assert c.cmd("STARTTLS now") == "501 5.5.4 Syntax: STARTTLS\r\n"
    assert c.cmd("MAIL FROM:<a@sender.test>").startswith("250 ")
    assert c.cmd("STARTTLS") == "503 5.5.1 Error: MAIL transaction in progress\r\n"
    c.cmd("RSET")
    assert c.cmd("STARTTLS") == "220 2.0.0 Ready to start TLS\r\n"
    plain = RawClient(guard.port)  # no certificate: not offered, not done
    plain.reply()
    assert "STARTTLS" not in plain.cmd("EHLO client.example")
    assert plain.cmd("STARTTLS") == "502 5.5.1 Error: command not implemented\r\n"


def test_failed_handshake_is_logged_and_closed(tls_guard: Guard) -> None:
    c = RawClient(tls_guard.port, source="127.0.0.11")
    c.reply()
    c.cmd("EHLO client.example")
    assert c.cmd("STARTTLS").startswith("220 ")
    c.send(b"this is not a TLS client hello\r\n" * 4)
    assert c.closed()
    tls_guard.wait_for_log(r"SSL_accept error from unknown\[127\.0\.0\.11\]:\d+: ")


def test_stalled_handshake_times_out_and_is_not_left_counted(
        backend: PrivatePostfix, make_guard: Callable[..., Guard], certs: Certs) -> None:
    """asyncio's TLS layer does not report a connection closed in mid-handshake
    to the protocol: the session used to stay in the live sessions and the
    per-client count for good (one more each time, until max_connections)."""
    g = make_guard(backend.port, '[server]\ncommand_timeout = "1s"\n' + tls_section(certs))
    c = RawClient(g.port, source="127.0.0.12")
    c.reply()
    c.cmd("EHLO client.example")
    assert c.cmd("STARTTLS").startswith("220 ")
    assert c.closed()  # no ClientHello: the command timeout ends it
    g.wait_for_log(r"DISCONNECT \[127\.0\.0\.12\]")
    wait_until(lambda: value(scrape(g.metrics_port), "smtpguard_sessions_active") == 0,
               timeout=5, what="the session to be forgotten")


def test_sighup_reloads_the_certificate(tmp_path: Path, tls_guard: Guard, certs: Certs) -> None:
    renewed = issue(tmp_path / "renewed")
    certs.cert.write_bytes(renewed.cert.read_bytes())
    certs.key.write_bytes(renewed.key.read_bytes())
    assert tls_guard.proc is not None
    tls_guard.proc.send_signal(signal.SIGHUP)
    tls_guard.wait_for_log(r"reload: configuration \S+ loaded")
    with smtplib.SMTP("127.0.0.1", tls_guard.port) as c:
        c.ehlo("client.example")
        c.starttls(context=renewed.client_context())  # trusts only the new CA
        assert c.ehlo("client.example")[0] == 250
    # A broken file on reload keeps the certificate in use.
    certs.key.write_text("garbage\n")
    tls_guard.proc.send_signal(signal.SIGHUP)
    tls_guard.wait_for_log(r"error: reload: configuration \S+ refused, the running configuration stays: tls\.")
    with smtplib.SMTP("127.0.0.1", tls_guard.port) as c:
        c.ehlo("client.example")
        c.starttls(context=renewed.client_context())


# ---------------------------------------------------------------- PROXY protocol

PROXY = '[server]\nproxy_protocol = true\nproxy_timeout = "{timeout}"\n'


def proxy_v2(src: str, dst: str, sport: int, dport: int) -> bytes:
    family, packed = (0x21, socket.AF_INET6) if ":" in src else (0x11, socket.AF_INET)
    addrs = socket.inet_pton(packed, src) + socket.inet_pton(packed, dst) + struct.pack("!HH", sport, dport)
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, family]) + struct.pack("!H", len(addrs)) + addrs


def deliver_raw(c: RawClient, subject: str) -> None:
    assert c.reply().startswith("220")
    replies = c.transaction(helo="EHLO proxied.example", subject=subject)
    assert [r[:4] for r in replies[1:4]] == ["250 ", "250 ", "354 "], replies
    assert replies[4].startswith("250 2.0.0 Ok: queued as "), replies
    c.cmd("QUIT")


@pytest.fixture
def proxy_guard(backend: PrivatePostfix, make_guard: Callable[..., Guard]) -> Guard:
    return make_guard(backend.port, PROXY.format(timeout="10s"))


@pytest.mark.parametrize("header", [b"PROXY TCP4 192.0.2.44 127.0.0.1 40044 25\r\n",
                                    proxy_v2("192.0.2.44", "127.0.0.1", 40044, 25)], ids=["v1", "v2"])
def test_proxy_header_gives_the_client_address(backend: PrivatePostfix, proxy_guard: Guard, header: bytes) -> None:
    c = RawClient(proxy_guard.port)
    c.send(header)
    deliver_raw(c, "proxied")
    [msg] = backend.wait_for_messages(1)
    assert b"Received: from proxied.example (unknown [192.0.2.44])" in msg
    backend.wait_for_log(r"client=unknown\[192\.0\.2\.44\]")
    proxy_guard.wait_for_log(r"CONNECT from \[192\.0\.2\.44\]:40044 to \[127\.0\.0\.1\]:25")
    proxy_guard.wait_for_log(r"relayed from unknown\[192\.0\.2\.44\]:40044: 250 ")


def test_starttls_behind_a_proxy_header(backend: PrivatePostfix, make_guard: Callable[..., Guard],
                                        certs: Certs) -> None:
    g = make_guard(backend.port, PROXY.format(timeout="10s") + tls_section(certs))
    c = RawClient(g.port)
    c.send(b"PROXY TCP6 2001:db8::46 2001:db8::25 40047 25\r\n")
    c.reply()
    c.cmd("EHLO proxied.example")
    assert c.cmd("STARTTLS").startswith("220 ")
    tls_wrap(c, certs)
    assert c.cmd("EHLO proxied.example").startswith("250-")
    c.cmd("QUIT")
    g.wait_for_log(TLS_LINE.format(ip="2001:db8::46"))


def test_pregreet_behind_a_proxy_header(backend: PrivatePostfix, make_guard: Callable[..., Guard]) -> None:
    """The header is not the client talking first; a bot after it is, and
    is judged under the header's address."""
    g = make_guard(backend.port, PROXY.format(timeout="10s") + '[pregreet]\ngreet_wait = "5s"\naction = "drop"\n')
    bot = RawClient(g.port)
    bot.send(b"PROXY TCP4 192.0.2.49 127.0.0.1 40049 25\r\n")
    assert bot.line() == "220-mx.guard.test ESMTP\r\n"  # not "220 " at once: the wait did not end at the header
    bot.send(b"HELO bot\r\n")
    assert bot.reply() == "521 5.7.1 Protocol error\r\n"  # at once, not after the 5s wait
    g.wait_for_log(r"PREGREET 10 after .* from \[192\.0\.2\.49\]:40049: HELO bot\\r\\n")


def test_connection_limit_counts_the_header_address(backend: PrivatePostfix,
                                                    make_guard: Callable[..., Guard]) -> None:
    """All connections come from the load balancer (127.0.0.1); the limit
    applies per header address, an IPv6 one by its /64, a mapped one as IPv4."""
    g = make_guard(backend.port, PROXY.format(timeout="10s") + "[limits]\nconnection_count_limit = 1\n")

    def connect(header: bytes) -> tuple[RawClient, str]:
        c = RawClient(g.port)
        c.send(header)
        return c, c.line()

    held = [connect(b"PROXY TCP4 192.0.2.50 127.0.0.1 40050 25\r\n"),
            connect(b"PROXY TCP6 2001:db8:1:2::a 2001:db8::25 40051 25\r\n")]
    assert [line for _, line in held] == ["220-mx.guard.test ESMTP\r\n"] * 2
    _, line = connect(b"PROXY TCP6 ::ffff:192.0.2.50 ::ffff:127.0.0.1 40052 25\r\n")
    assert line == "421 4.7.0 Error: too many connections from 192.0.2.50\r\n"
    _, line = connect(b"PROXY TCP6 2001:db8:1:2:ffff::b 2001:db8::25 40053 25\r\n")
    assert line == "421 4.7.0 Error: too many connections from 2001:db8:1:2:ffff::b\r\n"
    _, line = connect(b"PROXY TCP4 192.0.2.51 127.0.0.1 40054 25\r\n")
    assert line == "220-mx.guard.test ESMTP\r\n"  # another client is not affected
    g.wait_for_log(r"warning: Connection concurrency limit exceeded: 2 from \[192\.0\.2\.50\]:40052 for service smtp")
    g.wait_for_log(r"CONNECT from \[192\.0\.2\.50\]:40052 to \[127\.0\.0\.1\]:25")


def test_untrusted_proxy_is_refused(backend: PrivatePostfix, make_guard: Callable[..., Guard]) -> None:
    g = make_guard(backend.port, PROXY.format(timeout="10s") + 'proxy_trusted = ["192.0.2.0/24"]\n')
    c = RawClient(g.port, source="127.0.0.12")
    c.send(b"PROXY TCP4 192.0.2.45 127.0.0.1 40045 25\r\n")
    assert c.closed() and c.buf == b""  # no banner
    g.wait_for_log(r"warning: PROXY protocol: connection from \[127\.0\.0\.12\]:\d+, "
                   r"which is not in server\.proxy_trusted: closed")
    assert "192.0.2.45" not in g.log()


def test_bad_or_missing_proxy_header(backend: PrivatePostfix, make_guard: Callable[..., Guard]) -> None:
    g = make_guard(backend.port, PROXY.format(timeout="0.3s"))
    c = RawClient(g.port)
    c.send(b"EHLO not.a.proxy\r\n")
    assert c.closed() and c.buf == b""
    g.wait_for_log(r"warning: PROXY protocol: bad header from \[127\.0\.0\.1\]:\d+: PROXY unrecognized signature")
    silent = RawClient(g.port)
    assert silent.closed() and silent.buf == b""  # proxy_timeout
    g.wait_for_log(r"warning: PROXY protocol: read from \[127\.0\.0\.1\]:\d+: time limit exceeded")


@pytest.mark.haproxy
@pytest.mark.parametrize("version", [1, 2])
def test_behind_haproxy(backend: PrivatePostfix, proxy_guard: Guard, version: int) -> None:
    lb = HAProxy(proxy_guard.port, proxy=version)
    try:
        lb.start()
        c = RawClient(lb.port, source="127.0.0.23")
        deliver_raw(c, f"via haproxy v{version}")
        backend.wait_for_log(r"client=unknown\[127\.0\.0\.23\]")
        proxy_guard.wait_for_log(r"CONNECT from \[127\.0\.0\.23\]:\d+ to \[127\.0\.0\.1\]:\d+")
    finally:
        lb.cleanup()
    [msg] = backend.wait_for_messages(1)
    assert b"(unknown [127.0.0.23])" in msg


# ---------------------------------------------------------------- IPv6


@pytest.fixture
def v6_backend(postfix_factory: PostfixFactory) -> Iterator[PrivatePostfix]:
    """A Postfix that accepts ``XCLIENT ADDR=IPV6:...``: with the lab's
    ``inet_protocols = ipv4`` it answers ``501 5.5.4 Bad ADDR syntax``."""
    pf = postfix_factory(name="v6", extra={"inet_protocols": "all"})
    pf.start()
    yield pf


def test_ipv6_client_delivers(v6_backend: PrivatePostfix, make_guard: Callable[..., Guard]) -> None:
    g = make_guard(v6_backend.port, listen=("127.0.0.1", "::1"))
    with smtplib.SMTP("::1", g.port) as c:
        c.ehlo("client6.example")
        c.sendmail("a@sender.test", ["bob@example.test"], b"Subject: v6\r\n\r\nx\r\n")
    [msg] = v6_backend.wait_for_messages(1)
    assert b"Received: from client6.example (unknown [IPv6:::1])" in msg
    v6_backend.wait_for_log(r"client=unknown\[::1\]")
    g.wait_for_log(r"CONNECT from \[::1\]:\d+ to \[::1\]:\d+")
    g.wait_for_log(r"relayed from unknown\[::1\]:\d+: 250 ")


def test_ipv6_proxied_client(v6_backend: PrivatePostfix, make_guard: Callable[..., Guard]) -> None:
    g = make_guard(v6_backend.port, PROXY.format(timeout="10s"))
    c = RawClient(g.port)
    c.send(proxy_v2("2001:db8::44", "2001:db8::25", 40046, 25))
    deliver_raw(c, "v6 proxied")
    v6_backend.wait_for_log(r"client=unknown\[2001:db8::44\]")
    g.wait_for_log(r"CONNECT from \[2001:db8::44\]:40046 to \[2001:db8::25\]:25")


def test_received_header_after_starttls_says_esmtp(backend: PrivatePostfix, tls_guard: Guard, certs: Certs) -> None:
    """docs/transport.md, "What the Received: header shows after STARTTLS":
    Postfix's XCLIENT has no way to carry TLS (PROTO is SMTP or ESMTP), so its
    Received: says ``with ESMTP`` and has no ``(using ...)`` comment even with
    smtpd_tls_received_header = yes; the TLS facts are in smtpguard's log."""
    backend.postconf(smtpd_tls_received_header="yes")
    with smtplib.SMTP(backend.host, backend.port, timeout=10) as direct:
        direct.ehlo("probe.example")
        assert direct.has_extn("xclient")
        code, reply = direct.docmd("XCLIENT", "PROTO=ESMTPS")
        assert (code, reply) == (501, b"5.5.4 Bad PROTO syntax: ESMTPS")
    with smtplib.SMTP("127.0.0.1", tls_guard.port, source_address=("127.0.0.9", 0)) as c:
        c.ehlo("tls.example")
        c.starttls(context=certs.client_context())
        c.ehlo("tls.example")
        c.sendmail("alice@sender.test", ["bob@example.test"], b"Subject: tls\r\n\r\nover TLS\r\n")
    [msg] = backend.wait_for_messages(1)
    received = msg.split(b"\n\n", 1)[0].split(b"Received:")[1]  # Postfix's, the first
    assert b"from tls.example (unknown [127.0.0.9])" in received
    assert re.search(rb"\(Postfix\) with ESMTP id ", received), received
    assert b"ESMTPS" not in msg and b"using TLS" not in msg
    tls_guard.wait_for_log(TLS_LINE.format(ip=r"127\.0\.0\.9"))


def test_tls_received_header_when_asked(backend: PrivatePostfix, make_guard: Callable[..., Guard],
                                        certs: Certs) -> None:
    """``[tls] received_header = true``: smtpguard's own trace header carries
    the TLS facts Postfix's cannot; a plaintext session never gets one."""
    g = make_guard(backend.port, tls_section(certs) + "received_header = true\n")
    with smtplib.SMTP("127.0.0.1", g.port, source_address=("127.0.0.9", 0)) as c:
        c.ehlo("tls.example")
        c.starttls(context=certs.client_context())
        c.ehlo("tls.example")
        c.sendmail("alice@sender.test", ["bob@example.test"], b"Subject: tls\r\n\r\nover TLS\r\n")
    with smtplib.SMTP("127.0.0.1", g.port, source_address=("127.0.0.10", 0)) as c:
        c.ehlo("plain.example")
        c.sendmail("alice@sender.test", ["bob@example.test"], b"Subject: plain\r\n\r\nin clear\r\n")
    msgs = backend.wait_for_messages(2)
    [tls_msg] = [m for m in msgs if b"over TLS" in m]
    [plain_msg] = [m for m in msgs if b"in clear" in m]
    received = tls_msg.split(b"\n\n", 1)[0].split(b"Received:")
    assert len(received) == 3  # Postfix's, then ours
    assert re.match(rb" from tls\.example \(unknown \[127\.0\.0\.9\]\)\s+\(using TLSv1\.[23] with cipher \S+ "
                    rb"\(\d+/\d+ bits\)\)\s+by mx\.guard\.test \(smtpguard\) with ESMTPS;", received[2]), received[2]
    assert b"smtpguard" not in plain_msg and b"using TLS" not in plain_msg
