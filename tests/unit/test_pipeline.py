"""The pipeline without sockets: precedence, delayed rejects, the allowlist
cache and rate counters on a fake clock (no sleeping)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from smtpguard.config import Config, from_dict
from smtpguard.net import parse_ip
from smtpguard.pipeline import Pipeline
from smtpguard.session import Session
from smtpguard.store import MemoryStore
from smtpguard.verdict import Action, Verdict


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make(data: dict[str, Any] | None = None, handoff_allowed: bool = True) -> tuple[Pipeline, FakeClock, MemoryStore]:
    clock = FakeClock()
    store = MemoryStore(clock)
    return Pipeline(from_dict(data or {}), store, clock, handoff_allowed=handoff_allowed), clock, store


def session(ip: str = "192.0.2.7") -> Session:
    return Session(parse_ip(ip), 40123, "198.51.100.1", 25)


def code(v: Verdict) -> tuple[Action, int | None]:
    return v.action, v.reply.code if v.reply else None


CONT = (Action.CONTINUE, None)


# ---------------------------------------------------------------- connect precedence

async def test_precedence_cap_before_count_before_rate(tmp_path: Path) -> None:
    table = tmp_path / "clients"
    table.write_text("192.0.2.7 OK\n")
    p, _, _ = make({"server": {"max_connections": 10}, "limits": {"connection_count_limit": 2,
                                                                  "connection_rate_limit": 1},
                    "access": {"client_table": f"cidr:{table}"}})
    s = session()
    # global cap wins over everything, even the access table's OK
    assert code(await p.on_connect(s, active=11, concurrent=5)) == (Action.DROP, 421)
    assert str((await p.on_connect(s, 11, 5)).reply) == "421 4.3.2 All server ports are busy"
    # then per-client concurrency (the rate counter is not even consulted)
    v = await p.on_connect(s, 1, 3)
    assert str(v.reply) == "421 4.7.0 Error: too many connections from 192.0.2.7"
    # then the rate: first connection in the window passes, the second is over 1
    assert code(await p.on_connect(session(), 1, 1)) == CONT
    assert code(await p.on_connect(session(), 1, 1)) == (Action.DROP, 421)


async def test_access_permit_allowlists_and_skips_the_tests(tmp_path: Path) -> None:
    table = tmp_path / "clients"
    table.write_text("192.0.2.7 permit\n192.0.2.8 REJECT\n")
    p, _, _ = make({"access": {"client_table": f"cidr:{table}"}})
    s = session()
    assert code(await p.on_connect(s, 1, 1)) == CONT
    assert s.allowlisted and "pregreet" not in s.todo
    s.helo = "localhost"  # would be "You are not me" from a non-local client
    assert code(await p.on_helo(s)) == CONT
    assert code(await p.on_command(s, b"GET /\r\n", "GET", b"", "EHLO")) == CONT
    rejected = session("192.0.2.8")
    assert code(await p.on_connect(rejected, 1, 1)) == CONT  # enforce: answered at RCPT
    rejected.sender = "a@b.example"
    v = await p.on_rcpt(rejected, "c@d.example")
    assert str(v.reply) == "554 5.7.1 <unknown[192.0.2.8]>: Client host rejected: Access denied"


# ---------------------------------------------------------------- allowlist cache

async def test_pass_new_then_pass_old_then_expiry(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="smtpguard")
    p, clock, store = make()
    s = session()
    await p.on_connect(s, 1, 1)
    assert s.todo == {"pregreet", "pipelining", "non_smtp", "bare_newline"}
    assert "pregreet" in s.todo
    assert code(await p.on_greet(s, b"", 0.0)) == CONT
    assert "pregreet" not in s.todo and "PASS NEW" not in caplog.text
    await p.on_relayed(s)
    assert "PASS NEW [192.0.2.7]:40123" in caplog.text
    await store.write_behind.wait()  # cache writes are off the reply path
    cache = await store.get_cache("192.0.2.7")
    assert cache["pregreet"] == clock.now + 86400 and cache["pipelining"] == clock.now + 30 * 86400

    s2 = session()
    await p.on_connect(s2, 1, 1)
    assert s2.todo == frozenset() and "pregreet" not in s2.todo
    assert "PASS OLD [192.0.2.7]:40123" in caplog.text

    clock.now += 86400 + 1  # pregreet expired, the 30-day tests not
    s3 = session()
    await p.on_connect(s3, 1, 1)
    assert s3.todo == {"pregreet"} and "pregreet" in s3.todo


async def test_handoff_for_allowlisted_and_pass_old_clients_greylisting_would_not_see(tmp_path: Path) -> None:
    table = tmp_path / "clients"
    table.write_text("192.0.2.9 permit\n")
    grey_clients = tmp_path / "greylist_clients"
    grey_clients.write_text("192.0.2.11\n")
    handoff = {"socket": "/var/spool/postfix/public/smtpguard"}
    greylisting = {"enabled": True, "client_allowlist": str(grey_clients)}
    for greylist, handed_off in (({}, {"192.0.2.9", "192.0.2.10", "192.0.2.11"}),
                                 (greylisting, {"192.0.2.9", "192.0.2.11"})):
        p, _, store = make({"handoff": handoff, "greylist": greylist, "access": {"client_table": f"cidr:{table}"}})
        for ip in ("192.0.2.10", "192.0.2.11", "192.0.2.12"):  # cached passes; .12's pregreet expired
            await store.put_cache(ip, {t: 2e6 for t in ("pregreet", "pipelining", "non_smtp", "bare_newline")})
        await store.put_cache("192.0.2.12", {"pregreet": 0.0})
        for ip in ("192.0.2.9", "192.0.2.10", "192.0.2.11", "192.0.2.12", "192.0.2.13"):
            v = await p.on_connect(session(ip), 1, 1)
            assert v.action is (Action.PASS if ip in handed_off else Action.CONTINUE), (greylist, ip)
    # IPv6 clients only with handoff.ipv6 (Postfix with inet_protocols = all).
    table.write_text("2001:db8::/32 permit\n")
    for ipv6 in (False, True):
        p, _, _ = make({"handoff": {**handoff, "ipv6": ipv6}, "access": {"client_table": f"cidr:{table}"}})
        v = await p.on_connect(session("2001:db8::7"), 1, 1)
        assert v.action is (Action.PASS if ipv6 else Action.CONTINUE)
    # Without [handoff] socket, nobody; nor when the pass service was not found safe (handoff_allowed).
    p, _, store = make({"access": {"client_table": f"cidr:{table}"}})
    assert code(await p.on_connect(session("2001:db8::7"), 1, 1)) == CONT
    p, _, store = make({"handoff": {**handoff, "ipv6": True}, "access": {"client_table": f"cidr:{table}"}},
                       handoff_allowed=False)
    assert code(await p.on_connect(session("2001:db8::7"), 1, 1)) == CONT


async def test_failed_test_is_not_cached_and_rejects_at_rcpt(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="smtpguard")
    p, _, store = make()
    s = session()
    await p.on_connect(s, 1, 1)
    assert code(await p.on_greet(s, b"EHLO bot\r\n", 0.25)) == CONT  # enforce: keep talking
    assert "PREGREET 10 after 0.25 from [192.0.2.7]:40123: EHLO bot\\r\\n" in caplog.text
    await store.write_behind.wait()
    assert (await store.get_cache("192.0.2.7")).get("pregreet", 0.0) == 0.0
    s.helo, s.sender = "bot", "x@y.example"
    assert str((await p.on_rcpt(s, "a@b.example")).reply) == "550 5.5.1 Protocol error"
    await p.on_relayed(s)  # cannot happen after a reject, but even so: no PASS NEW
    assert "PASS NEW" not in caplog.text


async def test_pregreet_drop_verdict() -> None:
    p, _, _ = make({"pregreet": {"action": "drop"}})
    s = session()
    await p.on_connect(s, 1, 1)
    assert code(await p.on_greet(s, b"x", 0.0)) == (Action.DROP, 521)


async def test_disabled_tests_are_not_in_the_cache_record() -> None:
    p, _, _ = make({"pregreet": {"enabled": False}, "pipelining": {"enabled": False},
                    "non_smtp": {"enabled": False}, "bare_newline": {"enabled": False}})
    s = session()
    await p.on_connect(s, 1, 1)
    assert s.todo == frozenset() and "pregreet" not in s.todo


# ---------------------------------------------------------------- per command

async def test_pipelining_and_non_smtp_per_command() -> None:
    p, _, _ = make()
    s = session()
    await p.on_connect(s, 1, 1)
    assert code(await p.on_command(s, b"EHLO x\r\n", "EHLO", b"", "")) == CONT
    s.advertised = True
    assert code(await p.on_command(s, b"MAIL FROM:<a@b>\r\n", "MAIL", b"RCPT TO:<c@d>\r\n", "EHLO")) == CONT
    assert code(await p.on_command(s, b"DATA\r\n", "DATA", b"Subject: x\r\n", "RCPT")) == CONT
    assert str((await p.on_data(s)).reply) == "550 5.5.1 Protocol error"
    assert code(await p.on_command(s, b"GET / HTTP/1.0\r\n", "GET", b"", "DATA")) == (Action.DROP, 521)


async def test_error_and_command_limits() -> None:
    p, _, _ = make({"errors": {"hard_limit": 3, "soft_limit": 1, "command_count_limit": 4}})
    s = session()
    await p.on_connect(s, 1, 1)
    s.commands = 4
    assert code(await p.on_command(s, b"NOOP\r\n", "NOOP", b"", "NOOP")) == CONT
    s.commands = 5
    assert str((await p.on_command(s, b"NOOP\r\n", "NOOP", b"", "NOOP")).reply) == (
        "421 4.7.0 localhost Error: too many commands")
    s.screened = True  # after the first relayed recipient the count no longer applies
    assert code(await p.on_command(s, b"NOOP\r\n", "NOOP", b"", "NOOP")) == CONT
    s.errors = 3
    assert str((await p.on_command(s, b"NOOP\r\n", "NOOP", b"", "NOOP")).reply) == (
        "421 4.7.0 localhost Error: too many errors")


# ---------------------------------------------------------------- delayed rejects

async def test_helo_reject_is_delayed_to_rcpt_and_a_new_helo_is_judged_afresh() -> None:
    p, _, _ = make({"helo": {"reject_non_fqdn": True}})
    s = session()
    await p.on_connect(s, 1, 1)
    s.helo = "friend"
    assert code(await p.on_helo(s)) == CONT
    s.sender = "a@b.example"
    assert code(await p.on_mail(s)) == CONT
    v = await p.on_rcpt(s, "c@d.example")
    assert str(v.reply) == "504 5.5.2 <friend>: Helo command rejected: need fully-qualified hostname"
    s.helo = "mail.example.net"
    await p.on_helo(s)
    assert code(await p.on_rcpt(s, "c@d.example")) == CONT


async def test_delay_reject_off_answers_at_once() -> None:
    p, _, _ = make({"helo": {"reject_non_fqdn": True}, "screen": {"delay_reject": False}})
    s = session()
    await p.on_connect(s, 1, 1)
    s.helo = "friend"
    assert code(await p.on_helo(s)) == (Action.REJECT, 504)


async def test_sender_reject_lasts_one_transaction() -> None:
    p, _, _ = make({"addresses": {"reject_non_fqdn_sender": True}})
    s = session()
    await p.on_connect(s, 1, 1)
    s.helo, s.sender = "mail.example.net", "a@nodot"
    assert code(await p.on_mail(s)) == CONT
    assert code(await p.on_rcpt(s, "c@d.example")) == (Action.REJECT, 504)
    s.reset_transaction()
    s.sender = "a@b.example"
    await p.on_mail(s)
    assert code(await p.on_rcpt(s, "c@d.example")) == CONT


async def test_helo_required_and_syntax_errors_are_immediate() -> None:
    p, _, _ = make({"helo": {"required": True}, "addresses": {"strict_syntax": True}})
    s = session()
    await p.on_connect(s, 1, 1)
    s.sender = "a@b.example"
    assert str((await p.on_mail(s)).reply) == "503 5.5.1 Error: send HELO/EHLO first"
    s.helo, s.sender = "mail.example.net", "a..b@b.example"
    assert str((await p.on_mail(s)).reply) == "501 5.1.7 Bad sender address syntax"


async def test_helo_ignore_logs_reject_warning(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="smtpguard")
    p, _, _ = make({"helo": {"action": "ignore", "reject_non_fqdn": True}})
    s = session()
    await p.on_connect(s, 1, 1)
    s.helo, s.esmtp = "friend", True
    assert code(await p.on_helo(s)) == CONT
    assert ("NOQUEUE: reject_warning: EHLO from unknown[192.0.2.7]:40123: 504 5.5.2 <friend>: Helo command "
            "rejected: need fully-qualified hostname; proto=ESMTP helo=<friend>") in caplog.text


# ---------------------------------------------------------------- tables, store

def test_default_config_builds_a_pipeline() -> None:
    p = Pipeline(Config())
    assert all(t is None for t in p.tables.values())


async def test_access_warn_logs_smtpd_warn_lines(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="smtpguard")
    clients = tmp_path / "clients"
    clients.write_text("192.0.2.7 WARN suspicious client\n")
    helos = tmp_path / "helos"
    helos.write_text("odd.example WARN odd helo\n")
    p, _, _ = make({"access": {"client_table": f"cidr:{clients}"}, "helo": {"access_table": f"texthash:{helos}"}})
    s = session()
    assert code(await p.on_connect(s, 1, 1)) == CONT
    s.helo, s.esmtp = "odd.example", True
    assert code(await p.on_helo(s)) == CONT
    lines = [r.getMessage() for r in caplog.records if "warn:" in r.getMessage()]
    assert lines == [
        "NOQUEUE: warn: CONNECT from unknown[192.0.2.7]:40123: suspicious client; proto=SMTP",
        "NOQUEUE: warn: EHLO from unknown[192.0.2.7]:40123: odd helo; proto=ESMTP helo=<odd.example>",
    ]


async def test_access_warn_text_is_not_parsed_back(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The WARN text reaches the log whole (a ``;`` in it included), and
    client text that looks like a WARN (a quoted local part) is no warning."""
    caplog.set_level(logging.INFO, logger="smtpguard")
    rcpts = tmp_path / "rcpts"
    rcpts.write_text("watched@example.net WARN watched; tell abuse\n")
    p, _, _ = make({"addresses": {"recipient_access_table": f"texthash:{rcpts}"}})
    s = session()
    s.helo, s.esmtp = "mx.example.org", True
    s.sender = '"x>: WARN forged"@example.org'
    assert code(await p.on_mail(s)) == CONT
    assert code(await p.on_rcpt(s, "watched@example.net")) == CONT
    lines = [r.getMessage() for r in caplog.records if "warn:" in r.getMessage()]
    assert lines == [
        "NOQUEUE: warn: RCPT from unknown[192.0.2.7]:40123: watched; tell abuse; "
        'from=<"x>: WARN forged"@example.org> to=<watched@example.net> proto=ESMTP helo=<mx.example.org>',
    ]


