"""HELO checks: syntax, literals, impersonation, helo_access, the combined check and its config."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from smtpguard.checks.helo import (
    HeloConfig,
    check_helo,
    check_helo_access,
    reject_bare_ip_helo,
    reject_impersonation,
    reject_invalid_helo_hostname,
    reject_literal_mismatch,
    reject_non_fqdn_helo_hostname,
    require_helo,
)
from smtpguard.config import ConfigError, load_section
from smtpguard.net import parse_ip
from smtpguard.tables import Table, open_access_table
from smtpguard.verdict import Action, Outcome, Result

CLIENT = "198.51.100.7"
HOSTNAME = "mx.example.com"
OUR_ADDRESSES = ("192.0.2.1", "2001:db8::25", "0.0.0.0")


def outcome(result: Result) -> tuple[Outcome, str | None]:
    return result.outcome, str(result.verdict.reply) if result.verdict.reply else None


def invalid(helo: str) -> tuple[Outcome, str]:
    return Outcome.FAIL, f"501 5.5.2 <{helo}>: Helo command rejected: Invalid name"


def bad_literal(helo: str) -> tuple[Outcome, str]:
    return Outcome.FAIL, f"501 5.5.2 <{helo}>: Helo command rejected: invalid ip address"


def non_fqdn(helo: str) -> tuple[Outcome, str]:
    return Outcome.FAIL, f"504 5.5.2 <{helo}>: Helo command rejected: need fully-qualified hostname"


def not_me(helo: str) -> tuple[Outcome, str]:
    return Outcome.FAIL, f"554 5.7.1 <{helo}>: Helo command rejected: You are not me"


PASS = (Outcome.PASS, None)
SKIP = (Outcome.SKIP, None)


@pytest.mark.parametrize(
    ("helo", "expected"),
    [
        ("mail.example.com", PASS),
        ("mail.example.com.", PASS),  # one trailing dot is dropped
        ("localhost", PASS),
        ("under_score.example", PASS),
        ("xn--bcher-kva.example", PASS),
        ("192.0.2.1", PASS),  # a bare address is valid for Postfix (valid_hostaddr)
        ("2001:db8::1", PASS),
        ("[192.0.2.1]", PASS),
        ("[IPv6:2001:db8::1]", PASS),
        ("[ipv6:2001:db8::1]", PASS),
        ("[2001:db8::1]", bad_literal("[2001:db8::1]")),
        ("[IPv6:192.0.2.1]", bad_literal("[IPv6:192.0.2.1]")),
        ("[300.0.0.1]", bad_literal("[300.0.0.1]")),
        ("[192.0.2.1", bad_literal("[192.0.2.1")),
        ("[IPv6:fe80::1%eth0]", bad_literal("[IPv6:fe80::1%eth0]")),
        ("bad!name", invalid("bad!name")),
        ("-dash.example", invalid("-dash.example")),
        ("dash-.example", invalid("dash-.example")),
        ("double..dot", invalid("double..dot")),
        ("example.com..", invalid("example.com..")),
        ("123.456", invalid("123.456")),  # numeric but not an address
        ("a" * 64 + ".example", invalid("a" * 64 + ".example")),
        ("bücher.example", invalid("bücher.example")),  # no EAI in HELO
        (None, SKIP),
    ],
)
def test_reject_invalid_helo_hostname(helo: str | None, expected: tuple[Outcome, str | None]) -> None:
    result = reject_invalid_helo_hostname(helo)
    assert result.check == "helo_invalid"
    assert outcome(result) == expected


@pytest.mark.parametrize(
    ("helo", "expected"),
    [
        ("mail.example.com", PASS),
        ("mail.example.com.", PASS),
        ("localhost", non_fqdn("localhost")),
        ("friend", non_fqdn("friend")),
        ("192.0.2.1", non_fqdn("192.0.2.1")),  # what Postfix says for a bare address
        ("[192.0.2.1]", PASS),
        ("[bogus]", bad_literal("[bogus]")),
        ("bad!name.example", non_fqdn("bad!name.example")),
        (None, SKIP),
    ],
)
def test_reject_non_fqdn_helo_hostname(helo: str | None, expected: tuple[Outcome, str | None]) -> None:
    assert outcome(reject_non_fqdn_helo_hostname(helo)) == expected


@pytest.mark.parametrize(
    ("helo", "expected"),
    [
        ("192.0.2.1", non_fqdn("192.0.2.1")),
        ("192.0.2.1.", non_fqdn("192.0.2.1.")),
        ("2001:db8::1", non_fqdn("2001:db8::1")),
        ("[192.0.2.1]", PASS),
        ("mail.example.com", PASS),
        ("1.2.3", PASS),  # not an address (reject_invalid's business)
        (None, SKIP),
    ],
)
def test_reject_bare_ip_helo(helo: str | None, expected: tuple[Outcome, str | None]) -> None:
    assert outcome(reject_bare_ip_helo(helo)) == expected


MISMATCH = "Helo command rejected: Address literal does not match your IP address"


@pytest.mark.parametrize(
    ("helo", "client", "expected"),
    [
        ("[198.51.100.7]", "198.51.100.7", PASS),
        ("[198.51.100.7]", "::ffff:198.51.100.7", PASS),
        ("[IPv6:2001:db8::1]", "2001:DB8:0:0::1", PASS),
        ("[IPv6:::ffff:198.51.100.7]", "198.51.100.7", PASS),
        ("[192.0.2.1]", "198.51.100.7", (Outcome.FAIL, f"554 5.7.1 <[192.0.2.1]>: {MISMATCH}")),
        ("[IPv6:2001:db8::2]", "2001:db8::1", (Outcome.FAIL, f"554 5.7.1 <[IPv6:2001:db8::2]>: {MISMATCH}")),
        ("mail.example.com", "198.51.100.7", SKIP),
        ("198.51.100.8", "198.51.100.7", SKIP),  # bare addresses are reject_bare_ip's
        ("[bogus]", "198.51.100.7", SKIP),
        (None, "198.51.100.7", SKIP),
    ],
)
def test_reject_literal_mismatch(helo: str | None, client: str, expected: tuple[Outcome, str | None]) -> None:
    assert outcome(reject_literal_mismatch(helo, parse_ip(client))) == expected


@pytest.mark.parametrize(
    ("helo", "client", "expected"),
    [
        ("mx.example.com", CLIENT, not_me("mx.example.com")),
        ("MX.Example.COM.", CLIENT, not_me("MX.Example.COM.")),
        ("example.com", CLIENT, not_me("example.com")),
        ("example.net", CLIENT, not_me("example.net")),
        ("localhost", CLIENT, not_me("localhost")),
        ("localhost.localdomain", CLIENT, not_me("localhost.localdomain")),
        ("192.0.2.1", CLIENT, not_me("192.0.2.1")),
        ("[192.0.2.1]", CLIENT, not_me("[192.0.2.1]")),
        ("[IPv6:2001:db8::25]", CLIENT, not_me("[IPv6:2001:db8::25]")),
        ("[127.0.0.1]", CLIENT, not_me("[127.0.0.1]")),
        ("[IPv6:::1]", CLIENT, not_me("[IPv6:::1]")),
        ("0.0.0.0", CLIENT, PASS),  # a wildcard listen address is not ours
        ("sub.example.com", CLIENT, PASS),  # our_domains match exactly
        ("mail.other.example", CLIENT, PASS),
        ("localhost", "127.0.0.1", SKIP),  # a local client tells the truth
        ("mx.example.com", "192.0.2.1", SKIP),
        ("mx.example.com", "::ffff:192.0.2.1", SKIP),
        (None, CLIENT, SKIP),
    ],
)
def test_reject_impersonation(helo: str | None, client: str, expected: tuple[Outcome, str | None]) -> None:
    result = reject_impersonation(
        helo, parse_ip(client), hostname=HOSTNAME, our_domains=("example.com", "Example.NET"),
        our_addresses=OUR_ADDRESSES,
    )
    assert outcome(result) == expected


def test_require_helo() -> None:
    assert outcome(require_helo(None)) == (Outcome.FAIL, "503 5.5.1 Error: send HELO/EHLO first")
    assert outcome(require_helo("mail.example.com")) == PASS


# The seeds' helo_access examples, in each table format an admin may have.
HELO_ACCESS = {
    "hash": """\
