"""Envelope address checks: RFC 5321 syntax, non-FQDN, sender/recipient access, the combined check."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from smtpguard.checks.addresses import (
    RECIPIENT,
    SENDER,
    AddressConfig,
    Role,
    check_address,
    check_address_access,
    check_address_syntax,
    reject_non_fqdn_address,
    reject_non_fqdn_recipient,
    reject_non_fqdn_sender,
    valid_address,
)
from smtpguard.config import ConfigError, load_section
from smtpguard.tables import Table, open_access_table
from smtpguard.verdict import Action, Outcome, Result


def outcome(result: Result) -> tuple[Outcome, str | None]:
    return result.outcome, str(result.verdict.reply) if result.verdict.reply else None


PASS = (Outcome.PASS, None)
SKIP = (Outcome.SKIP, None)


@pytest.mark.parametrize(
    ("address", "ascii_ok", "utf8_ok"),
    [
        ("user@example.com", True, True),
        ("first.last+tag@sub.example.co.uk", True, True),
        ("!#$%&'*+/=?^_`{|}~-@example.com", True, True),
        ('"john doe"@example.com', True, True),
        ('"a@b"@example.com', True, True),
        ('"quoted\\"pair"@example.com', True, True),
        ('""@example.com', True, True),
        ("user@[192.0.2.1]", True, True),
        ("user@[IPv6:2001:db8::1]", True, True),
        ("user@[300.0.0.1]", False, False),
        ("user@[2001:db8::1]", False, False),
        ("user@[tag:general]", False, False),
        ("a..b@example.com", False, False),
        (".a@example.com", False, False),
        ("a.@example.com", False, False),
        ("us er@example.com", False, False),
        ('"unterminated@example.com', False, False),
        ("user@-bad.example", False, False),
        ("user@bad-.example", False, False),
        ("user@exa_mple.com", False, False),
        ("user@example..com", False, False),
        ("user@example.com.", False, False),
        ("user@" + "a" * 64 + ".example", False, False),
        ("user@localhost", True, True),  # syntax only: FQDN is another check
        ("user", False, False),
        ("@example.com", False, False),
        ("user@", False, False),
        ("", False, False),
        ("üser@example.com", False, True),
        ("user@bücher.example", False, True),
        ('"grüße"@example.com', False, True),
    ],
)
def test_valid_address(address: str, ascii_ok: bool, utf8_ok: bool) -> None:
    assert valid_address(address) is ascii_ok
    assert valid_address(address, utf8=True) is utf8_ok


BAD_SENDER = (Outcome.FAIL, "501 5.1.7 Bad sender address syntax")
BAD_RECIPIENT = (Outcome.FAIL, "501 5.1.3 Bad recipient address syntax")


@pytest.mark.parametrize(
    ("address", "role", "expected"),
    [
        ("user@example.com", SENDER, PASS),
        ("", SENDER, PASS),  # the null sender
        ("", RECIPIENT, BAD_RECIPIENT),
        ("Postmaster", RECIPIENT, PASS),  # RFC 5321 4.5.1
        ("postmaster", SENDER, BAD_SENDER),
        ("a b@example.com", SENDER, BAD_SENDER),
        ("a..b@example.com", RECIPIENT, BAD_RECIPIENT),
    ],
)
def test_check_address_syntax(address: str, role: Role, expected: tuple[Outcome, str | None]) -> None:
    result = check_address_syntax(address, role)
    assert result.check == f"{role.name}_syntax"
    assert outcome(result) == expected


def non_fqdn(address: str, kind: str) -> tuple[Outcome, str]:
    return Outcome.FAIL, f"504 5.5.2 <{address}>: {kind} address rejected: need fully-qualified address"


@pytest.mark.parametrize(
    ("address", "role", "utf8", "expected"),
    [
        ("user@example.com", SENDER, False, PASS),
        ("user@example.com.", SENDER, False, PASS),
        ("user@[192.0.2.1]", SENDER, False, PASS),
        ("user@localhost", SENDER, False, non_fqdn("user@localhost", "Sender")),
        ("user@localhost", RECIPIENT, False, non_fqdn("user@localhost", "Recipient")),
        ("user", RECIPIENT, False, non_fqdn("user", "Recipient")),
        ("user@", SENDER, False, non_fqdn("user@", "Sender")),
        ("user@192.0.2.1", SENDER, False, non_fqdn("user@192.0.2.1", "Sender")),
        ("user@bad!.example", SENDER, False, non_fqdn("user@bad!.example", "Sender")),
        ("user@bücher.example", SENDER, False, non_fqdn("user@bücher.example", "Sender")),
        ("user@bücher.example", SENDER, True, PASS),
        ("", SENDER, False, SKIP),
        ("postmaster", RECIPIENT, False, SKIP),
        ("POSTMASTER", RECIPIENT, False, SKIP),
    ],
)
def test_reject_non_fqdn_address(address: str, role: Role, utf8: bool, expected: tuple[Outcome, str | None]) -> None:
    result = reject_non_fqdn_address(address, role, utf8=utf8)
    assert result.check == f"{role.name}_non_fqdn"
    assert outcome(result) == expected


def test_reject_non_fqdn_shorthands() -> None:
    assert outcome(reject_non_fqdn_sender("a@b")) == non_fqdn("a@b", "Sender")
    assert outcome(reject_non_fqdn_recipient("a@b")) == non_fqdn("a@b", "Recipient")
    assert reject_non_fqdn_sender("a@b", action="ignore").verdict.action is Action.CONTINUE


SENDER_ACCESS = """\
spammer@example.net     REJECT
example.net             550 5.7.1 Go away
ok.example.net          OK
<>                      REJECT no bounces here
info@                   DEFER_IF_PERMIT
noisy@example.org       WARN noisy sender
example.org             DUNNO
"""


@pytest.fixture
def sender_access(tmp_path: Path) -> Table:
    path = tmp_path / "sender_access"
    path.write_text(SENDER_ACCESS)
    return open_access_table(f"hash:{path}")


def sender_denied(address: str, status: str, text: str) -> tuple[Outcome, str]:
    return Outcome.FAIL, f"{status} <{address}>: Sender address rejected: {text}"


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("spammer@example.net", sender_denied("spammer@example.net", "554 5.7.1", "Access denied")),
        ("Spammer@Example.NET", sender_denied("Spammer@Example.NET", "554 5.7.1", "Access denied")),
        ("other@example.net", sender_denied("other@example.net", "550 5.7.1", "Go away")),
        ("x@mail.example.net", sender_denied("x@mail.example.net", "550 5.7.1", "Go away")),  # parent domain
        ("x@ok.example.net", PASS),  # the more specific domain wins
        ("", sender_denied("", "554 5.7.1", "no bounces here")),
        ("info@anywhere.example", sender_denied("info@anywhere.example", "450 4.7.1", "Service unavailable")),
        ("noisy@example.org", SKIP),
        ("info@example.org", SKIP),  # the domain's DUNNO comes before info@
        ("user@clean.example", SKIP),
    ],
)
def test_sender_access(sender_access: Table, address: str, expected: tuple[Outcome, str | None]) -> None:
    result = check_address_access(address, SENDER, sender_access)
    assert result.check == "sender_access"
    assert outcome(result) == expected


def test_recipient_access_with_delimiter(tmp_path: Path) -> None:
    path = tmp_path / "recipient_access"
    path.write_text("user@example.com REJECT\n")
    table = open_access_table(f"texthash:{path}")
    result = check_address_access("user+tag@example.com", RECIPIENT, table, delimiter="+")
    assert outcome(result) == (
        Outcome.FAIL,
        "554 5.7.1 <user+tag@example.com>: Recipient address rejected: Access denied",
    )
    assert outcome(check_address_access("user+tag@example.com", RECIPIENT, table)) == SKIP


@pytest.mark.parametrize(
    ("address", "role", "settings", "check", "expected"),
    [
        ("a b@example.com", SENDER, {}, "sender", PASS),  # syntax is off by default
        ("a b@example.com", SENDER, {"strict_syntax": True}, "sender_syntax", BAD_SENDER),
        ("user@localhost", SENDER, {}, "sender", PASS),
        ("user@localhost", SENDER, {"reject_non_fqdn_sender": True}, "sender_non_fqdn",
         non_fqdn("user@localhost", "Sender")),
        ("user@localhost", SENDER, {"reject_non_fqdn_recipient": True}, "sender", PASS),
        ("user@localhost", RECIPIENT, {"reject_non_fqdn_recipient": True}, "recipient_non_fqdn",
         non_fqdn("user@localhost", "Recipient")),
        ("user@localhost", RECIPIENT, {"reject_non_fqdn_sender": True}, "recipient", PASS),
        ("postmaster", RECIPIENT, {"strict_syntax": True, "reject_non_fqdn_recipient": True}, "recipient", PASS),
        ("", SENDER, {"strict_syntax": True, "reject_non_fqdn_sender": True}, "sender", PASS),
        ("user@localhost", SENDER, {"enabled": False, "reject_non_fqdn_sender": True}, "sender", SKIP),
    ],
)
def test_check_address(
    address: str, role: Role, settings: dict[str, bool], check: str, expected: tuple[Outcome, str | None]
) -> None:
    result = check_address(AddressConfig(**settings), address, role)  # type: ignore[arg-type]
    assert result.check == check
    assert outcome(result) == expected


def test_check_address_with_table(sender_access: Table) -> None:
    config = AddressConfig(reject_non_fqdn_sender=True, strict_syntax=True)
    assert outcome(check_address(config, "spammer@example.net", SENDER, sender_access)) == sender_denied(
        "spammer@example.net", "554 5.7.1", "Access denied"
    )
    # bad syntax is rejected before the table is consulted
    assert outcome(check_address(config, "spam mer@example.net", SENDER, sender_access)) == BAD_SENDER
    warned = check_address(config, "noisy@example.org", SENDER, sender_access)
    assert outcome(warned) == PASS
    assert "WARN noisy sender" in warned.reason


def test_check_address_ok_exempts(tmp_path: Path) -> None:
    path = tmp_path / "sender_access"
    path.write_text("localhost OK\n")
    table = open_access_table(f"hash:{path}")
    result = check_address(AddressConfig(reject_non_fqdn_sender=True), "root@localhost", SENDER, table)
    assert (result.check, outcome(result)) == ("sender_access", PASS)


@pytest.mark.parametrize(
    ("action", "verdict", "reply"),
    [
        ("enforce", Action.REJECT, "504 5.5.2 <u@localhost>: Sender address rejected: need fully-qualified address"),
        ("ignore", Action.CONTINUE, None),
        ("drop", Action.DROP, "521 5.7.1 <u@localhost>: Sender address rejected: need fully-qualified address"),
        ("tempfail", Action.DEFER, "450 4.5.2 <u@localhost>: Sender address rejected: need fully-qualified address"),
    ],
)
def test_check_address_action(action: str, verdict: Action, reply: str | None) -> None:
    result = check_address(AddressConfig(action=action, reject_non_fqdn_sender=True), "u@localhost", SENDER)
    assert result.outcome is Outcome.FAIL
    assert result.verdict.action is verdict
    assert (str(result.verdict.reply) if result.verdict.reply else None) == reply


def test_config_defaults_and_loading(tmp_path: Path) -> None:
    defaults = AddressConfig()
    assert (defaults.enabled, defaults.action, defaults.strict_syntax) == (True, "enforce", False)
    assert (defaults.reject_non_fqdn_sender, defaults.reject_non_fqdn_recipient) == (False, False)
    assert (defaults.sender_access_table, defaults.recipient_access_table, defaults.recipient_delimiter) == ("", "", "")
    path = tmp_path / "access"
    path.write_text("example.net REJECT\n")
    config = load_section(
        AddressConfig,
        {"sender_access_table": f"hash:{path}", "recipient_access_table": f"inline:{{ {'x@'}=OK }}",
         "recipient_delimiter": "+"},
        "addresses",
    )
    assert config.recipient_delimiter == "+"


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"action": "bounce"}, "addresses.action: expected one of ignore, enforce, drop, tempfail"),
        ({"strict_syntax": "yes"}, "addresses.strict_syntax: expected true or false"),
        ({"sender_access_table": "ldap:/etc/postfix/ldap.cf"},
         'addresses.sender_access_table: ldap:/etc/postfix/ldap.cf: unsupported table type "ldap"'),
        ({"recipient_access_table": "inline:{ x=HOLD }"},
         'addresses.recipient_access_table: inline:{ x=HOLD }: unsupported access action "HOLD"'),
    ],
)
def test_config_errors(table: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_section(AddressConfig, table, "addresses")