class BrokenStore(MemoryStore):
    """A store whose backend fails every call."""

    backend_errors = (ConnectionError,)

    def __init__(self) -> None:
        super().__init__(FakeClock())

    async def _get_tests(self, ip: str, now: float) -> dict[str, float]:
        raise ConnectionError("redis down")

    async def _put_tests(self, ip: str, tests: dict[str, float], now: float) -> None:
        raise ConnectionError("redis down")

    async def _hit_rate(self, key: str, window: float, now: float) -> int:
        raise ConnectionError("redis down")


async def test_store_failure_fails_open(caplog: pytest.LogCaptureFixture) -> None:
    store = BrokenStore()
    p = Pipeline(from_dict({"limits": {"connection_rate_limit": 1}}), store, FakeClock())
    s = session()
    assert code(await p.on_connect(s, 1, 1)) == CONT  # no rate known: not limited
    assert s.todo == {"pregreet", "pipelining", "non_smtp", "bare_newline"}  # no cache: all tests run
    assert code(await p.on_greet(s, b"", 0.0)) == CONT
    await p.on_relayed(s)
    await store.write_behind.wait()
    assert "state store: rate for conn:192.0.2.7 unknown, not limited: memory: redis down" in caplog.text
    assert "state store: allowlist cache update for 192.0.2.7 failed: memory: redis down" in caplog.text


