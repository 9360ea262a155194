"""The policy service end to end: ``smtpguard policy`` (a real subprocess)
behind the private Postfix's ``check_policy_service``, a real sending
Postfix that retries by itself, a real DNS server for the RHSBL, Postfix's
answer when the service is down, and the front end and the policy service
sharing one Redis.

The greylist delay is 1s here (a real process cannot take a fake clock);
the timing logic is unit-tested on a fake clock in
tests/unit/test_policy_engine.py.
"""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.integration.guard import Guard, RawClient
from tests.lab import PostfixFactory, PrivatePostfix, free_port, wait_until

pytestmark = pytest.mark.postfix

DELAY = 1.0
GREYLIST = f'[greylist]\ndelay = "{DELAY:g}s"\nuse_default_client_allowlist = false\n'
GREYLISTED = "450 4.2.0 <bob@example.test>: Recipient address rejected: Greylisted, see " \
             "http://postgrey.schweikert.ch/help/example.test.html"


def policy_guard(make_guard: Callable[..., Guard], backend: PrivatePostfix, extra: str = "", policy_keys: str = "",
                 **kw: Any) -> tuple[Guard, int]:
    """``smtpguard policy`` on a free port, and the backend's recipient
    restrictions calling it after reject_unauth_destination."""
    port = free_port()
    g = make_guard(backend.port, f'[policy]\nlisten = "127.0.0.1:{port}"\n' + policy_keys + extra, command="policy",
                   **kw)
    backend.postconf(smtpd_recipient_restrictions=f"reject_unauth_destination, "
                                                  f"check_policy_service inet:127.0.0.1:{port}")
    return g, port


def rcpt(port: int, source: str, sender: str = "alice@sender.test", to: str = "bob@example.test") -> str:
    """One transaction straight to Postfix; its RCPT reply (the message is sent when accepted)."""
    c = RawClient(port, source=source)
    c.reply()
    replies = c.transaction(sender=sender, rcpt=to, subject="policy test")
    c.cmd("QUIT")
    c.close()
    return replies[2].rstrip("\r\n")


def wait_past(start: float, seconds: float) -> None:
    wait_until(lambda: time.time() >= start + seconds, timeout=seconds + 5, what="the greylist delay", interval=0.05)


def test_postfix_greylists_through_the_policy_service(backend: PrivatePostfix, make_guard: Callable[..., Guard],
                                                     postfix_factory: PostfixFactory) -> None:
    g, _ = policy_guard(make_guard, backend, GREYLIST)
    assert rcpt(backend.port, "127.0.3.10") == GREYLISTED
    start = time.time()
    g.wait_for_log(r"policy: greylist, reason=new triplet, client=unknown\[127\.0\.3\.10\]:\d+, "
                   r"sender=<alice@sender\.test>, recipient=<bob@example\.test>")
    backend.wait_for_log(r"NOQUEUE: reject: RCPT from unknown\[127\.0\.3\.10\]: 450 4\.2\.0 <bob@example\.test>: "
                         r"Recipient address rejected: Greylisted")
    assert rcpt(backend.port, "127.0.3.10") == GREYLISTED  # early retry
    wait_past(start, DELAY)
    assert rcpt(backend.port, "127.0.3.10").startswith("250")
    [msg] = backend.wait_for_messages(1)
    assert b"X-Greylist: delayed " in msg and b" seconds by smtpguard-" in msg

    # A real sending MTA, retrying by itself.
    backend.flush_maildir()
    sender = postfix_factory.sender(backend.port)
    sender.start()
    sender.submit(b"Subject: via a real MTA\r\n\r\nretried by Postfix itself\r\n", "carol@sender.test",
                  "bob@example.test")
    sender.wait_for_log(r"status=deferred \(host 127\.0\.0\.1\[127\.0\.0\.1\] said: 450 4\.2\.0 "
                        r"<bob@example\.test>: Recipient address rejected: Greylisted", timeout=20)
    [msg] = backend.wait_for_messages(1, timeout=60)
    assert b"retried by Postfix itself" in msg
    assert msg.startswith(b"X-Greylist: delayed ") or b"\nX-Greylist: delayed " in msg
    g.wait_for_log(r"policy: pass, reason=triplet passed, delayed \d+s, client=localhost\[127\.0\.0\.1\]|"
                   r"policy: pass, reason=triplet passed, delayed \d+s, client=unknown\[127\.0\.0\.1\]")


@pytest.mark.dns
def test_rhsbl_listed_sender_is_rejected_with_the_list_name(backend: PrivatePostfix,
                                                              make_guard: Callable[..., Guard],
                                                              dns_server: Callable[..., Any]) -> None:
    dns = dns_server(["--address=/spam.test.dbl.test/127.0.1.2",
                      "--txt-record=spam.test.dbl.test,listed for testing"])
    policy_guard(make_guard, backend, policy_keys='checks = ["rhsbl_sender", "greylist"]\n', extra=
                 f'[dns]\nnameservers = ["{dns.address}:{dns.port}"]\ntimeout = "0.5s"\nlifetime = "1s"\n'
                 '[rhsbl]\nsender_sites = ["dbl.test"]\n' + GREYLIST)
    assert rcpt(backend.port, "127.0.3.30", sender="x@spam.test") == (
        "554 5.7.1 <bob@example.test>: Recipient address rejected: Service unavailable; Sender address "
        "[x@spam.test] blocked using dbl.test; listed for testing")
    # A sender that is not listed goes on to greylisting.
    assert rcpt(backend.port, "127.0.3.30") == GREYLISTED


