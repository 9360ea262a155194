"""End to end, [handoff]: an allowlisted or PASS OLD client's connection is
handed to the private Postfix's smtpd pass service (postscreen's way); Postfix
greets it itself and sees the real client.  Anything that keeps smtpguard
from handing it over relays the session instead."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.guard import Guard, RawClient
from tests.integration.ops import scrape, value
from tests.lab import PostfixFactory, PrivatePostfix

pytestmark = pytest.mark.postfix

MakeGuard = Callable[..., Guard]
OUR_BANNER = "220 mx.guard.test ESMTP\r\n"
POSTFIX_BANNER = "220 backend.test ESMTP Postfix\r\n"


def handoff(socket: Path | str | None, checked: bool = True) -> str:
    """[handoff] to *socket*; smtpguard asks the lab Postfix (its config
    directory, next to the queue directory) whether the pass service refuses
    bare newlines, or, without *checked*, trusts it."""
    if not checked or socket is None:
        return f'[handoff]\nsocket = "{socket}"\nrequire_forbid_bare_newline = false\n'
    conf = Path(socket).parents[2] / "conf"
    return f'[handoff]\nsocket = "{socket}"\npostfix_config_directory = "{conf}"\n'


def deliver_first(guard: Guard, source: str) -> None:
    """A first, relayed session: the client passes its tests (PASS NEW)."""
    c = RawClient(guard.port, source=source)
    assert c.reply() == f"220-mx.guard.test ESMTP\r\n{OUR_BANNER}"
    assert c.transaction(subject="first")[-1].startswith("250 2.0.0 Ok: queued as")
    c.cmd("QUIT")
    guard.wait_for_log(rf"PASS NEW \[{source}\]:\d+")


def test_pass_old_client_is_handed_to_postfix(backend: PrivatePostfix, make_guard: MakeGuard) -> None:
    g = make_guard(backend.port, handoff(backend.pass_socket))
    deliver_first(g, "127.0.0.61")
    g.mark()
    backend.mark()
    c = RawClient(g.port, source="127.0.0.61")
    assert c.reply() == POSTFIX_BANNER  # Postfix's own smtpd greets it
    replies = c.transaction(subject="handed off")
    assert replies[0].startswith("250-backend.test")
    assert replies[-1].startswith("250 2.0.0 Ok: queued as")
    assert c.cmd("QUIT") == "221 2.0.0 Bye\r\n"
    backend.wait_for_messages(2)
    m = backend.wait_for_log(r"smtpd\[\d+\]: connect from unknown\[127\.0\.0\.61\]")
    assert m is not None
    m = g.wait_for_log(r"CONNECT from \[127\.0\.0\.61\]:(\d+) to \[127\.0\.0\.1\]:\d+")
    g.wait_for_log(rf"PASS OLD \[127\.0\.0\.61\]:{m.group(1)}")
    assert f"DISCONNECT [127.0.0.61]:{m.group(1)}" not in g.log()  # as postscreen: none for a passed client
    assert "XCLIENT" not in backend.log()
    s = scrape(g.metrics_port)
    assert value(s, "smtpguard_handoffs_total", result="passed") == 1
    assert value(s, "smtpguard_sessions_active") == 0


def test_allowlisted_client_is_handed_off_at_once(tmp_path: Path, backend: PrivatePostfix,
                                                  make_guard: MakeGuard) -> None:
    table = tmp_path / "clients.cidr"
    table.write_text("127.0.0.62/32 permit\n")
    g = make_guard(backend.port, handoff(backend.pass_socket) + f'[access]\nclient_table = "cidr:{table}"\n')
    c = RawClient(g.port, source="127.0.0.62")
    assert c.reply() == POSTFIX_BANNER  # no greet wait, no 220- from smtpguard
    assert c.transaction()[-1].startswith("250 2.0.0 Ok: queued as")
    backend.wait_for_log(r"client=unknown\[127\.0\.0\.62\]")
    g.wait_for_log(r"ALLOWLISTED \[127\.0\.0\.62\]:\d+")


def test_unreachable_pass_service_relays_instead(tmp_path: Path, backend: PrivatePostfix,
                                                 make_guard: MakeGuard) -> None:
    missing = tmp_path / "no-such-socket"
    g = make_guard(backend.port, handoff(missing, checked=False))
    deliver_first(g, "127.0.0.63")
    c = RawClient(g.port, source="127.0.0.63")
    assert c.reply() == OUR_BANNER  # relayed by smtpguard, as any client
    assert c.transaction(subject="relayed")[-1].startswith("250 2.0.0 Ok: queued as")
    backend.wait_for_messages(2)
    g.wait_for_log(rf"warning: cannot pass connection to service {missing}: No such file or directory")
    g.wait_for_log(r"relayed from unknown\[127\.0\.0\.63\]:\d+: 250 ")
    assert value(scrape(g.metrics_port), "smtpguard_handoffs_total", result="failed") == 1


def test_greylisting_keeps_pass_old_clients_in_the_relay(tmp_path: Path, backend: PrivatePostfix,
                                                         make_guard: MakeGuard) -> None:
    clients = tmp_path / "greylist_clients"
    clients.write_text("127.0.0.65\n")
    g = make_guard(backend.port, handoff(backend.pass_socket)
                   + f'[greylist]\nenabled = true\nclient_allowlist = "{clients}"\n')
    for source, banner in (("127.0.0.64", OUR_BANNER), ("127.0.0.65", POSTFIX_BANNER)):
        c = RawClient(g.port, source=source)
        assert c.reply().endswith(OUR_BANNER)
        # postmaster@ is never greylisted: the recipient passes, and with it the client's tests.
        assert c.transaction(rcpt="postmaster@example.test")[-1].startswith("250 2.0.0 Ok: queued as")
        c.cmd("QUIT")
        g.wait_for_log(rf"PASS NEW \[{source}\]:\d+")
        # PASS OLD now; only the client greylisting would not look at goes to Postfix.
        assert RawClient(g.port, source=source).reply() == banner


def test_proxied_client_is_handed_off_with_the_header_address(backend: PrivatePostfix,
                                                              make_guard: MakeGuard, tmp_path: Path) -> None:
    table = tmp_path / "clients.cidr"
    table.write_text("192.0.2.0/24 permit\n")
    g = make_guard(backend.port, '[server]\nproxy_protocol = true\n' + handoff(backend.pass_socket)
                   + f'[access]\nclient_table = "cidr:{table}"\n')
    c = RawClient(g.port)
    c.send(b"PROXY TCP4 192.0.2.66 192.0.2.25 40066 25\r\n")
    assert c.reply() == POSTFIX_BANNER
    assert c.transaction()[-1].startswith("250 2.0.0 Ok: queued as")
    backend.wait_for_log(r"connect from unknown\[192\.0\.2\.66\]")
    # Bytes behind the header are in smtpguard's buffer: that client stays here.
    c = RawClient(g.port)
    c.send(b"PROXY TCP4 192.0.2.67 192.0.2.25 40067 25\r\nEHLO early.example\r\n")
    assert c.reply() == OUR_BANNER
    assert c.reply().startswith("250-mx.guard.test")
    g.wait_for_log(r"ALLOWLISTED \[192\.0\.2\.67\]:40067")


def test_ipv6_clients_are_handed_off_only_with_handoff_ipv6(postfix_factory: PostfixFactory,
                                                           make_guard: MakeGuard, tmp_path: Path) -> None:
    """An IPv4-only smtpd exits on an IPv6 client it is handed (and master
    throttles the service): such clients are relayed unless handoff.ipv6."""
    pf = postfix_factory(name="v6pass", extra={"inet_protocols": "all"}, pass_service=True)
    pf.start()
    table = tmp_path / "clients.cidr"
    table.write_text("2001:db8::/32 permit\n")
    header = b"PROXY TCP6 2001:db8::68 2001:db8::25 40068 25\r\n"
    for ipv6, banner in ((False, OUR_BANNER), (True, "220 v6pass.test ESMTP Postfix\r\n")):
        g = make_guard(pf.port, '[server]\nproxy_protocol = true\n' + handoff(pf.pass_socket)
                       + f"ipv6 = {str(ipv6).lower()}\n" + f'[access]\nclient_table = "cidr:{table}"\n')
        c = RawClient(g.port)
        c.send(header)
        assert c.reply() == banner
        assert c.transaction()[-1].startswith("250 2.0.0 Ok: queued as")
        c.cmd("QUIT")
    assert len(pf.wait_for_messages(2)) == 2
    pf.wait_for_log(r"smtpd\[\d+\]: connect from unknown\[2001:db8::68\]")  # the handed-off one
    pf.wait_for_log(r"client=unknown\[2001:db8::68\]")