# ---------------------------------------------------------------- greylisting

async def test_greylisting_runs_last_per_recipient_on_a_fake_clock(tmp_path: Path) -> None:
    table = tmp_path / "clients"
    table.write_text("192.0.2.99 OK\n")
    p, clock, store = make({"greylist": {"enabled": True, "use_default_client_allowlist": False},
                            "addresses": {"reject_non_fqdn_recipient": True},
                            "access": {"client_table": f"cidr:{table}"}})
    s = session()
    await p.on_connect(s, 1, 1)
    s.sender = "a@b.example"
    # Another check's reject wins: greylisting is not even consulted.
    assert code(await p.on_rcpt(s, "bob")) == (Action.REJECT, 504)
    # on_rcpt is the screening before Postfix: it never greylists.
    assert code(await p.on_rcpt(s, "c@d.example")) == CONT
    assert (await store.stats()).greylist == 0
    # on_greylist: after Postfix accepted the recipient.
    v = await p.on_greylist(s, "c@d.example")
    assert code(v) == (Action.DEFER, 450) and "Greylisted" in str(v.reply)
    clock.now += 299
    assert code(await p.on_greylist(s, "c@d.example")) == (Action.DEFER, 450)  # early retry
    clock.now += 2
    assert code(await p.on_greylist(s, "c@d.example")) == CONT
    assert code(await p.on_greylist(s, "e@d.example")) == (Action.DEFER, 450)  # per recipient
    # A client the access table allowlisted is never greylisted.
    ok = session("192.0.2.99")
    await p.on_connect(ok, 1, 1)
    ok.sender = "a@b.example"
    assert code(await p.on_greylist(ok, "x@d.example")) == CONT


