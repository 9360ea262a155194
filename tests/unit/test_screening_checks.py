"""Table-driven tests of the pure screening checks (no sockets, no clock)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from smtpguard.checks._common import escape
from smtpguard.checks.access import AccessConfig, check_client_access
from smtpguard.checks.barenewline import BareNewlineConfig, check_bare_newline
from smtpguard.checks.errors import ErrorsConfig, check_command_count, check_error_limit, error_delay
from smtpguard.checks.limits import LimitsConfig, check_connection_count, check_connection_rate, parse_network
from smtpguard.checks.nonsmtp import NonSmtpConfig, check_non_smtp
from smtpguard.checks.pipelining import PipeliningConfig, check_pipelining
from smtpguard.checks.pregreet import PregreetConfig, check_pregreet
from smtpguard.config import Config, ConfigError, from_dict, load_section
from smtpguard.net import parse_ip
from smtpguard.tables import open_access_table
from smtpguard.verdict import Action, Outcome, Result

PEER = "[192.0.2.7]:40123"


def summary(r: Result) -> tuple[Outcome, Action, str | None]:
    return r.outcome, r.verdict.action, str(r.verdict.reply) if r.verdict.reply else None


FAIL_ENFORCE = (Outcome.FAIL, Action.REJECT, "550 5.5.1 Protocol error")
FAIL_DROP = (Outcome.FAIL, Action.DROP, "521 5.7.1 Protocol error")
FAIL_IGNORE = (Outcome.FAIL, Action.CONTINUE, None)
PASS = (Outcome.PASS, Action.CONTINUE, None)
SKIP = (Outcome.SKIP, Action.CONTINUE, None)


@pytest.mark.parametrize(("data", "text"), [
    (b"EHLO bot\r\n", "EHLO bot\\r\\n"),
    (b"a\\b\t\x00\xff", "a\\\\b\\t\\000\\377"),
    (b"x" * 200, "x" * 100),
])
def test_escape_like_postscreen(data: bytes, text: str) -> None:
    assert escape(data) == text


@pytest.mark.parametrize(("cfg", "received", "expected"), [
    (PregreetConfig(), b"", PASS),
    (PregreetConfig(), b"EHLO bot\r\n", FAIL_ENFORCE),
    (PregreetConfig(action="drop"), b"EHLO bot\r\n", FAIL_DROP),
    (PregreetConfig(action="ignore"), b"EHLO bot\r\n", FAIL_IGNORE),
    (PregreetConfig(action="tempfail"), b"x", (Outcome.FAIL, Action.DEFER, "450 4.5.1 Protocol error")),
    (PregreetConfig(enabled=False), b"EHLO bot\r\n", SKIP),
])
def test_pregreet(cfg: PregreetConfig, received: bytes, expected: tuple[Any, ...]) -> None:
    r = check_pregreet(cfg, received, 0.2, PEER)
    assert summary(r) == expected
    if received and cfg.enabled:
        assert r.reason == f"PREGREET {len(received)} after 0.20 from {PEER}: {escape(received)}"


@pytest.mark.parametrize(("command", "advertised", "pending", "expected"), [
    ("EHLO", False, b"", PASS),
    ("EHLO", False, b"MAIL FROM:<a@b>\r\n", FAIL_ENFORCE),  # before our EHLO reply
    ("HELO", False, b"MAIL FROM:<a@b>\r\n", FAIL_ENFORCE),
    ("MAIL", False, b"RCPT TO:<a@b>\r\n", FAIL_ENFORCE),  # HELO session: PIPELINING never offered
    ("MAIL", True, b"RCPT TO:<a@b>\r\n", PASS),
    ("RCPT", True, b"DATA\r\n", PASS),
    ("RSET", True, b"MAIL FROM:<a@b>\r\n", PASS),
    ("DATA", True, b"Subject: x\r\n", FAIL_ENFORCE),  # must wait for 354
    ("EHLO", True, b"MAIL FROM:<a@b>\r\n", FAIL_ENFORCE),  # a second EHLO ends its group
    ("NOOP", True, b"MAIL FROM:<a@b>\r\n", FAIL_ENFORCE),
    ("QUIT", True, b"x", FAIL_ENFORCE),
    ("VRFY", True, b"x", FAIL_ENFORCE),
])
def test_pipelining(command: str, advertised: bool, pending: bytes, expected: tuple[Any, ...]) -> None:
    r = check_pipelining(PipeliningConfig(), command, advertised, pending, PEER)
    assert summary(r) == expected
    if r.outcome is Outcome.FAIL:
        assert r.reason == f"COMMAND PIPELINING from {PEER} after {command}: {escape(pending)}"


def test_pipelining_disabled() -> None:
    assert summary(check_pipelining(PipeliningConfig(enabled=False), "DATA", True, b"x", PEER)) == SKIP


@pytest.mark.parametrize(("line", "expected"), [
    (b"EHLO client.example\r\n", PASS),
    (b"MAIL FROM:<a@b>\r\n", PASS),
    (b"GET / HTTP/1.1\r\n", FAIL_DROP),
    (b"post /x HTTP/1.0\r\n", FAIL_DROP),
    (b"CONNECT mx:25 HTTP/1.0\r\n", FAIL_DROP),
    (b"Subject: hello\r\n", FAIL_DROP),
    (b"Host: x\r\n", FAIL_DROP),
    (b"X-Mailer:foo\r\n", FAIL_DROP),
    (b"\r\n", PASS),
    (b"FOO bar: baz\r\n", PASS),  # an unknown command, not a header
])
def test_non_smtp(line: bytes, expected: tuple[Any, ...]) -> None:
    r = check_non_smtp(NonSmtpConfig(), line, "CONNECT", PEER)
    assert summary(r) == expected
    if r.outcome is Outcome.FAIL:
        assert r.reason.startswith(f"NON-SMTP COMMAND from {PEER} after CONNECT: ")


def test_non_smtp_forbidden_commands_configurable() -> None:
    cfg = dataclasses.replace(from_dict({"non_smtp": {"forbidden_commands": ["put"]}}).non_smtp, action="enforce")
    assert cfg.forbidden_commands == ("PUT",)
    assert summary(check_non_smtp(cfg, b"PUT /x\r\n", "EHLO", PEER)) == FAIL_ENFORCE
    assert summary(check_non_smtp(cfg, b"GET /x\r\n", "EHLO", PEER)) == PASS


@pytest.mark.parametrize(("cfg", "line", "expected"), [
    (BareNewlineConfig(), b"EHLO x\r\n", PASS),
    (BareNewlineConfig(), b"EHLO x\n", FAIL_IGNORE),  # postscreen's default: log only
    (BareNewlineConfig(action="enforce"), b"EHLO x\n", FAIL_ENFORCE),
    (BareNewlineConfig(action="drop"), b"EHLO x\n", FAIL_DROP),
    (BareNewlineConfig(enabled=False), b"EHLO x\n", SKIP),
])
def test_bare_newline(cfg: BareNewlineConfig, line: bytes, expected: tuple[Any, ...]) -> None:
    r = check_bare_newline(cfg, line, "EHLO", PEER)
    assert summary(r) == expected
    if r.outcome is Outcome.FAIL:
        assert r.reason == f"BARE NEWLINE from {PEER} after EHLO"


@pytest.mark.parametrize(("cfg", "errors", "delay"), [
    (ErrorsConfig(), 0, 0.0),
    (ErrorsConfig(), 9, 0.0),
    (ErrorsConfig(), 10, 1.0),
    (ErrorsConfig(), 19, 1.0),
    (ErrorsConfig(error_sleep=0.5, soft_limit=2), 2, 0.5),
    (ErrorsConfig(soft_limit=0), 50, 0.0),
    (ErrorsConfig(action="ignore"), 15, 0.0),
    (ErrorsConfig(enabled=False), 15, 0.0),
])
def test_error_delay(cfg: ErrorsConfig, errors: int, delay: float) -> None:
    assert error_delay(cfg, errors) == delay


@pytest.mark.parametrize(("cfg", "errors", "expected"), [
    (ErrorsConfig(), 19, PASS),
    (ErrorsConfig(), 20, (Outcome.FAIL, Action.DROP, "421 4.7.0 mx.test Error: too many errors")),
    (ErrorsConfig(action="ignore"), 20, FAIL_IGNORE),
    (ErrorsConfig(hard_limit=0), 100, SKIP),
])
def test_hard_error_limit(cfg: ErrorsConfig, errors: int, expected: tuple[Any, ...]) -> None:
    r = check_error_limit(cfg, errors, "mx.test", "RCPT", "unknown[192.0.2.7]:40123")
    assert summary(r) == expected
    if r.outcome is Outcome.FAIL:
        assert r.reason == "too many errors after RCPT from unknown[192.0.2.7]:40123"


@pytest.mark.parametrize(("limit", "commands", "expected"), [
    (20, 20, PASS),
    (20, 21, (Outcome.FAIL, Action.DROP, "421 4.7.0 mx.test Error: too many commands")),
    (0, 1000, SKIP),
])
def test_command_count(limit: int, commands: int, expected: tuple[Any, ...]) -> None:
    assert summary(check_command_count(ErrorsConfig(command_count_limit=limit), commands, "mx.test", PEER)) == expected


def test_errors_config_validation() -> None:
    with pytest.raises(ConfigError, match=r"errors\.soft_limit: must not exceed hard_limit \(5\)"):
        load_section(ErrorsConfig, {"soft_limit": 10, "hard_limit": 5}, "errors")


TOO_MANY = (Outcome.FAIL, Action.DROP, "421 4.7.0 Error: too many connections from 192.0.2.7")


@pytest.mark.parametrize(("cfg", "count", "expected"), [
    (LimitsConfig(), 50, PASS),
    (LimitsConfig(), 51, TOO_MANY),
    (LimitsConfig(connection_count_limit=5), 6, TOO_MANY),
    (LimitsConfig(connection_count_limit=0), 1000, SKIP),
    (LimitsConfig(action="ignore"), 51, FAIL_IGNORE),
    (LimitsConfig(exceptions=(parse_network("192.0.2.0/24"),)), 51, SKIP),
    (LimitsConfig(enabled=False), 51, SKIP),
])
def test_connection_count(cfg: LimitsConfig, count: int, expected: tuple[Any, ...]) -> None:
    r = check_connection_count(cfg, parse_ip("192.0.2.7"), count, PEER)
    assert summary(r) == expected
    if r.outcome is Outcome.FAIL:
        assert r.reason == f"Connection concurrency limit exceeded: {count} from {PEER} for service smtp"


@pytest.mark.parametrize(("cfg", "rate", "expected"), [
    (LimitsConfig(), 1000, SKIP),  # 0 = unlimited (Postfix's default)
    (LimitsConfig(connection_rate_limit=10), 10, PASS),
    (LimitsConfig(connection_rate_limit=10), 11, TOO_MANY),
])
def test_connection_rate(cfg: LimitsConfig, rate: int, expected: tuple[Any, ...]) -> None:
    assert summary(check_connection_rate(cfg, parse_ip("192.0.2.7"), rate, PEER)) == expected


def test_parse_network_rejects_junk() -> None:
    with pytest.raises(ValueError, match="expected a network"):
        parse_network("not-a-net")


@pytest.mark.parametrize(("ip", "cfg", "expected"), [
    ("192.0.2.7", AccessConfig(), (Outcome.FAIL, Action.REJECT,
                                   "554 5.7.1 <unknown[192.0.2.7]>: Client host rejected: Access denied")),
    ("192.0.2.7", AccessConfig(action="drop"), (Outcome.FAIL, Action.DROP,
                                                "521 5.7.1 <unknown[192.0.2.7]>: Client host rejected: Access denied")),
    ("192.0.2.7", AccessConfig(action="ignore"), FAIL_IGNORE),
    ("198.51.100.1", AccessConfig(), PASS),  # permit
    ("198.51.100.2", AccessConfig(), SKIP),  # dunno
    ("203.0.113.9", AccessConfig(), (Outcome.FAIL, Action.DROP,
                                     "421 4.7.1 <unknown[203.0.113.9]>: Client host rejected: busy")),
    ("203.0.114.9", AccessConfig(), (Outcome.FAIL, Action.DEFER,
                                     "450 4.7.1 <unknown[203.0.114.9]>: Client host rejected: later")),
    ("10.0.0.1", AccessConfig(), SKIP),  # no match
])
def test_client_access_cidr(tmp_path: Path, ip: str, cfg: AccessConfig, expected: tuple[Any, ...]) -> None:
    path = tmp_path / "access.cidr"
    path.write_text("198.51.100.2 dunno\n198.51.100.0/24 permit\n192.0.2.0/24 reject\n"
                    "203.0.113.0/24 421 busy\n203.0.114.0/24 DEFER later\n")
    assert summary(check_client_access(cfg, open_access_table(f"cidr:{path}"), parse_ip(ip))) == expected


def test_client_access_without_table_skips() -> None:
    assert summary(check_client_access(AccessConfig(), None, parse_ip("192.0.2.7"))) == SKIP


def test_every_check_section_has_the_same_shape() -> None:
    """enabled and action everywhere; ttl for the cacheable tests; every
    key documents its Postfix/postscreen equivalent (or says it has none)."""
    cfg = Config()
    for name in ("limits", "access", "pregreet", "pipelining", "non_smtp", "bare_newline", "errors", "helo",
                 "addresses"):
        section = getattr(cfg, name)
        keys = {f.name for f in dataclasses.fields(section)}
        assert {"enabled", "action"} <= keys, name
        for f in dataclasses.fields(section):
            assert "parse" in f.metadata and "equivalent" in f.metadata, f"{name}.{f.name}"
    for name in ("pregreet", "pipelining", "non_smtp", "bare_newline"):
        assert getattr(cfg, name).ttl > 0


def test_check_sections_load_from_toml_with_keys_named_in_errors() -> None:
    cfg = from_dict({"pregreet": {"greet_wait": "2s", "action": "drop"}, "limits": {"connection_count_limit": 5},
                     "errors": {"soft_limit": 3, "error_sleep": 0.5}})
    assert (cfg.pregreet.greet_wait, cfg.pregreet.action, cfg.limits.connection_count_limit) == (2.0, "drop", 5)
    assert Config().pregreet.greet_wait == 6.0  # the default stays postscreen's
    with pytest.raises(ConfigError, match=r"^pregreet\.action: expected one of"):
        from_dict({"pregreet": {"action": "reject"}})
    with pytest.raises(ConfigError, match=r"^limits\.exceptions: entry 1: expected a network"):
        from_dict({"limits": {"exceptions": ["nope"]}})