def test_policy_service_down_gives_postfix_default_action(backend: PrivatePostfix) -> None:
    port = free_port()  # nobody listens there
    backend.postconf(smtpd_recipient_restrictions=f"reject_unauth_destination, "
                                                  f"check_policy_service inet:127.0.0.1:{port}",
                     smtpd_policy_service_retry_delay="1s")
    assert rcpt(backend.port, "127.0.3.20") == ("451 4.3.5 <bob@example.test>: Recipient address rejected: "
                                                 "Server configuration problem")
    backend.wait_for_log(r"warning: problem talking to server 127\.0\.0\.1:\d+")
    # With smtpd_policy_service_default_action = DUNNO, Postfix goes on without it.
    backend.postconf(smtpd_policy_service_default_action="DUNNO")
    assert rcpt(backend.port, "127.0.3.20").startswith("250")


# ------------------------------------------------------------ one Redis, two modes

def policy_request(port: int, client: str, sender: str, recipient: str, instance: str) -> str:
    """One request as Postfix's smtpd writes it; the action."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\n"
                  f"client_address={client}\nclient_name=unknown\nreverse_client_name=unknown\n"
                  f"helo_name=client.example\nsender={sender}\nrecipient={recipient}\ninstance={instance}\n\n"
                  .encode())
        buf = b""
        while not buf.endswith(b"\n\n"):
            chunk = s.recv(4096)
            assert chunk, buf
            buf += chunk
    return buf.decode().removeprefix("action=").rstrip("\n")


@pytest.mark.redis
def test_front_end_and_policy_service_share_one_redis(backend: PrivatePostfix, make_guard: Callable[..., Guard],
                                                       redis_url: str) -> None:
    front = make_guard(backend.port, GREYLIST + "enabled = true\n", state_url=redis_url)
    port = free_port()
    policy = make_guard(backend.port, f'[policy]\nlisten = "127.0.0.1:{port}"\n' + GREYLIST, command="policy",
                        state_url=redis_url)
    # Front end first: the policy service knows the triplet.
    c1 = "127.0.9.1"
    assert rcpt(front.port, c1).startswith("450 4.2.0")
    start = time.time()
    assert policy_request(port, c1, "alice@sender.test", "bob@example.test", "i1").startswith(
        "DEFER_IF_PERMIT 4.2.0 Greylisted")
    policy.wait_for_log(r"policy: greylist, reason=early retry")
    wait_past(start, DELAY)
    assert policy_request(port, c1, "alice@sender.test", "bob@example.test", "i2").startswith(
        "PREPEND X-Greylist: delayed ")
    assert rcpt(front.port, c1).startswith("250")
    front.wait_for_log(r"greylist: pass, reason=triplet known, client=unknown\[127\.0\.9\.1\]")
    # Policy service first: the front end knows the triplet.
    c2 = "127.0.10.1"
    assert policy_request(port, c2, "dave@sender.test", "bob@example.test", "i3").startswith("DEFER_IF_PERMIT")
    start = time.time()
    assert rcpt(front.port, c2, sender="dave@sender.test").startswith("450 4.2.0")
    front.wait_for_log(r"greylist: greylist, reason=early retry")
    wait_past(start, DELAY)
    assert rcpt(front.port, c2, sender="dave@sender.test").startswith("250")
    front.wait_for_log(r"greylist: pass, reason=triplet passed")
    assert policy_request(port, c2, "dave@sender.test", "bob@example.test", "i4") == "DUNNO"
    policy.wait_for_log(r"policy: pass, reason=triplet known, client=unknown\[127\.0\.10\.1\]")


def test_hot_reload_and_a_refused_reload(make_guard: Callable[..., Guard]) -> None:
    port = free_port()
    head = f'[policy]\nlisten = "127.0.0.1:{port}"\n'
    g = make_guard(free_port(), head + GREYLIST + 'text = "first text"\n', command="policy")
    assert policy_request(port, "127.0.11.1", "a@sender.test", "b@example.test", "r1") == \
        "DEFER_IF_PERMIT 4.2.0 first text"
    g.extra = head + GREYLIST + 'text = "second text"\n'
    g.write_config()
    g.mark()
    assert g.proc is not None
    g.proc.send_signal(signal.SIGHUP)
    g.wait_for_log(r"reload: configuration .* loaded")
    assert policy_request(port, "127.0.11.2", "a@sender.test", "b@example.test", "r2") == \
        "DEFER_IF_PERMIT 4.2.0 second text"
    g.extra = head + 'checks = ["rhsbl_helo"]\n' + GREYLIST  # no [rhsbl] helo_sites: refused
    g.write_config()
    g.proc.send_signal(signal.SIGHUP)
    g.wait_for_log(r"reload: configuration .* refused, the running configuration stays: "
                   r"policy\.checks: rhsbl_helo needs \[rhsbl\] helo_sites")
    assert policy_request(port, "127.0.11.3", "a@sender.test", "b@example.test", "r3") == \
        "DEFER_IF_PERMIT 4.2.0 second text"
