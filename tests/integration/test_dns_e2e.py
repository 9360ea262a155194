"""DNS screening end to end: clients -> smtpguard (subprocess) -> the private
Postfix, with smtpguard's ``[dns]`` pointed at a private dnsmasq.

Clients connect from 127.0.0.x; dnsmasq serves their PTR/A records and the
DNSBL listings ``x.0.0.127.<list>`` for those addresses.  ``slow.test`` is
forwarded to a port that never answers.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from tests.integration.guard import Guard, RawClient
from tests.integration.test_screening import nothing_reached_postfix
from tests.lab import DnsServer, PrivatePostfix

pytestmark = [pytest.mark.postfix, pytest.mark.dns]

MakeGuard = Callable[..., Guard]

LISTED = "127.0.0.2"  # zen.test 127.0.0.2 (+TXT)
DNSWL = "127.0.0.3"  # wl.test 127.0.5.2 (weight -2) and bl.test 127.0.0.4 (weight 1): score -1
NO_PTR = "127.0.0.5"
FORGED = "127.0.0.6"  # PTR forged6.test, whose A is 192.0.2.99
GOOD = "127.0.0.7"  # PTR mail7.client.test <-> A 127.0.0.7
PLAIN = "127.0.0.8"  # no records at all
SLOW = "127.0.0.9"
BAD_RDNS = "127.0.0.10"  # PTR bad.rdns.test, listed on dbl.test

RECORDS = [
    "--local-ttl=300",
    "--host-record=2.0.0.127.zen.test,127.0.0.2",
    "--txt-record=2.0.0.127.zen.test,Listed: see https://zen.test/2",
    "--host-record=3.0.0.127.bl.test,127.0.0.4",
    "--host-record=3.0.0.127.wl.test,127.0.5.2",
    "--ptr-record=6.0.0.127.in-addr.arpa,forged6.test",
    "--host-record=forged6.test,192.0.2.99",
    "--host-record=mail7.client.test,127.0.0.7",
    "--ptr-record=10.0.0.127.in-addr.arpa,bad.rdns.test",
    "--mx-host=mx.test,mail.mx.test,10",
    "--host-record=mail.mx.test,192.0.2.25",
    "--host-record=a-only.test,192.0.2.20",
    "--mx-host=nullmx.test,.,0",
    "--host-record=spam.test.dbl.test,127.0.1.2",
    "--host-record=bad.rdns.test.dbl.test,127.0.1.2",
]
SITES = '["zen.test=127.0.0.[2..11]*2", "bl.test", "wl.test=127.0.[0..255].[1..3]*-2"]'


@pytest.fixture
def dns(dns_server: Callable[..., DnsServer]) -> DnsServer:
    return dns_server(RECORDS, timeout_zones=["slow.test"])


def dns_guard(make_guard: MakeGuard, backend: PrivatePostfix, dns: DnsServer, extra: str = "") -> Guard:
    return make_guard(backend.port, f'[dns]\nnameservers = ["{dns.address}:{dns.port}"]\n'
                                     f'timeout = "0.5s"\nlifetime = "1s"\n' + extra)


DNSBL = f'[dnsbl]\nenabled = true\nsites = {SITES}\nallowlist_threshold = -1\n'


def test_listed_client_is_rejected_at_rcpt_with_the_list_name(backend: PrivatePostfix, make_guard: MakeGuard,
                                                             dns: DnsServer) -> None:
    g = dns_guard(make_guard, backend, dns, DNSBL)
    c = RawClient(g.port, source=LISTED)
    c.reply()
    replies = c.transaction()
    assert replies[1].startswith("250")
    assert replies[2] == "550 5.7.1 Service unavailable; client [127.0.0.2] blocked using zen.test\r\n"
    assert c.cmd("RCPT TO:<carol@example.test>").startswith("550 5.7.1 Service unavailable")
    c.cmd("QUIT")
    g.wait_for_log(r"DNSBL rank 2 for \[127\.0\.0\.2\]:\d+ \(zen\.test=127\.0\.0\.2\*2\)")
    g.wait_for_log(r"NOQUEUE: reject: RCPT from [^ ]*\[127\.0\.0\.2\]:\d+: 550 5\.7\.1 Service unavailable; "
                   r"client \[127\.0\.0\.2\] blocked using zen\.test; from=<a@sender\.test> to=<bob@example\.test>")
    assert nothing_reached_postfix(backend)


def test_listed_client_with_action_drop_gets_521_after_the_wait(backend: PrivatePostfix, make_guard: MakeGuard,
                                                                dns: DnsServer) -> None:
    g = dns_guard(make_guard, backend, dns, DNSBL + 'action = "drop"\n')
    c = RawClient(g.port, source=LISTED)
    assert c.line() == "220-mx.guard.test ESMTP\r\n"
    assert c.reply() == "521 5.7.1 Service unavailable; client [127.0.0.2] blocked using zen.test\r\n"
    assert c.closed()
    assert nothing_reached_postfix(backend)


def test_dnswl_client_delivers_and_skips_the_other_tests(backend: PrivatePostfix, make_guard: MakeGuard,
                                                         dns: DnsServer) -> None:
    g = dns_guard(make_guard, backend, dns, DNSBL)
    c = RawClient(g.port, source=DNSWL)
    c.reply()
    # Unauthorized pipelining (after HELO, no PIPELINING offered) would be a
    # Protocol error at RCPT for any other client; the DNSWL client is exempt.
    c.send(b"HELO client.example\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<bob@example.test>\r\n")
    assert [c.reply()[:3] for _ in range(3)] == ["250", "250", "250"]
    assert c.cmd("DATA").startswith("354")
    c.send(b"Subject: dnswl\r\n\r\nhi\r\n.\r\n")
    assert c.reply().startswith("250 2.0.0 Ok: queued as")
    c.cmd("QUIT")
    backend.wait_for_messages(1)
    assert "PIPELINING from" not in g.log()
    g.wait_for_log(r"DNSBL rank -1 for \[127\.0\.0\.3\]:\d+ \(bl\.test=127\.0\.0\.4\*1, wl\.test=127\.0\.5\.2\*-2\), "
                   r"allowlisted")
    g.wait_for_log(r"PASS NEW \[127\.0\.0\.3\]:\d+")


def test_dnsbl_pass_is_cached_and_the_next_connection_is_pass_old(backend: PrivatePostfix, make_guard: MakeGuard,
                                                                  dns: DnsServer) -> None:
    g = dns_guard(make_guard, backend, dns, DNSBL)
    c = RawClient(g.port, source=PLAIN)
    c.reply()
    assert c.transaction()[-1].startswith("250 2.0.0 Ok: queued as")
    c.cmd("QUIT")
    g.wait_for_log(r"PASS NEW \[127\.0\.0\.8\]:\d+")
    queries = dns.log().count("8.0.0.127.zen.test")
    c = RawClient(g.port, source=PLAIN)
    assert c.reply() == "220 mx.guard.test ESMTP\r\n"  # no greet wait
    g.wait_for_log(r"PASS OLD \[127\.0\.0\.8\]:\d+")
    c.cmd("QUIT")
    assert dns.log().count("8.0.0.127.zen.test") == queries  # no new DNSBL lookup


@pytest.mark.parametrize(("code", "reply"), [
    (450, "450 4.7.1 Client host rejected: cannot find your reverse hostname, [127.0.0.5]\r\n"),
    (550, "550 5.7.1 Client host rejected: cannot find your reverse hostname, [127.0.0.5]\r\n"),
])
def test_client_without_ptr_is_refused_per_reject_code(backend: PrivatePostfix, make_guard: MakeGuard,
                                                       dns: DnsServer, code: int, reply: str) -> None:
    g = dns_guard(make_guard, backend, dns, f"[client_name]\nenabled = true\nreject_code = {code}\n")
    c = RawClient(g.port, source=NO_PTR)
    c.reply()
    replies = c.transaction()
    assert replies[0].startswith("250") and replies[1].startswith("250")  # delayed to RCPT
    assert replies[2] == reply
    g.wait_for_log(r"NOQUEUE: reject: RCPT from unknown\[127\.0\.0\.5\]:\d+: " + reply.split(",")[0])
    assert nothing_reached_postfix(backend)


def test_client_whose_ptr_does_not_resolve_back(backend: PrivatePostfix, make_guard: MakeGuard,
                                                dns: DnsServer) -> None:
    g = dns_guard(make_guard, backend, dns, '[client_name]\nenabled = true\nrequire = "fcrdns"\n')
    c = RawClient(g.port, source=FORGED)
    c.reply()
    assert c.transaction()[2] == "450 4.7.25 Client host rejected: cannot find your hostname, [127.0.0.6]\r\n"
    assert nothing_reached_postfix(backend)
    # The reverse name exists, so require = "reverse" lets the same client in.
    g2 = dns_guard(make_guard, backend, dns, "[client_name]\nenabled = true\n")
    c = RawClient(g2.port, source=FORGED)
    c.reply()
    assert c.transaction()[-1].startswith("250 2.0.0 Ok: queued as")
    backend.wait_for_log(r"client=unknown\[127\.0\.0\.6\]")  # not verified: no NAME


def test_verified_name_reaches_postfix_via_xclient(backend: PrivatePostfix, make_guard: MakeGuard,
                                                   dns: DnsServer) -> None:
    g = dns_guard(make_guard, backend, dns, '[client_name]\nenabled = true\nrequire = "fcrdns"\n')
    c = RawClient(g.port, source=GOOD)
    c.reply()
    assert c.transaction()[-1].startswith("250 2.0.0 Ok: queued as")
    c.cmd("QUIT")
    backend.wait_for_log(r"client=mail7\.client\.test\[127\.0\.0\.7\]")
    g.wait_for_log(r"relayed from mail7\.client\.test\[127\.0\.0\.7\]:\d+: 250 2\.0\.0 Ok")


SENDER_DOMAIN = "[sender_domain]\nenabled = true\nreject_code = 550\n"


@pytest.mark.parametrize(("sender", "reply"), [
    ("a@mx.test", None),
    ("a@a-only.test", None),
    ("a@nullmx.test", "550 5.7.27 <a@nullmx.test>: Sender address rejected: Domain nullmx.test does not accept "
                      "mail (nullMX)\r\n"),
    ("a@nx.test", "550 5.1.8 <a@nx.test>: Sender address rejected: Domain not found\r\n"),
    ("a@x.slow.test", "450 4.1.8 <a@x.slow.test>: Sender address rejected: Domain not found\r\n"),
])
def test_sender_domain(backend: PrivatePostfix, make_guard: MakeGuard, dns: DnsServer, sender: str,
                       reply: str | None) -> None:
    g = dns_guard(make_guard, backend, dns, SENDER_DOMAIN)
    c = RawClient(g.port, source=PLAIN)
    c.reply()
    replies = c.transaction(sender=sender)
    if reply is None:
        assert replies[-1].startswith("250 2.0.0 Ok: queued as")
        assert len(backend.wait_for_messages(1)) == 1
    else:
        assert replies[1].startswith("250")  # delayed to RCPT
        assert replies[2] == reply
        assert nothing_reached_postfix(backend)


def test_dns_that_never_answers_tempfails_and_never_rejects(backend: PrivatePostfix, make_guard: MakeGuard,
                                                            dns: DnsServer) -> None:
    # A DNSBL that never answers counts as not listed; a client name or a
    # sender domain that cannot be looked up gets 4xx, never 5xx.
    g = dns_guard(make_guard, backend, dns, '[dnsbl]\nenabled = true\nsites = ["slow.test*5"]\n'
                  + SENDER_DOMAIN)
    c = RawClient(g.port, source=SLOW)
    started = time.monotonic()
    c.reply()
    assert time.monotonic() - started < 0.8  # the score is taken after the 0.2s wait, not after the 1s lifetime
    replies = c.transaction(sender="a@mail.slow.test")
    assert replies[2] == "450 4.1.8 <a@mail.slow.test>: Sender address rejected: Domain not found\r\n"
    assert c.cmd("RSET").startswith("250")
    assert c.transaction(helo="EHLO again.example", sender="a@mx.test")[-1].startswith("250 2.0.0 Ok: queued as")
    g.wait_for_log(r"warning: DNS lookup error for 9\.0\.0\.127\.slow\.test/A")
    g.wait_for_log(r"DNSBL rank 0 for \[127\.0\.0\.9\]:\d+ \(slow\.test=lookup failed\)")
    assert "DNSBL rank 5" not in g.log()


def test_rhsbl_helo_sender_and_reverse_client(backend: PrivatePostfix, make_guard: MakeGuard, dns: DnsServer) -> None:
    rhsbl = ('[rhsbl]\nenabled = true\nhelo_sites = ["dbl.test"]\nsender_sites = ["dbl.test"]\n'
             'reverse_client_sites = ["dbl.test"]\n')
    g = dns_guard(make_guard, backend, dns, rhsbl)
    c = RawClient(g.port, source=PLAIN)
    c.reply()
    assert c.transaction(helo="EHLO spam.test")[2] == \
        "554 5.7.1 Service unavailable; Helo command [spam.test] blocked using dbl.test\r\n"
    c.cmd("RSET")
    assert c.transaction(sender="a@spam.test")[2] == \
        "554 5.7.1 Service unavailable; Sender address [a@spam.test] blocked using dbl.test\r\n"
    c = RawClient(g.port, source=BAD_RDNS)
    c.reply()
    assert c.transaction()[2] == \
        "554 5.7.1 Service unavailable; Unverified Client host [bad.rdns.test] blocked using dbl.test\r\n"
    assert nothing_reached_postfix(backend)
