"""SIGHUP: a good configuration is applied without dropping the session in
progress; a bad one is refused with a logged error and the old one stays."""

from __future__ import annotations

import signal
from collections.abc import Callable

import pytest

from tests.integration.guard import Guard, RawClient
from tests.integration.ops import scrape, value
from tests.integration.test_metrics import session
from tests.lab import PrivatePostfix

pytestmark = pytest.mark.postfix


def banner(g: Guard) -> str:
    """The final greeting line (a pregreet test sends a "220-" line first)."""
    c = RawClient(g.port)
    try:
        return c.reply().splitlines(keepends=True)[-1]
    finally:
        c.close()


def test_sighup_good_then_bad_config(backend: PrivatePostfix, make_guard: Callable[..., Guard]) -> None:
    g = make_guard(backend.port)
    assert g.proc is not None
    assert banner(g) == "220 mx.guard.test ESMTP\r\n"
    # A session in the middle of a transaction when the reload happens.
    c = session(g.port, "127.0.0.41")
    assert c.cmd("MAIL FROM:<alice@sender.test>").startswith("250")
    assert c.cmd("RCPT TO:<bob@example.test>").startswith("250")

    # 1. A good new configuration: new hostname/banner, new size limit.
    g.mark()
    good = g.config.read_text().replace('hostname = "mx.guard.test"',
                                        'hostname = "mx2.guard.test"\nmessage_size_limit = "5m"')
    g.config.write_text(good)
    g.proc.send_signal(signal.SIGHUP)
    g.wait_for_log(r"reload: configuration \S+ loaded \(generation 2; changed: server\)")
    assert banner(g) == "220 mx2.guard.test ESMTP\r\n"
    c2 = RawClient(g.port, source="127.0.0.42")
    c2.reply()
    assert "250-SIZE 5242880" in c2.cmd("EHLO client.example")
    c2.cmd("QUIT")
    c2.close()
    # The session that was open goes on and its message is delivered.
    assert c.cmd("DATA").startswith("354")
    c.send(b"Subject: across a reload\r\n\r\nbody\r\n.\r\n")
    assert c.reply().startswith("250 2.0.0 Ok: queued as ")
    assert c.cmd("QUIT").startswith("221")
    c.close()
    [msg] = backend.wait_for_messages(1)
    assert b"Subject: across a reload" in msg

    # 2. A bad one: refused, logged with the key, the running one stays.
    g.mark()
    g.config.write_text(good.replace('message_size_limit = "5m"', 'message_size_limit = "huge"'))
    g.proc.send_signal(signal.SIGHUP)
    g.wait_for_log(r"error: reload: configuration \S+ refused, the running configuration stays: "
                   r"server\.message_size_limit: expected a size")
    assert banner(g) == "220 mx2.guard.test ESMTP\r\n"
    # 3. Broken TOML: same.
    g.mark()
    g.config.write_text(good + "\n[server\n")
    g.proc.send_signal(signal.SIGHUP)
    g.wait_for_log(r"error: reload: configuration \S+ refused.*TOML syntax error")
    assert g.proc.poll() is None
    assert banner(g) == "220 mx2.guard.test ESMTP\r\n"
    s = scrape(g.metrics_port)
    assert value(s, "smtpguard_config_reloads_total", result="success") == 1
    assert value(s, "smtpguard_config_reloads_total", result="failure") == 2
    assert value(s, "smtpguard_config_last_reload_successful") == 0

    # 4. Fixed again; a listen change is reported as needing a restart.
    g.mark()
    g.config.write_text(good.replace(f'listen = ["127.0.0.1:{g.port}"]', 'listen = ["127.0.0.1:1"]'))
    g.proc.send_signal(signal.SIGHUP)
    g.wait_for_log(r"warning: reload: server\.listen changed \(127\.0\.0\.1:\d+ -> 127\.0\.0\.1:1\): "
                   r"takes effect at the next restart")
    g.wait_for_log(r"reload: configuration \S+ loaded \(generation 3; changed: no changes\)")
    assert banner(g) == "220 mx2.guard.test ESMTP\r\n"
    assert value(scrape(g.metrics_port), "smtpguard_config_last_reload_successful") == 1
