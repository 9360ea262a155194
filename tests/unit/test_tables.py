"""Postfix lookup tables: formats, access(5) lookup order, actions, replies, errors."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from smtpguard.config import ConfigError
from smtpguard.net import parse_ip
from smtpguard.tables import (
    CLIENT,
    CONFIG_ERROR,
    HELO,
    RECIPIENT,
    SENDER,
    AccessAction,
    AccessKind,
    Table,
    TableError,
    access_check,
    access_reply,
    check_access_spec,
    lookup_address,
    lookup_client,
    lookup_helo,
    open_access_table,
    open_table,
    parse_action,
)
from smtpguard.verdict import Action, Outcome


def write(tmp_path: Path, text: str, name: str = "table") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# ---------------------------------------------------------------- exact-key tables

ACCESS = """\
# a comment, then a blank line

Friend          REJECT
friend          OK
example.com     REJECT You are
    not me
   # an indented comment does not end the logical line
192.0.2.1       DUNNO
"""


@pytest.mark.parametrize("kind", ["texthash:", "hash:", "lmdb:", "btree:", "cdb:", "proxy:hash:"])
@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("friend", "REJECT"),  # keys are folded; the first duplicate wins
        ("FRIEND", "REJECT"),  # lookups are folded
        ("example.com", "REJECT You are    not me"),  # continuation joined as readlline does
        ("192.0.2.1", "DUNNO"),
        ("nobody", None),
    ],
)
def test_exact_tables_read_the_source_file(tmp_path: Path, kind: str, key: str, value: str | None) -> None:
    table = open_table(kind + write(tmp_path, ACCESS))
    assert table.fixed
    assert table.lookup(key) == value


@pytest.mark.parametrize(
    ("spec", "key", "value"),
    [
        ("inline:{ a=1, B=2 }", "b", "2"),
        ("inline:{a=1,b=2}", "a", "1"),
        ("inline:{ { key = text with, comma } }", "key", "text with, comma"),
        ("inline:{ x=1, x=2 }", "x", "2"),  # a later entry replaces
        ("inline:{ a=1 }", "z", None),
    ],
)
def test_inline(spec: str, key: str, value: str | None) -> None:
    assert open_table(spec).lookup(key) == value


# ---------------------------------------------------------------- cidr

POSTSCREEN_ACCESS = """\
# postscreen_access_list = permit_mynetworks, cidr:/etc/postfix/postscreen_access.cidr
192.0.2.8           dunno
192.0.2.0/24        reject
[2001:db8::]/32     permit
198.51.100.7        PERMIT
if 203.0.113.0/24
!203.0.113.128/25   reject
endif
10.0.0.0/8          dunno
0.0.0.0/0           Dunno
"""


@pytest.mark.parametrize(
    ("ip", "value", "kind"),
    [
        ("192.0.2.8", "dunno", AccessKind.DUNNO),  # first match wins
        ("192.0.2.9", "reject", AccessKind.REJECT),
        ("2001:db8::25", "permit", AccessKind.OK),
        ("198.51.100.7", "PERMIT", AccessKind.OK),
        ("203.0.113.5", "reject", AccessKind.REJECT),  # inside the if, outside the negated /25
        ("203.0.113.200", "Dunno", AccessKind.DUNNO),  # the if matched, its body did not: go on
        ("10.1.2.3", "dunno", AccessKind.DUNNO),
        ("::ffff:192.0.2.9", "reject", AccessKind.REJECT),  # lookup_client maps IPv4-in-IPv6
    ],
)
def test_postscreen_access_cidr(tmp_path: Path, ip: str, value: str, kind: AccessKind) -> None:
    table = open_access_table("cidr:" + write(tmp_path, POSTSCREEN_ACCESS))
    assert not table.fixed
    found = lookup_client(table, parse_ip(ip))
    assert found == value
    assert parse_action(found).kind is kind


@pytest.mark.parametrize("key", ["2001:db9::1", "not-an-address", ""])
def test_cidr_no_match(tmp_path: Path, key: str) -> None:
    table = open_table("cidr:" + write(tmp_path, "192.0.2.0/24 REJECT\n[2001:db8::]/32 REJECT\n"))
    assert table.lookup(key) is None


# ---------------------------------------------------------------- regexp / pcre

HELO_REGEXP = r"""
/^friend$/                  REJECT
/^(.+)\.dyn\.example\.net$/ REJECT dynamic host $1 (${1}) costs $$5
if !/\.example\.org$/
/^[[:digit:]]+\./           REJECT numeric start
endif
/^MiXeD$/i                  OK
#/x/ OK
|^pipe/delimited$|          DUNNO
/^slash\/inside$/           WARN slash
/^(a)|(b)$/                 got $1-$2.
"""


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("friend", "REJECT"),
        ("FRIEND", "REJECT"),  # case-insensitive by default
        ("host7.dyn.example.net", "REJECT dynamic host host7 (host7) costs $5"),
        ("123.example.com", "REJECT numeric start"),
        ("123.example.org", None),  # excluded by the if !/.../
        ("mixed", None),  # "i" toggles case sensitivity on
        ("MiXeD", "OK"),
        ("pipe/delimited", "DUNNO"),
        ("slash/inside", "WARN slash"),
        ("b", "got -b."),  # an unmatched group is empty
        ("nothing", None),
    ],
)
@pytest.mark.parametrize("kind", ["regexp", "pcre"])
def test_regexp_tables(tmp_path: Path, kind: str, key: str, value: str | None) -> None:
    table = open_table(f"{kind}:" + write(tmp_path, HELO_REGEXP))
    assert not table.fixed
    assert table.lookup(key) == value


def test_nested_if(tmp_path: Path) -> None:
    text = "if /a/\nif /b/\n/c/ inner\nendif\n/a/ outer\nENDIF\n/./ last\n"
    table = open_table("regexp:" + write(tmp_path, text))
    assert [table.lookup(k) for k in ("abc", "ab", "xyz")] == ["inner", "outer", "last"]


@pytest.mark.parametrize(
    ("line", "key", "value"),
    [
        ("/^a.b$/s  yes", "a\nb", "yes"),  # s: dot matches newline
        ("/b/A yes", "ab", None),  # A: anchored
        ("/a/A yes", "ab", "yes"),
        ("/ a \\d  # comment\n  /x yes", "a1", "yes"),  # x: verbose, continuation line
        ("/^A$/ii yes", "a", "yes"),  # flags toggle
    ],
)
def test_pcre_flags(tmp_path: Path, line: str, key: str, value: str | None) -> None:
    assert open_table("pcre:" + write(tmp_path, line + "\n")).lookup(key) == value


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize(
    ("kind", "text", "message"),
    [
        ("regexp", "/ok/ OK\n\n/a(/ REJECT\n", "line 3: bad regexp: missing ), unterminated subpattern"),
        ("regexp", "/abc REJECT\n", 'line 1: no closing regexp delimiter "/"'),
        ("regexp", "/a/q REJECT\n", 'line 1: unknown regexp option "q"'),
        ("regexp", "/a/x REJECT\n", 'line 1: basic regular expressions (option "x") are not supported'),
        ("regexp", "/a/\n", "line 1: no lookup result"),
        ("regexp", "/(a)/ got $2\n", 'line 1: out of range replacement index "2"'),
        ("regexp", "!/(a)/ got $1\n", "line 1: $number found in negative match replacement text"),
        ("regexp", "/a/ cost $x\n", 'line 1: non-numeric replacement index "x"'),
        ("regexp", "/a/ cost $\n", 'line 1: bad replacement syntax: "$" must be followed by a number or "$"'),
        ("regexp", "/a/!/b/ x\n", 'line 1: "/pattern1/!/pattern2/" is not supported'),
        ("regexp", "friend REJECT\n", 'line 1: unrecognized request "friend REJECT"'),
        ("regexp", "/a/ OK\nendif\n", "line 2: endif without matching if"),
        ("regexp", "if /a/\n/b/ OK\n", "line 1: if has no matching endif"),
        ("regexp", "if /a/ OK\nendif\n", 'line 1: extra text after if: "OK"'),
        ("regexp", "if /a/\nendif now\n", "line 2: extra text after endif"),
        ("pcre", "/a/U OK\n", 'line 1: ungreedy matching (option "U") is not supported'),
        ("cidr", "192.0.2.0/24 OK\n192.0.2.1/24 REJECT\n",
         'line 2: non-null host address bits in "192.0.2.1/24", perhaps you should use "192.0.2.0/24" instead'),
        ("cidr", "192.0.2 REJECT\n", 'line 1: bad address pattern "192.0.2"'),
        ("cidr", "192.0.2.0/24\n", "line 1: no lookup result"),
        ("hash", "# c\njustakey\n", 'line 2: expected "key whitespace value", got "justakey"'),
        ("hash", "  indented key\n", "line 1: logical line must not start with whitespace"),
    ],
)
def test_errors_name_file_and_line(tmp_path: Path, kind: str, text: str, message: str) -> None:
    path = write(tmp_path, text, "helo_access")
    with pytest.raises(TableError, match=re.escape(f"{path}, {message}")) as info:
        open_table(f"{kind}:{path}")
    assert isinstance(info.value, ValueError)
    assert info.value.source == path


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("mysql:/etc/postfix/mysql.cf", 'mysql:/etc/postfix/mysql.cf: unsupported table type "mysql"'),
        ("hash:", "hash:: no file name"),
        ("inline:a=b", 'inline:a=b: bad syntax; need "inline:{name=value...}"'),
        ("inline:{ a }", 'inline:{ a }: bad syntax in "a"; need "name=value"'),
        ("inline:{ }", "inline:{ }: empty table"),
        ("inline:{ {a=b }", 'inline:{ {a=b }: unbalanced "{"'),
    ],
)
def test_spec_errors(spec: str, message: str) -> None:
    with pytest.raises(TableError, match=re.escape(message)):
        open_table(spec)


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "absent")
    with pytest.raises(TableError, match=re.escape(f"{path}: No such file or directory")):
        open_table(f"hash:{path}")


@pytest.mark.parametrize(
    ("kind", "text", "message"),
    [
        ("hash", "ok OK\nbad HOLD\n", 'line 2: unsupported access action "HOLD"'),
        ("hash", "bad 250 fine\n", 'line 1: unsupported access action "250 fine"'),
        ("cidr", "192.0.2.0/24 permit_mynetworks\n", 'line 1: unsupported access action "permit_mynetworks"'),
        ("regexp", "/a/ FILTER smtp:[127.0.0.1]:10025\n", 'line 1: unsupported access action "FILTER'),
    ],
)
def test_access_tables_check_actions(tmp_path: Path, kind: str, text: str, message: str) -> None:
    path = write(tmp_path, text)
    open_table(f"{kind}:{path}")  # fine as a plain table
    with pytest.raises(TableError, match=re.escape(f"{path}, {message}")):
        open_access_table(f"{kind}:{path}")


def test_access_table_allows_substituted_action(tmp_path: Path) -> None:
    table = open_access_table("regexp:" + write(tmp_path, "/^(reject|ok)-/ $1 from table\n"))
    assert table.lookup("reject-me") == "reject from table"


def test_check_access_spec(tmp_path: Path) -> None:
    check_access_spec("access_table", "")
    check_access_spec("access_table", "hash:" + write(tmp_path, "friend REJECT\n"))
    path = write(tmp_path, "friend HOLD\n", "bad")
    with pytest.raises(ConfigError, match=re.escape(f'access_table: {path}, line 1: unsupported access action')):
        check_access_spec("access_table", f"hash:{path}")


# ---------------------------------------------------------------- access(5) lookup order

class Recorder:
    """Table contents that remember the keys asked for and never match."""

    def __init__(self) -> None:
        self.keys: list[str] = []

    def lookup(self, key: str) -> str | None:
        self.keys.append(key)
        return None


def keys_tried(fixed: bool, lookup: Callable[[Table], str | None]) -> list[str]:
    recorder = Recorder()
    assert lookup(Table("test:", fixed, lambda: recorder)) is None
    return recorder.keys


@pytest.mark.parametrize(
    ("lookup", "exact", "pattern"),
    [
        (
            lambda t: lookup_address(t, "User+Ext@Sub.Example.COM", "+"),
            ["User+Ext@Sub.Example.COM", "User@Sub.Example.COM", "Sub.Example.COM", "Example.COM", "COM",
             "User+Ext@", "User@"],
            ["User+Ext@Sub.Example.COM"],
        ),
        (
            lambda t: lookup_address(t, "user-a+b@example.com", "+-"),  # any delimiter character
            ["user-a+b@example.com", "user@example.com", "example.com", "com", "user-a+b@", "user@"],
            ["user-a+b@example.com"],
        ),
        (
            lambda t: lookup_address(t, "+user@example.com", "+"),  # not at the start
            ["+user@example.com", "example.com", "com", "+user@"],
            ["+user@example.com"],
        ),
        (lambda t: lookup_address(t, ""), ["<>"], ["<>"]),
        (lambda t: lookup_address(t, "postmaster"), ["postmaster", "postmaster@"], ["postmaster"]),
        (lambda t: lookup_address(t, "a@[192.0.2.1]"), ["a@[192.0.2.1]", "[192.0.2.1]", "a@"], ["a@[192.0.2.1]"]),
        (
            lambda t: lookup_client(t, parse_ip("192.0.2.1"), "mail.example.com"),
            ["mail.example.com", "example.com", "com", "192.0.2.1", "192.0.2", "192.0", "192"],
            ["mail.example.com", "192.0.2.1"],
        ),
        (lambda t: lookup_client(t, parse_ip("2001:db8::1")), ["2001:db8::1", "2001:db8:", "2001:db8", "2001"],
         ["2001:db8::1"]),
        (lambda t: lookup_client(t, parse_ip("2001:DB8:0::1")), ["2001:db8::1", "2001:db8:", "2001:db8", "2001"],
         ["2001:db8::1"]),
        (lambda t: lookup_client(t, parse_ip("::ffff:192.0.2.1")), ["192.0.2.1", "192.0.2", "192.0", "192"],
         ["192.0.2.1"]),
        (lambda t: lookup_helo(t, "mx.example.com."), ["mx.example.com.", "example.com.", "com."],
         ["mx.example.com."]),
        (lambda t: lookup_helo(t, "192.0.2.1"), ["192.0.2.1"], ["192.0.2.1"]),
        (lambda t: lookup_helo(t, "[192.0.2.1]"), ["[192.0.2.1]"], ["[192.0.2.1]"]),
    ],
)
def test_lookup_order(lookup: Callable[[Table], str | None], exact: list[str], pattern: list[str]) -> None:
    """Exact-key tables get every access(5) key; pattern tables only full ones."""
    assert keys_tried(True, lookup) == exact
    assert keys_tried(False, lookup) == pattern


@pytest.mark.parametrize(
    ("address", "value"),
    [
        ("user+x@sub.example.com", "full"),
        ("user+y@sub.example.com", "bare"),
        ("other@sub.example.com", "sub"),
        ("other@deep.example.com", "parent"),
        ("user+z@elsewhere.org", "user@"),
    ],
)
def test_first_key_wins(tmp_path: Path, address: str, value: str) -> None:
    text = "user+x@sub.example.com full\nuser@sub.example.com bare\nsub.example.com sub\n" \
           "example.com parent\nuser@ user@\n"
    assert lookup_address(open_table("hash:" + write(tmp_path, text)), address, "+") == value


# ---------------------------------------------------------------- actions and replies

@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("OK", AccessAction(AccessKind.OK)),
        ("ok trailing text is ignored", AccessAction(AccessKind.OK)),
        ("PERMIT", AccessAction(AccessKind.OK)),
        ("permit", AccessAction(AccessKind.OK)),
        ("RELAY", AccessAction(AccessKind.OK)),
        ("1700000000", AccessAction(AccessKind.OK)),  # all-numerical (pop-before-smtp)
        ("550", AccessAction(AccessKind.OK)),  # all-numerical wins over "NNN text", as in smtpd
        ("DUNNO", AccessAction(AccessKind.DUNNO)),
        ("dunno", AccessAction(AccessKind.DUNNO)),
        ("WARN odd client", AccessAction(AccessKind.WARN, text="odd client")),
        ("REJECT", AccessAction(AccessKind.REJECT, 554, "5.7.1", "Access denied")),
        ("reject", AccessAction(AccessKind.REJECT, 554, "5.7.1", "Access denied")),
        ("REJECT\tYou are not me", AccessAction(AccessKind.REJECT, 554, "5.7.1", "You are not me")),
        ("REJECT 5.7.9 Policy", AccessAction(AccessKind.REJECT, 554, "5.7.9", "Policy")),
        ("REJECT 5.7.9", AccessAction(AccessKind.REJECT, 554, "5.7.9", "Access denied")),
        ("DEFER", AccessAction(AccessKind.DEFER, 450, "4.7.1", "Access denied")),
        ("DEFER try later", AccessAction(AccessKind.DEFER, 450, "4.7.1", "try later")),
        ("DEFER_IF_PERMIT", AccessAction(AccessKind.DEFER, 450, "4.7.1", "Service unavailable")),
        ("550 Go away", AccessAction(AccessKind.REJECT, 550, "5.7.1", "Go away")),
        ("550 5.7.0 Go away", AccessAction(AccessKind.REJECT, 550, "5.7.0", "Go away")),
        ("450 4.2.0 Busy", AccessAction(AccessKind.DEFER, 450, "4.2.0", "Busy")),
        ("421 Bye", AccessAction(AccessKind.DEFER, 421, "4.7.1", "Bye")),
    ],
)
def test_parse_action(value: str, expected: AccessAction) -> None:
    assert parse_action(value) == expected


@pytest.mark.parametrize("value", ["", "HOLD", "DISCARD", "FILTER smtp:x", "reject_unknown_client", "250 ok", "600 no"])
def test_parse_action_unsupported(value: str) -> None:
    with pytest.raises(ValueError, match="unsupported access action"):
        parse_action(value)


@pytest.mark.parametrize(
    ("value", "kind", "name", "reply"),
    [
        ("REJECT", HELO, "friend", "554 5.7.1 <friend>: Helo command rejected: Access denied"),
        ("REJECT You are not me", HELO, "mx.example.com",
         "554 5.7.1 <mx.example.com>: Helo command rejected: You are not me"),
        ("DEFER", CLIENT, "unknown[192.0.2.1]", "450 4.7.1 <unknown[192.0.2.1]>: Client host rejected: Access denied"),
        ("REJECT", SENDER, "x@y.example", "554 5.7.1 <x@y.example>: Sender address rejected: Access denied"),
        ("REJECT", SENDER, "", "554 5.7.1 <>: Sender address rejected: Access denied"),
        ("550 5.1.1 No such user", SENDER, "a@b.example",
         "550 5.1.0 <a@b.example>: Sender address rejected: No such user"),
        ("550 5.1.1 No such user", RECIPIENT, "a@b.example",
         "550 5.1.1 <a@b.example>: Recipient address rejected: No such user"),
        ("550 5.1.8 Bad domain", RECIPIENT, "a@b.example",
         "550 5.1.2 <a@b.example>: Recipient address rejected: Bad domain"),
        ("550 5.1.1 x", HELO, "h", "550 5.0.0 <h>: Helo command rejected: x"),
        ("550 4.7.1 Mixed up", RECIPIENT, "a@b.example",
         "550 5.7.1 <a@b.example>: Recipient address rejected: Mixed up"),
        ("450 Later", RECIPIENT, "a@b.example", "450 4.7.1 <a@b.example>: Recipient address rejected: Later"),
    ],
)
def test_access_reply(value: str, kind: str, name: str, reply: str) -> None:
    assert str(access_reply(parse_action(value), kind, name)) == reply


@pytest.mark.parametrize("value", ["OK", "DUNNO", "WARN x"])
def test_access_reply_needs_a_rejection(value: str) -> None:
    with pytest.raises(ValueError, match="has no reply"):
        access_reply(parse_action(value), HELO, "h")


@pytest.mark.parametrize(
    ("action", "value", "outcome", "verdict", "reply"),
    [
        ("enforce", None, Outcome.SKIP, Action.CONTINUE, None),
        ("enforce", "OK", Outcome.PASS, Action.CONTINUE, None),
        ("enforce", "DUNNO", Outcome.SKIP, Action.CONTINUE, None),
        ("enforce", "WARN odd", Outcome.SKIP, Action.CONTINUE, None),
        ("enforce", "REJECT", Outcome.FAIL, Action.REJECT, "554 5.7.1 <friend>: Helo command rejected: Access denied"),
        ("ignore", "REJECT", Outcome.FAIL, Action.CONTINUE, None),
        ("drop", "REJECT", Outcome.FAIL, Action.DROP, "521 5.7.1 <friend>: Helo command rejected: Access denied"),
        ("tempfail", "REJECT", Outcome.FAIL, Action.DEFER, "450 4.7.1 <friend>: Helo command rejected: Access denied"),
        ("enforce", "DEFER", Outcome.FAIL, Action.DEFER, "450 4.7.1 <friend>: Helo command rejected: Access denied"),
        ("drop", "DEFER", Outcome.FAIL, Action.DEFER, "450 4.7.1 <friend>: Helo command rejected: Access denied"),
        ("enforce", "521 Go away", Outcome.FAIL, Action.DROP, "521 5.7.1 <friend>: Helo command rejected: Go away"),
        ("enforce", "421 Later", Outcome.FAIL, Action.DROP, "421 4.7.1 <friend>: Helo command rejected: Later"),
        ("enforce", "HOLD", Outcome.FAIL, Action.DEFER, str(CONFIG_ERROR)),
        ("ignore", "HOLD", Outcome.FAIL, Action.DEFER, str(CONFIG_ERROR)),  # never softened
    ],
)
def test_access_check(action: str, value: str | None, outcome: Outcome, verdict: Action, reply: str | None) -> None:
    result = access_check("helo_access", action, value, HELO, "friend")
    assert (result.check, result.outcome, result.verdict.action) == ("helo_access", outcome, verdict)
    assert (str(result.verdict.reply) if result.verdict.reply else None) == reply
    assert "friend" in result.reason
