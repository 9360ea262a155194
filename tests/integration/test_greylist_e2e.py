"""Greylisting end to end: smtpguard (subprocess) -> the private Postfix,
with SQLite and Redis state, a real sending MTA that retries by itself, and
two smtpguard nodes sharing one Redis.

The greylist delay is 1s here (a real process cannot take a fake clock);
the timing logic itself is unit-tested on a fake clock in
tests/unit/test_greylist.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from tests.integration.guard import Guard, RawClient
from tests.lab import DnsServer, PostfixFactory, PrivatePostfix, wait_until

pytestmark = pytest.mark.postfix

DELAY = 1.0
GREYLIST = f'[greylist]\nenabled = true\ndelay = "{DELAY:g}s"\nuse_default_client_allowlist = false\n'
GREYLISTED = "450 4.2.0 <bob@example.test>: Recipient address rejected: Greylisted, see " \
             "http://postgrey.schweikert.ch/help/example.test.html\r\n"


def attempt(port: int, source: str, sender: str = "alice@sender.test", rcpt: str = "bob@example.test") -> str:
    """One delivery attempt; returns the RCPT reply (the message is sent when accepted)."""
    c = RawClient(port, source=source)
    c.reply()
    replies = c.transaction(sender=sender, rcpt=rcpt, subject="greylist test")
    if len(replies) > 3:
        assert replies[3].startswith("354") and replies[4].startswith("250 2.0.0"), replies
    c.cmd("QUIT")
    c.close()
    return replies[2]


def wait_past(start: float, seconds: float) -> None:
    """Let the greylist delay pass (the server's own clock: no way around it)."""
    wait_until(lambda: time.time() >= start + seconds, timeout=seconds + 5, what="the greylist delay", interval=0.05)


def test_first_attempt_early_retry_then_delivery(backend: PrivatePostfix, make_guard: Callable[..., Guard]) -> None:
    g = make_guard(backend.port, GREYLIST)
    assert attempt(g.port, "127.0.3.10") == GREYLISTED
    start = time.time()  # after the first RCPT: the delay counts from it
    g.wait_for_log(r"NOQUEUE: reject: RCPT from unknown\[127\.0\.3\.10\]:\d+: 450 4\.2\.0 <bob@example\.test>: "
                   r"Recipient address rejected: Greylisted.*; from=<alice@sender\.test> to=<bob@example\.test> "
                   r"proto=ESMTP helo=<client\.example>")
    g.wait_for_log(r"greylist: greylist, reason=new triplet, client=unknown\[127\.0\.3\.10\]")
    assert attempt(g.port, "127.0.3.10") == GREYLISTED  # early retry
    g.wait_for_log(r"reason=early retry")
    assert backend.messages() == []
    wait_past(start, DELAY)
    assert attempt(g.port, "127.0.3.10").startswith("250")
    g.wait_for_log(r"greylist: pass, reason=triplet passed, delayed \d+s")
    # Another client of the same /24 is the same network for greylisting.
    assert attempt(g.port, "127.0.3.99").startswith("250")
    # A client in another /24 starts from scratch.
    assert attempt(g.port, "127.0.4.10") == GREYLISTED
    assert len(backend.wait_for_messages(2)) == 2
    # The operator CLI reads the same store.
    out = subprocess.run([sys.executable, "-m", "smtpguard", "greylist", "list", "--json", "-c", str(g.config)],
                         check=True, capture_output=True, text=True).stdout
    keys = {e["key"]: e for e in json.loads(out)}
    assert keys["127.0.3.0/alice@sender.test/bob@example.test"]["passed_at"] is not None
    assert keys["127.0.4.0/alice@sender.test/bob@example.test"]["passed_at"] is None


def test_sender_normalisation_and_postmaster(backend: PrivatePostfix, make_guard: Callable[..., Guard]) -> None:
    g = make_guard(backend.port, GREYLIST)
    assert attempt(g.port, "127.0.5.1", sender="prvs=1234567890=news+list@sender.test").startswith("450")
    start = time.time()
    assert attempt(g.port, "127.0.5.1", rcpt="postmaster@example.test").startswith("250")  # always allowlisted
    wait_past(start, DELAY)
    # BATV tag and +extension stripped: the retry with another tag is the same triplet.
    assert attempt(g.port, "127.0.5.1", sender="prvs=0987654321=news+other@sender.test").startswith("250")


def test_state_survives_restart(backend: PrivatePostfix, make_guard: Callable[..., Guard]) -> None:
    g = make_guard(backend.port, GREYLIST)
    assert attempt(g.port, "127.0.6.1") == GREYLISTED
    start = time.time()
    g.stop()
    wait_past(start, DELAY)
    g.start()  # same config, same SQLite file
    assert attempt(g.port, "127.0.6.1").startswith("250")
    assert len(backend.wait_for_messages(1)) == 1


def test_auto_allowlist_and_cli_allow(backend: PrivatePostfix, make_guard: Callable[..., Guard]) -> None:
    g = make_guard(backend.port, GREYLIST + "auto_allowlist_clients = 1\n")
    assert attempt(g.port, "127.0.7.1") == GREYLISTED
    start = time.time()
    wait_past(start, DELAY)
    assert attempt(g.port, "127.0.7.1").startswith("250")  # counted once: allowlisted now
    assert attempt(g.port, "127.0.7.2", sender="new@other.test").startswith("250")
    g.wait_for_log(r"reason=client auto-allowlisted")
    # An operator allowlists a network by hand.
    subprocess.run([sys.executable, "-m", "smtpguard", "greylist", "allow", "127.0.8.0/24", "-c", str(g.config)],
                   check=True, capture_output=True)
    assert attempt(g.port, "127.0.8.5").startswith("250")


def test_real_sending_mta_retries_by_itself(backend: PrivatePostfix, make_guard: Callable[..., Guard],
                                            postfix_factory: PostfixFactory) -> None:
    g = make_guard(backend.port, GREYLIST)
    sender = postfix_factory.sender(g.port)
    sender.start()
    sender.submit(b"Subject: via a real MTA\r\n\r\nretried by Postfix itself\r\n", "alice@sender.test",
                  "bob@example.test")
    sender.wait_for_log(r"status=deferred \(host 127\.0\.0\.1\[127\.0\.0\.1\] said: 450 4\.2\.0 "
                        r"<bob@example\.test>: Recipient address rejected: Greylisted", timeout=20)
    [msg] = backend.wait_for_messages(1, timeout=60)
    assert b"retried by Postfix itself" in msg
    sender.wait_for_log(r"status=sent \(250 2\.0\.0 Ok: queued as", timeout=20)
    g.wait_for_log(r"greylist: pass, reason=triplet passed")


@pytest.mark.redis
def test_two_nodes_share_one_redis(backend: PrivatePostfix, make_guard: Callable[..., Guard], redis_url: str) -> None:
    a = make_guard(backend.port, GREYLIST, state_url=redis_url)
    b = make_guard(backend.port, GREYLIST, state_url=redis_url)
    assert attempt(a.port, "127.0.9.1") == GREYLISTED  # node A
    start = time.time()
    assert attempt(b.port, "127.0.9.1") == GREYLISTED  # node B knows the triplet: early retry
    b.wait_for_log(r"reason=early retry")
    wait_past(start, DELAY)
    assert attempt(b.port, "127.0.9.1").startswith("250")  # node B passes it
    assert attempt(a.port, "127.0.9.1").startswith("250")  # and node A knows it passed
    a.wait_for_log(r"reason=triplet known")
    assert len(backend.wait_for_messages(2)) == 2


# ------------------------------------------------ greylisting after Postfix's verdict (issue 14)

REJECT_RELAY = {"smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination"}


def triplet_keys(g: Guard) -> set[str]:
    out = subprocess.run([sys.executable, "-m", "smtpguard", "greylist", "list", "--json", "-c", str(g.config)],
                         check=True, capture_output=True, text=True).stdout
    return {e["key"] for e in json.loads(out)}


def test_relay_attempt_gets_postfix_reject_at_once_and_leaves_no_triplet(
        backend: PrivatePostfix, make_guard: Callable[..., Guard]) -> None:
    backend.postconf(**REJECT_RELAY)
    g = make_guard(backend.port, GREYLIST)
    c = RawClient(g.port, source="127.0.3.20")
    c.reply()
    assert c.cmd("EHLO client.example").startswith("250")
    assert c.cmd("MAIL FROM:<alice@sender.test>").startswith("250")
    # Postfix's own 554 on the first try, not a 450 and a triplet.
    assert c.cmd("RCPT TO:<victim@other.example>") == "554 5.7.1 <victim@other.example>: Relay access denied\r\n"
    # The valid recipient beside it is greylisted, alone.
    assert c.cmd("RCPT TO:<bob@example.test>") == GREYLISTED
    start = time.time()
    # No recipient left: Postfix-like 554, and Postfix never gets DATA.
    assert c.cmd("DATA") == "554 5.5.1 Error: no valid recipients\r\n"
    assert c.cmd("QUIT").startswith("221")
    c.close()
    assert triplet_keys(g) == {"127.0.3.0/alice@sender.test/bob@example.test"}
    backend.wait_for_log(r"NOQUEUE: reject: RCPT from unknown\[127\.0\.3\.20\]: 554 5\.7\.1 "
                         r"<victim@other\.example>: Relay access denied")
    g.wait_for_log(r"greylist: greylist, reason=new triplet, client=unknown\[127\.0\.3\.20\]:\d+, "
                   r"sender=<alice@sender\.test>, recipient=<bob@example\.test>")
    g.wait_for_log(r"DISCONNECT \[127\.0\.3\.20\]:\d+ ehlo=1 mail=1 rcpt=0/2 data=0/1 quit=1 commands=3/6")
    assert "greylist: " not in "".join(line for line in g.log().splitlines(True) if "victim@" in line)
    assert backend.messages() == []
    # After the delay: the relay attempt is refused again at once, bob alone gets the message.
    wait_past(start, DELAY)
    c = RawClient(g.port, source="127.0.3.20")
    c.reply()
    c.cmd("EHLO client.example")
    c.cmd("MAIL FROM:<alice@sender.test>")
    assert c.cmd("RCPT TO:<victim@other.example>").startswith("554 5.7.1")
    assert c.cmd("RCPT TO:<bob@example.test>").startswith("250")
    assert c.cmd("DATA").startswith("354")
    c.send(b"Subject: both\r\n\r\nonce\r\n.\r\n")
    assert c.reply().startswith("250 2.0.0")
    c.cmd("QUIT")
    c.close()
    [msg] = backend.wait_for_messages(1)
    assert b"once" in msg
    assert triplet_keys(g) == {"127.0.3.0/alice@sender.test/bob@example.test"}


def test_real_mta_invalid_recipient_bounces_at_once_valid_one_delivered_after_the_delay(
        backend: PrivatePostfix, make_guard: Callable[..., Guard], postfix_factory: PostfixFactory) -> None:
    g = make_guard(backend.port, GREYLIST)
    sender = postfix_factory.sender(g.port)
    sender.start()
    sender.submit(b"Subject: two recipients\r\n\r\nexactly once\r\n", "alice@sender.test",
                  ["bob@example.test", "nobody@other.example"])
    # The invalid recipient bounces on the first try, with the backend Postfix's own reply
    # (the sender is in its mynetworks, so this is its off-box refusal, not relay access).
    qid = sender.wait_for_log(r"(\w+): to=<nobody@other\.example>.*status=bounced \(host 127\.0\.0\.1\[127\.0\.0\.1\] "
                              r"said: 550 5\.7\.1 <nobody@other\.example>: Recipient address rejected", timeout=20)[1]
    sender.wait_for_log(r"to=<bob@example\.test>.*status=deferred \(host 127\.0\.0\.1\[127\.0\.0\.1\] said: "
                        r"450 4\.2\.0 <bob@example\.test>: Recipient address rejected: Greylisted", timeout=20)
    # The valid one is delivered after the delay, by the sender's own retry.
    [msg] = backend.wait_for_messages(1, timeout=60)
    assert b"exactly once" in msg
    sender.wait_for_log(r"to=<bob@example\.test>.*status=sent \(250 2\.0\.0 Ok: queued as", timeout=20)
    sender.wait_for_log(rf"{qid}: removed$", timeout=20)  # the sender is done with it: nothing more will come
    # The bounce came back to alice; nothing was delivered twice.
    assert len(re.findall(r"status=bounced", sender.log())) == 1
    assert len(re.findall(r"to=<bob@example\.test>.*status=sent", sender.log())) == 1
    assert len(backend.messages()) == 1
    assert triplet_keys(g) == {"127.0.0.0/alice@sender.test/bob@example.test"}


# ------------------------------------------------ SPF-aware greylisting against a real DNS server (issue 14)

SPF_RECORDS = [
    "--txt-record=pool.test,v=spf1 ip4:127.0.8.0/24 ip4:127.0.9.0/24 -all",
    "--txt-record=soft.test,v=spf1 ip4:127.0.20.0/24 ~all",
    "--txt-record=strict.test,v=spf1 ip4:127.0.20.0/24 -all",
]


@pytest.mark.dns
def test_spf_pool_retrying_from_another_network_passes(backend: PrivatePostfix, make_guard: Callable[..., Guard],
                                                       dns_server: Callable[..., DnsServer]) -> None:
    dns = dns_server(SPF_RECORDS, timeout_zones=["slow.test"])
    g = make_guard(backend.port, GREYLIST + "spf_key = true\n"
                   f'[dns]\nnameservers = ["{dns.address}:{dns.port}"]\ntimeout = "1s"\nlifetime = "2s"\n')
    assert attempt(g.port, "127.0.8.5", sender="news@pool.test") == GREYLISTED
    start = time.time()
    g.wait_for_log(r"greylist: greylist, reason=new triplet, client=unknown\[127\.0\.8\.5\]:\d+, "
                   r"sender=<news@pool\.test>, recipient=<bob@example\.test>, spf=pass:pool\.test")
    assert attempt(g.port, "127.0.10.5", sender="a@soft.test") == GREYLISTED  # ~all: softfail
    assert attempt(g.port, "127.0.10.5", sender="a@strict.test") == GREYLISTED  # -all: fail
    # A DNS server that never answers: no SPF pass, greylisted as usual (never a 5xx).
    assert attempt(g.port, "127.0.10.5", sender="a@slow.test") == GREYLISTED
    g.wait_for_log(r"spf=temperror:slow\.test")
    wait_past(start, DELAY)
    # The pool retries from its other /24, which SPF also authorizes: it passes.
    assert attempt(g.port, "127.0.9.5", sender="news@pool.test").startswith("250")
    g.wait_for_log(r"greylist: pass, reason=triplet passed, delayed \d+s, client=unknown\[127\.0\.9\.5\]")
    # Without an SPF pass, another /24 is a new triplet, as usual.
    assert attempt(g.port, "127.0.11.5", sender="a@soft.test") == GREYLISTED
    assert attempt(g.port, "127.0.11.5", sender="a@strict.test") == GREYLISTED
    g.wait_for_log(r"spf=softfail:soft\.test")
    g.wait_for_log(r"spf=fail:strict\.test")
    assert triplet_keys(g) == {"pool.test/news@pool.test/bob@example.test",
                               "127.0.10.0/a@soft.test/bob@example.test", "127.0.11.0/a@soft.test/bob@example.test",
                               "127.0.10.0/a@strict.test/bob@example.test", "127.0.10.0/a@slow.test/bob@example.test",
                               "127.0.11.0/a@strict.test/bob@example.test"}
    assert len(backend.wait_for_messages(1)) == 1
    assert "TXT" in dns.log() and "pool.test" in dns.log()  # the answers came from the DNS server


def cli(g: Guard, *args: str) -> str:
    return subprocess.run([sys.executable, "-m", "smtpguard", "greylist", *args, "-c", str(g.config)],
                          capture_output=True, text=True, timeout=60).stdout


def test_cli_allow_and_delete_any_prefix_on_a_running_server(backend: PrivatePostfix,
                                                             make_guard: Callable[..., Guard]) -> None:
    g = make_guard(backend.port, GREYLIST + "auto_allowlist_clients = 0\n")
    assert cli(g, "allow", "127.0.16.0/20").split() == ["ALLOWED", "UNTIL", "127.0.16.0/20", "never"]
    assert attempt(g.port, "127.0.20.5").startswith("250")  # another /24 inside the /20
    g.wait_for_log(r"greylist: pass, reason=client allowlisted by operator \(127\.0\.16\.0/20\)")
    assert cli(g, "allow", "127.0.40.128/25").split()[2] == "127.0.40.128/25"
    assert attempt(g.port, "127.0.40.200").startswith("250")
    assert attempt(g.port, "127.0.40.100") == GREYLISTED  # the lower half of that /24 is not in it
    assert cli(g, "delete", "127.0.20.5") == "deleted: 127.0.16.0/20\n"  # the network holding the address
    assert attempt(g.port, "127.0.20.5") == GREYLISTED  # the running server saw the delete at once
    assert json.loads(cli(g, "clients", "--json")) == [
        {"network": "127.0.40.128/25", "manual": True, "added": pytest.approx(time.time(), abs=60), "expires": None}]