friend                  REJECT
localhost               REJECT
localhost.localdomain   REJECT
example.com             REJECT You are not me
192.0.2.1               REJECT You are not me
[192.0.2.1]             REJECT You are not me
good.example.com        OK
odd.example.org         WARN odd helo
""",
    "regexp": r"""
/^friend$/                  REJECT
/^localhost(\.localdomain)?$/ REJECT
/(^|\.)example\.com$/       REJECT You are not me
if /^\[?192\.0\.2\.1\]?$/
/./                         REJECT You are not me
endif
/^odd\.example\.org$/       WARN odd helo
""",
}


@pytest.fixture(params=sorted(HELO_ACCESS))
def helo_access(request: pytest.FixtureRequest, tmp_path: Path) -> Table:
    path = tmp_path / "helo_access"
    path.write_text(HELO_ACCESS[request.param])
    return open_access_table(f"{request.param}:{path}")


def denied(helo: str, text: str = "Access denied") -> tuple[Outcome, str]:
    return Outcome.FAIL, f"554 5.7.1 <{helo}>: Helo command rejected: {text}"


@pytest.mark.parametrize(
    ("helo", "expected"),
    [
        ("friend", denied("friend")),
        ("FRIEND", denied("FRIEND")),  # the reply shows the name as sent
        ("localhost", denied("localhost")),
        ("localhost.localdomain", denied("localhost.localdomain")),
        ("example.com", denied("example.com", "You are not me")),
        ("192.0.2.1", denied("192.0.2.1", "You are not me")),
        ("[192.0.2.1]", denied("[192.0.2.1]", "You are not me")),
        ("friendly.example", SKIP),
        ("odd.example.org", SKIP),
        (None, SKIP),
    ],
)
def test_helo_access_seed_examples(helo_access: Table, helo: str | None, expected: tuple[Outcome, str | None]) -> None:
    result = check_helo_access(helo, helo_access)
    assert result.check == "helo_access"
    assert outcome(result) == expected


def test_helo_access_parent_domains(tmp_path: Path) -> None:
    """parent_domain_matches_subdomains: example.com covers mx.example.com in a
    hash table, a more specific entry wins."""
    path = tmp_path / "helo_access"
    path.write_text(HELO_ACCESS["hash"])
    table = open_access_table(f"hash:{path}")
    assert outcome(check_helo_access("mx.example.com", table)) == denied("mx.example.com", "You are not me")
    assert outcome(check_helo_access("good.example.com", table)) == PASS


def run(helo: str | None, client: str = CLIENT, table: Table | None = None, **settings: object) -> Result:
    return check_helo(
        HeloConfig(**settings),  # type: ignore[arg-type]
        helo,
        parse_ip(client),
        hostname=HOSTNAME,
        our_addresses=OUR_ADDRESSES,
        table=table,
    )


@pytest.mark.parametrize(
    ("call", "check", "expected"),
    [
        (lambda: run("mail.example.net"), "helo", PASS),
        (lambda: run(None), "helo", SKIP),
        (lambda: run(None, required=True), "helo_required", (Outcome.FAIL, "503 5.5.1 Error: send HELO/EHLO first")),
        (lambda: run("friend", enabled=False), "helo", SKIP),
        (lambda: run("friend"), "helo", PASS),  # Postfix's defaults do not reject a dotless name
        (lambda: run("friend", reject_non_fqdn=True), "helo_non_fqdn", non_fqdn("friend")),
        (lambda: run("bad!name"), "helo_invalid", invalid("bad!name")),
        (lambda: run("bad!name", reject_invalid=False), "helo", PASS),
        (lambda: run("192.0.2.77"), "helo_bare_ip", non_fqdn("192.0.2.77")),
        (lambda: run("192.0.2.77", reject_bare_ip=False), "helo", PASS),
        (lambda: run("[198.51.100.7]"), "helo", PASS),
        (lambda: run("[192.0.2.77]", reject_literal_mismatch=True), "helo_literal_mismatch",
         (Outcome.FAIL, f"554 5.7.1 <[192.0.2.77]>: {MISMATCH}")),
        (lambda: run("[192.0.2.77]"), "helo", PASS),  # off by default: NATed MTAs send their inside address
        # impersonation comes before the syntax checks
        (lambda: run("localhost", reject_non_fqdn=True), "helo_impersonation", not_me("localhost")),
        (lambda: run("mx.example.com"), "helo_impersonation", not_me("mx.example.com")),
        (lambda: run("mx.example.com", reject_impersonation=False), "helo", PASS),
        (lambda: run("shop.example", our_domains=("shop.example",)), "helo_impersonation", not_me("shop.example")),
    ],
)
def test_check_helo(call: Callable[[], Result], check: str, expected: tuple[Outcome, str | None]) -> None:
    result = call()
    assert result.check == check
    assert outcome(result) == expected


def test_check_helo_access_table_first(helo_access: Table) -> None:
    assert outcome(run("friend", table=helo_access)) == denied("friend")
    # the table's own text wins over the built-in impersonation check
    assert outcome(run("localhost", table=helo_access)) == denied("localhost")
    warned = run("odd.example.org", table=helo_access)
    assert outcome(warned) == PASS
    assert "WARN odd helo" in warned.reason


def test_check_helo_access_ok_exempts(tmp_path: Path) -> None:
    path = tmp_path / "helo_access"
    path.write_text("localhost OK\n192.0.2.99 OK\n")
    table = open_access_table(f"hash:{path}")
    for helo in ("localhost", "192.0.2.99"):
        result = run(helo, table=table, reject_non_fqdn=True)
        assert (result.check, outcome(result)) == ("helo_access", PASS)


@pytest.mark.parametrize(
    ("action", "verdict", "reply"),
    [
        ("enforce", Action.REJECT, "501 5.5.2 <bad!name>: Helo command rejected: Invalid name"),
        ("ignore", Action.CONTINUE, None),
        ("drop", Action.DROP, "521 5.7.1 <bad!name>: Helo command rejected: Invalid name"),
        ("tempfail", Action.DEFER, "450 4.5.2 <bad!name>: Helo command rejected: Invalid name"),
    ],
)
def test_check_helo_action(action: str, verdict: Action, reply: str | None) -> None:
    result = run("bad!name", action=action)
    assert result.outcome is Outcome.FAIL  # logged and counted whatever the action
    assert result.verdict.action is verdict
    assert (str(result.verdict.reply) if result.verdict.reply else None) == reply


def test_config_defaults_and_loading(tmp_path: Path) -> None:
    defaults = HeloConfig()
    assert (defaults.enabled, defaults.action, defaults.required) == (True, "enforce", False)
    assert (defaults.reject_invalid, defaults.reject_non_fqdn, defaults.reject_bare_ip) == (True, False, True)
    assert (defaults.reject_literal_mismatch, defaults.reject_impersonation) == (False, True)
    assert (defaults.our_domains, defaults.access_table) == ((), "")
    path = tmp_path / "helo_access"
    path.write_text("friend REJECT\n")
    config = load_section(
        HeloConfig,
        {"our_domains": ["example.com"], "access_table": f"hash:{path}", "action": "ignore", "required": True},
        "helo",
    )
    assert config.our_domains == ("example.com",)
    assert config.access_table == f"hash:{path}"


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"action": "reject"}, "helo.action: expected one of ignore, enforce, drop, tempfail"),
        ({"our_domains": ["bad name"]}, "helo.our_domains: entry 1: expected a host name"),
        ({"access_table": "mysql:/x"}, 'helo.access_table: mysql:/x: unsupported table type "mysql"'),
        ({"access_table": "hash:/nonexistent/helo_access"},
         "helo.access_table: /nonexistent/helo_access: No such file or directory"),
    ],
)
def test_config_errors(table: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_section(HeloConfig, table, "helo")


def test_config_reports_bad_table_line(tmp_path: Path) -> None:
    path = tmp_path / "helo_access"
    path.write_text("/^friend$/ REJECT\n/^x(/ REJECT\n")
    with pytest.raises(ConfigError, match=re.escape(f"helo.access_table: {path}, line 2: bad regexp: ")):
        load_section(HeloConfig, {"access_table": f"regexp:{path}"}, "helo")