async def test_dnswl_client_is_not_greylisted() -> None:
    p, _, store = make({"greylist": {"enabled": True, "use_default_client_allowlist": False}})
    s = session("192.0.2.50")
    await p.on_connect(s, 1, 1)
    s.dnswl = True  # what the DNSBL/DNSWL score at or below allowlist_threshold sets
    s.sender = "a@b.example"
    assert code(await p.on_greylist(s, "c@d.example")) == CONT
    assert (await store.stats()).greylist == 0


# ---------------------------------------------------------------- postscreen_access_list (issue 17)

POSTSCREEN_ACCESS_CIDR = "192.168.1.5 reject\n10.0.0.0/8 reject\n198.51.100.0/24 permit\n"


async def test_migrated_postscreen_access_list_behaves_as_in_postfix(tmp_path: Path) -> None:
    """postscreen_access_list = permit_mynetworks, cidr:/etc/postfix/postscreen_access.cidr,
    mynetworks = 192.168.0.0/16: the first entry with an answer decides."""
    table = tmp_path / "postscreen_access.cidr"
    table.write_text(POSTSCREEN_ACCESS_CIDR)
    p, _, _ = make({"access": {"client_table": f"permit_mynetworks, cidr:{table}",
                               "mynetworks": ["192.168.0.0/16"]}})
    inside = session("192.168.1.5")  # permit_mynetworks comes first: its reject line is never reached
    assert code(await p.on_connect(inside, 1, 1)) == CONT and inside.allowlisted
    listed = session("198.51.100.9")
    assert code(await p.on_connect(listed, 1, 1)) == CONT and listed.allowlisted
    blocked = session("10.1.2.3")
    assert code(await p.on_connect(blocked, 1, 1)) == CONT and not blocked.allowlisted
    assert str(blocked.delayed["connect"].reply) == "554 5.7.1 <unknown[10.1.2.3]>: Client host rejected: Access denied"
    other = session("203.0.113.5")
    assert code(await p.on_connect(other, 1, 1)) == CONT and not other.allowlisted and not other.delayed
    # the other order: the cidr table's reject comes first
    p, _, _ = make({"access": {"client_table": [f"cidr:{table}", "permit_mynetworks"],
                               "mynetworks": ["192.168.0.0/16"]}})
    again = session("192.168.1.5")
    await p.on_connect(again, 1, 1)
    assert not again.allowlisted and again.delayed


async def test_dunno_ends_the_access_list(tmp_path: Path) -> None:
    first, second = tmp_path / "first.cidr", tmp_path / "second.cidr"
    first.write_text("192.0.2.8 dunno\n")
    second.write_text("192.0.2.0/24 reject\n")
    p, _, _ = make({"access": {"client_table": [f"cidr:{first}", f"cidr:{second}"]}})
    s = session("192.0.2.8")
    await p.on_connect(s, 1, 1)
    assert not s.delayed and not s.allowlisted
    s = session("192.0.2.9")
    await p.on_connect(s, 1, 1)
    assert s.delayed
