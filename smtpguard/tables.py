"""Postfix lookup tables and access(5) semantics, so admins reuse their files.

How it works.  :func:`open_table` takes a table spec as written in main.cf
and reads the *source text* of the table once, when the configuration is
loaded (a bad line is a :class:`TableError` naming file and line).  SIGHUP
loads a whole new configuration, tables included, and keeps the running one
if anything in it is bad (:mod:`smtpguard.reload`).  Nothing else here does I/O.

Table types (``type:path``):

``texthash:``, ``hash:``, ``btree:``, ``lmdb:``, ``cdb:``, ``dbm:``, ``sdbm:``, a bare path
    The postmap(1) source file itself (``hash:/etc/postfix/access`` reads
    ``/etc/postfix/access``, not the ``.db``): ``key whitespace value``,
    keys folded to lower case, the first of duplicate keys wins (postmap
    warns and keeps it).  Lookups fold the key too.  These are *exact-key*
    tables (``Table.fixed``): only they see the partial keys of access(5)
    (parent domains, ``user@``, truncated IP addresses).
``cidr:``
    cidr_table(5): ``network/prefix result`` or a bare address, IPv4 or
    IPv6, optionally inside ``[]``, negated with ``!``, grouped with
    ``if network`` ... ``endif``; first match wins.
``regexp:`` / ``pcre:``
    regexp_table(5)/pcre_table(5) with Python :mod:`re`: ``/pattern/flags
    result`` (any non-alphanumeric delimiter), ``!/pattern/``, ``if /re/``
    ... ``endif`` (nested), ``$1``/``${1}``/``$(1)`` and ``$$`` in the
    result.  Matching is case-insensitive unless the ``i`` flag toggles it,
    as in Postfix.  regexp flags: ``i``, ``m``, ``x`` (turning extended
    syntax off is refused: Python has no POSIX basic regexps).  pcre flags:
    ``i m s x A`` map to Python's; ``E`` and ``X`` are accepted and change
    nothing (lookup keys hold no newline); ``U`` is refused.  POSIX classes
    such as ``[[:digit:]]`` are translated.
``inline:{ key=value, { key = text with spaces } }``
    Postfix 3.0 inline table (exact-key, a later key replaces an earlier one).
``proxy:type:path``
    The proxymap wrapper is transparent: the inner table is opened.

Files share readlline(3)'s layout: blank lines and lines whose first
non-blank character is ``#`` are ignored, a line starting with whitespace
continues the previous one.  Where Postfix logs a warning and skips a bad
rule, loading fails with a :class:`TableError` naming file and line
(``/etc/postfix/helo_access, line 3: bad regexp: ...``): a table that
silently lost a rule is worse than one that does not load.

Access semantics (access(5), smtpd_check.c): :func:`lookup_client`,
:func:`lookup_helo` and :func:`lookup_address` try the keys in Postfix's
order, with the default ``parent_domain_matches_subdomains`` (which lists
``smtpd_access_maps``): ``example.com`` also matches ``sub.example.com``.
:func:`parse_action` turns a result into an :class:`AccessAction`,
:func:`access_reply` into the :class:`~smtpguard.verdict.Reply` smtpd would
send, and :func:`access_check` into a :class:`~smtpguard.verdict.Result`.
"""

from __future__ import annotations

import contextlib
import enum
import ipaddress
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Protocol

from .net import IPAddress, parse_ip_or_none
from .options import ConfigError
from .verdict import Action, Outcome, Reply, Result, Verdict, Warn, verdict_for

Validator = Callable[[str], None]


class TableError(ValueError):
    """A table that cannot be loaded; ``str()`` names source and line."""

    def __init__(self, source: str, line: int | None, problem: str) -> None:
        super().__init__(f"{source}, line {line}: {problem}" if line is not None else f"{source}: {problem}")
        self.source = source
        self.line = line
        self.problem = problem


@contextlib.contextmanager
def _at(source: str, line: int | None) -> Iterator[None]:
    """Turn a ValueError raised while parsing one line into a TableError."""
    try:
        yield
    except TableError:
        raise
    except ValueError as exc:
        raise TableError(source, line, str(exc)) from None


def _logical_lines(source: str, text: str) -> list[tuple[int, str]]:
    """readlline(3): (first line number, logical line) pairs."""
    lines: list[tuple[int, str]] = []
    for number, raw in enumerate(text.split("\n"), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if raw[0].isspace():
            if not lines:
                raise TableError(source, number, "logical line must not start with whitespace")
            start, previous = lines[-1]
            lines[-1] = (start, previous + raw.rstrip())
        else:
            lines.append((number, raw.rstrip()))
    return lines


# ---------------------------------------------------------------- contents

class _Contents(Protocol):
    def lookup(self, key: str) -> str | None: ...


@dataclass(frozen=True)
class _Exact:
    """An exact-key table; keys are stored folded to lower case."""

    entries: dict[str, str]

    def lookup(self, key: str) -> str | None:
        return self.entries.get(key.lower())


def _word(text: str) -> tuple[str, str]:
    """The first blank-delimited word of *text* and the stripped rest."""
    parts = text.split(None, 1)
    return (parts[0] if parts else ""), (parts[1].strip() if len(parts) > 1 else "")


def _parse_exact(source: str, lines: list[tuple[int, str]], validate: Validator | None) -> _Exact:
    entries: dict[str, str] = {}
    for number, line in lines:
        with _at(source, number):
            key, value = _word(line)
            if not value:
                raise ValueError(f'expected "key whitespace value", got "{line}"')
            if validate is not None:
                validate(value)
            entries.setdefault(key.lower(), value)
    return _Exact(entries)


class _Pattern(Protocol):
    @property
    def negated(self) -> bool: ...

    @property
    def groups(self) -> int:
        """How many groups a result may substitute ($1...)."""

    def match(self, key: str) -> tuple[str, ...] | None:
        """The matched groups (``()`` if none), or None for no match."""


def _negation(text: str) -> tuple[bool, str]:
    """Strip leading ``!`` (each one toggles) and blanks."""
    negated = False
    while text[:1] == "!" or text[:1].isspace():
        negated ^= text[0] == "!"
        text = text[1:]
    return negated, text


@dataclass(frozen=True)
class _Network:
    network: ipaddress.IPv4Network | ipaddress.IPv6Network
    negated: bool
    groups = 0

    def match(self, key: str) -> tuple[str, ...] | None:
        try:
            addr = ipaddress.ip_address(key)
        except ValueError:
            return None
        if addr.version != self.network.version:
            return None
        return () if (addr in self.network) != self.negated else None


def _parse_network(text: str) -> tuple[_Network, str]:
    """``[!]address[/prefix] rest`` -> (pattern, rest); ``[]`` are optional."""
    negated, text = _negation(text)
    token, rest = _word(text)
    spec = token.replace("[", "", 1).replace("]", "", 1) if token.startswith("[") else token
    try:
        network = ipaddress.ip_network(spec)
    except ValueError:
        try:
            loose = ipaddress.ip_network(spec, strict=False)
        except ValueError:
            raise ValueError(f'bad address pattern "{token}"') from None
        raise ValueError(
            f'non-null host address bits in "{token}", perhaps you should use "{loose}" instead'
        ) from None
    return _Network(network, negated), rest


@dataclass(frozen=True)
class _Regex:
    regex: re.Pattern[str]
    negated: bool
    anchored: bool

    @property
    def groups(self) -> int:
        return 0 if self.negated else self.regex.groups

    def match(self, key: str) -> tuple[str, ...] | None:
        m = self.regex.match(key) if self.anchored else self.regex.search(key)
        if self.negated:
            return () if m is None else None
        return None if m is None else tuple(g or "" for g in m.groups())


_POSIX_CLASSES = {
    "alpha": "a-zA-Z", "digit": "0-9", "alnum": "a-zA-Z0-9", "upper": "A-Z", "lower": "a-z",
    "space": r" \t\n\r\f\v", "blank": r" \t", "xdigit": "0-9A-Fa-f", "punct": r"!-/:-@\[-`{-~",
    "cntrl": r"\x00-\x1f\x7f", "print": r"\x20-\x7e", "graph": r"\x21-\x7e",
}
_POSIX_CLASS = re.compile(r"\[:(" + "|".join(_POSIX_CLASSES) + r"):\]")

# flavor -> (flags allowed, flags on by default, Python equivalents)
_FLAVORS = {
    "regexp": ("imx", "ix", {"i": re.IGNORECASE, "m": re.MULTILINE}),
    "pcre": ("imsxAEUX", "i", {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL, "x": re.VERBOSE}),
}


def _parse_regex(flavor: str, text: str) -> tuple[_Regex, str]:
    """``[!]/pattern/flags rest`` -> (pattern, rest), as dict_regexp_get_pat."""
    negated, text = _negation(text)
    if not text:
        raise ValueError("no regexp")
    if text[0].isalnum():
        raise ValueError(f'unrecognized request "{text}": a pattern starts with a delimiter such as "/"')
    delim, i = text[0], 1
    while i < len(text) and text[i] != delim:
        i += 2 if text[i] == "\\" else 1
    if i >= len(text):
        raise ValueError(f'no closing regexp delimiter "{delim}"')
    body = _POSIX_CLASS.sub(lambda m: _POSIX_CLASSES[m.group(1)], text[1:i])
    flags_end = i + 1
    while flags_end < len(text) and not text[flags_end].isspace() and text[flags_end] != "!":
        flags_end += 1
    allowed, on, python = _FLAVORS[flavor]
    state = set(on)
    for flag in text[i + 1:flags_end]:
        if flag not in allowed:
            raise ValueError(f'unknown regexp option "{flag}"')
        state ^= {flag}
    if flavor == "regexp" and "x" not in state:
        raise ValueError('basic regular expressions (option "x") are not supported')
    if "U" in state:
        raise ValueError('ungreedy matching (option "U") is not supported')
    rest = text[flags_end:].strip()
    if rest.startswith("!"):
        raise ValueError('"/pattern1/!/pattern2/" is not supported; use "if !/pattern2/" ... "endif"')
    py_flags = re.NOFLAG
    for flag in state & python.keys():
        py_flags |= python[flag]
    try:
        regex = re.compile(body, py_flags)
    except re.error as exc:
        raise ValueError(f"bad regexp: {exc}") from None
    return _Regex(regex, negated, "A" in state), rest


_MACRO = re.compile(r"\$(?:(\$)|(\w+)|\{([^}]*)\}|\(([^)]*)\))?")


def _template(text: str, pattern: _Pattern) -> tuple[str | int, ...]:
    """Split a regexp result into literal text and group numbers (mac_parse)."""
    parts: list[str | int] = []
    pos = 0
    for m in _MACRO.finditer(text):
        parts.append(text[pos:m.start()])
        pos = m.end()
        if m.lastindex is None:
            raise ValueError('bad replacement syntax: "$" must be followed by a number or "$"')
        name = m.group(m.lastindex)
        if m.lastindex == 1:
            parts.append("$")
        elif not name.isdigit():
            raise ValueError(f'non-numeric replacement index "{name}"')
        elif pattern.negated:
            raise ValueError("$number found in negative match replacement text")
        elif not 1 <= int(name) <= pattern.groups:
            raise ValueError(f'out of range replacement index "{name}"')
        else:
            parts.append(int(name))
    parts.append(text[pos:])
    return tuple(p for p in parts if p != "")


@dataclass(frozen=True)
class _Rule:
    pattern: _Pattern
    template: tuple[str | int, ...]


@dataclass(frozen=True)
class _Block:
    pattern: _Pattern
    body: tuple[_Rule | _Block, ...]


def _first_match(nodes: tuple[_Rule | _Block, ...], key: str) -> str | None:
    for node in nodes:
        groups = node.pattern.match(key)
        if groups is None:
            continue
        if isinstance(node, _Block):
            found = _first_match(node.body, key)
            if found is not None:
                return found
            continue
        return "".join(p if isinstance(p, str) else groups[p - 1] for p in node.template)
    return None


@dataclass(frozen=True)
class _Rules:
    """An ordered rule list (cidr, regexp, pcre); the first match wins."""

    nodes: tuple[_Rule | _Block, ...]

    def lookup(self, key: str) -> str | None:
        return _first_match(self.nodes, key)


_KEYWORD = re.compile(r"(if|endif)(?![A-Za-z0-9])", re.IGNORECASE)


def _parse_rules(
    source: str,
    lines: list[tuple[int, str]],
    validate: Validator | None,
    *,
    pattern: Callable[[str], tuple[_Pattern, str]],
    expand: bool,
) -> _Rules:
    """Rules with ``if``/``endif`` blocks; *pattern* parses one pattern."""
    top: list[_Rule | _Block] = []
    open_ifs: list[tuple[int, _Pattern, list[_Rule | _Block]]] = []
    for number, line in lines:
        with _at(source, number):
            keyword = _KEYWORD.match(line)
            word = keyword.group(1).lower() if keyword else ""
            if word == "endif":
                if line[5:].strip():
                    raise ValueError("extra text after endif")
                if not open_ifs:
                    raise ValueError("endif without matching if")
                _, condition, inner = open_ifs.pop()
                (open_ifs[-1][2] if open_ifs else top).append(_Block(condition, tuple(inner)))
            elif word == "if":
                condition, rest = pattern(line[2:].strip())
                if rest:
                    raise ValueError(f'extra text after if: "{rest}"')
                open_ifs.append((number, condition, []))
            else:
                rule, result = pattern(line)
                if not result:
                    raise ValueError("no lookup result")
                if validate is not None:
                    validate(result)
                body = open_ifs[-1][2] if open_ifs else top
                body.append(_Rule(rule, _template(result, rule) if expand else (result,)))
    if open_ifs:
        raise TableError(source, open_ifs[-1][0], "if has no matching endif")
    return _Rules(tuple(top))


def _split_inline(text: str) -> Iterator[str]:
    """Split on commas and blanks; ``{ ... }`` is one item (mystrtokq)."""
    i = 0
    while i < len(text):
        if text[i] in ", \t\r\n":
            i += 1
            continue
        start, depth = i, 0
        if text[i] == "{":
            while i < len(text):
                depth += {"{": 1, "}": -1}.get(text[i], 0)
                i += 1
                if depth == 0:
                    break
            if depth:
                raise ValueError(f'unbalanced "{{" in "{text[start:]}"')
        else:
            while i < len(text) and text[i] not in ", \t\r\n":
                i += 1
        yield text[start:i]


def _parse_inline(spec: str, body: str, validate: Validator | None) -> _Exact:
    entries: dict[str, str] = {}
    with _at(spec, None):
        body = body.strip()
        if not (body.startswith("{") and body.endswith("}")):
            raise ValueError('bad syntax; need "inline:{name=value...}"')
        for item in _split_inline(body[1:-1]):
            pair = item[1:-1] if item.startswith("{") else item
            key, sep, value = pair.partition("=")
            if not sep or not key.strip():
                raise ValueError(f'bad syntax in "{item}"; need "name=value"')
            if validate is not None:
                validate(value.strip())
            entries[key.strip().lower()] = value.strip()
        if not entries:
            raise ValueError("empty table")
    return _Exact(entries)


# ---------------------------------------------------------------- tables

class Table:
    """An opened lookup table.  Tables are read when the configuration is
    loaded; SIGHUP builds a new configuration and so re-reads them all."""

    def __init__(self, spec: str, fixed: bool, load: Callable[[], _Contents]) -> None:
        self.spec = spec  # as written in the configuration
        self.fixed = fixed  # exact-key table: partial access(5) keys apply
        self._contents = load()

    def lookup(self, key: str) -> str | None:
        """The raw result for *key* (regexp substitutions done), or None."""
        return self._contents.lookup(key)

    def __repr__(self) -> str:
        return f"Table({self.spec!r})"


_EXACT_TYPES = ("texthash", "hash", "btree", "lmdb", "cdb", "dbm", "sdbm")
_RULE_TYPES: dict[str, Callable[[str], tuple[_Pattern, str]]] = {
    "cidr": _parse_network,
    "regexp": partial(_parse_regex, "regexp"),
    "pcre": partial(_parse_regex, "pcre"),
}
_SPEC = re.compile(r"([a-z][a-z0-9_]*):(.*)", re.DOTALL)


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="surrogateescape")
    except OSError as exc:
        raise TableError(path, None, exc.strerror or str(exc)) from None


def open_table(spec: str, validate: Validator | None = None) -> Table:
    """Open ``type:path``.  A bare path is an error naming the types (the
    type decides how the file is read: a CIDR file read as texthash would
    load and never match).

    *validate*, if given, is called with every result as written and raises
    ValueError for a bad one; the TableError then names its line.
    """
    m = _SPEC.fullmatch(spec.strip())
    supported = ", ".join((*_EXACT_TYPES, *_RULE_TYPES, "inline", "proxy"))
    if not m:
        raise TableError(spec, None, f"no table type: write type:{spec.strip()}, e.g. cidr:{spec.strip()} "
                                     f"(types: {supported})")
    kind, name = m.group(1), m.group(2).strip()
    if kind == "proxy":
        return open_table(name, validate)
    if kind == "inline":
        contents = _parse_inline(spec, name, validate)
        return Table(spec, True, lambda: contents)
    parse: Callable[[str, list[tuple[int, str]], Validator | None], _Contents]
    if kind in _EXACT_TYPES:
        fixed, parse = True, _parse_exact
    elif kind in _RULE_TYPES:
        fixed, parse = False, partial(_parse_rules, pattern=_RULE_TYPES[kind], expand=kind != "cidr")
    else:
        raise TableError(spec, None, f'unsupported table type "{kind}" (supported: {supported})')
    if not name:
        raise TableError(spec, None, "no file name")
    return Table(spec, fixed, lambda: parse(name, _logical_lines(name, _read(name)), validate))


# ---------------------------------------------------------------- access(5) lookups

Keys = Iterable[tuple[str, bool]]  # (key, partial); partial keys skip pattern tables


def _first(table: Table, keys: Keys) -> str | None:
    for key, is_partial in keys:
        if key and (table.fixed or not is_partial):
            value = table.lookup(key)
            if value is not None:
                return value
    return None


def _domain_keys(domain: str) -> Iterator[tuple[str, bool]]:
    """*domain*, then its parent domains down to the TLD (not for addresses)."""
    yield domain, False
    if domain.startswith("[") or parse_ip_or_none(domain) is not None:
        return
    name = domain
    while (dot := name.find(".", 1)) >= 0 and name[dot + 1:]:
        name = name[dot + 1:]
        yield name, True


def lookup_helo(table: Table, helo: str) -> str | None:
    """check_helo_access: the HELO name, then its parent domains."""
    return _first(table, _domain_keys(helo))


def lookup_client(table: Table, address: IPAddress, name: str | None = None) -> str | None:
    """check_client_access: host *name* and its parent domains (skipped when
    None), then the IP address and its truncations (``1.2.3.4``, ``1.2.3``,
    ``1.2``, ``1``; IPv6 cut at each ``:`` of the compressed form)."""
    keys: list[tuple[str, bool]] = list(_domain_keys(name)) if name else []
    text = str(address)
    keys.append((text, False))
    delim = ":" if ":" in text else "."
    while delim in text:
        text = text.rsplit(delim, 1)[0]
        keys.append((text, True))
    return _first(table, keys)


def lookup_address(table: Table, address: str, delimiter: str = "") -> str | None:
    """check_sender/recipient_access: ``user+ext@domain``, ``user@domain``,
    ``domain`` and its parents, ``user+ext@``, ``user@``.  The null sender is
    looked up as ``<>`` (smtpd_null_access_lookup_key).  *delimiter* is
    recipient_delimiter (any of its characters starts the extension)."""
    if not address:
        return _first(table, [("<>", False)])
    local, at, domain = address.rpartition("@")
    if not at:
        local, domain = address, ""
    cut = min((i for i in (local.find(c) for c in delimiter) if i > 0), default=len(local))
    bare = local[:cut]
    keys: list[tuple[str, bool]] = [(address, False)]
    if bare != local:
        keys.append((f"{bare}@{domain}" if at else bare, True))
    if domain:
        keys.extend((key, True) for key, _ in _domain_keys(domain))
    keys.append((f"{local}@", True))
    if bare != local:
        keys.append((f"{bare}@", True))
    return _first(table, keys)


# ---------------------------------------------------------------- access(5) actions

CLIENT = "Client host"
HELO = "Helo command"
SENDER = "Sender address"
RECIPIENT = "Recipient address"

ACCESS_REJECT_CODE = 554  # access_map_reject_code
ACCESS_DEFER_CODE = 450  # access_map_defer_code
CONFIG_ERROR = Reply(451, "4.3.5", "Server configuration error")


class AccessKind(enum.Enum):
    OK = "ok"  # OK, PERMIT, RELAY or an all-numerical result
    DUNNO = "dunno"  # no decision: go on
    REJECT = "reject"  # REJECT [text], 5NN text
    DEFER = "defer"  # DEFER [text], DEFER_IF_PERMIT [text], 4NN text
    WARN = "warn"  # WARN [text]: log only


@dataclass(frozen=True)
class AccessAction:
    """A parsed access(5) result; *code*/*status* are set for REJECT/DEFER."""

    kind: AccessKind
    code: int = 0
    status: str = ""
    text: str = ""

    @property
    def disconnect(self) -> bool:
        """421/521: hang up after the reply (Postfix 2.6 and later)."""
        return self.code in (421, 521)


_DSN = re.compile(r"([245]\.\d{1,3}\.\d{1,3})(?:\s+|$)")


def _split_status(default: str, text: str) -> tuple[str, str]:
    """dsn_split: a leading enhanced status code in *text*, else *default*."""
    m = _DSN.match(text)
    return (m.group(1), text[m.end():]) if m else (default, text)


def parse_action(value: str) -> AccessAction:
    """Parse an access(5) result; the action word is case-insensitive, so
    postscreen_access_list's ``permit``/``reject``/``dunno`` work too.
    Raises ValueError for actions smtpguard cannot carry out (HOLD, FILTER,
    DISCARD, REDIRECT, restriction names, ...)."""
    value = value.strip()
    word, text = _word(value)
    upper = word.upper()
    if upper in ("OK", "PERMIT", "RELAY") or value.isdigit():
        return AccessAction(AccessKind.OK)
    if upper == "DUNNO":
        return AccessAction(AccessKind.DUNNO)
    if upper == "WARN":
        return AccessAction(AccessKind.WARN, text=text)
    if upper in ("REJECT", "DEFER", "DEFER_IF_PERMIT"):
        reject = upper == "REJECT"
        status, text = _split_status("5.7.1" if reject else "4.7.1", text)
        default = "Service unavailable" if upper == "DEFER_IF_PERMIT" else "Access denied"
        code = ACCESS_REJECT_CODE if reject else ACCESS_DEFER_CODE
        return AccessAction(AccessKind.REJECT if reject else AccessKind.DEFER, code, status, text or default)
    if re.fullmatch(r"[45]\d\d", word) and text:
        status, text = _split_status(f"{word[0]}.7.1", text)
        kind = AccessKind.REJECT if word[0] == "5" else AccessKind.DEFER
        return AccessAction(kind, int(word), status, text or "Access denied")
    raise ValueError(f'unsupported access action "{value}"')


def validate_action(value: str) -> None:
    """A :func:`open_table` validator for access tables; a result whose
    action word is a ``$number`` substitution is checked at lookup time."""
    if "$" not in _word(value)[0]:
        parse_action(value)


def open_access_table(spec: str) -> Table:
    """:func:`open_table` with every result checked by :func:`parse_action`."""
    return open_table(spec, validate_action)


def check_access_spec(key: str, spec: str) -> None:
    """For a config section's validate(): raise ConfigError(*key*) unless
    *spec* is empty or opens as an access table."""
    if spec:
        try:
            open_access_table(spec)
        except TableError as exc:
            raise ConfigError(key, str(exc)) from None


# smtpd_dsn_fix: address-specific X.1.Y codes are rewritten for the kind of
# address rejected (micro code -> sender, recipient replacement).
_DSN_FIX = {"1": ("1.0", "1.1"), "2": ("1.8", "1.2"), "3": ("1.7", "1.3"), "4": ("1.0", "1.4"),
            "5": ("1.0", "1.5"), "6": ("1.0", "1.6"), "7": ("1.7", "1.3"), "8": ("1.8", "1.2")}


def _fix_status(status: str, code: int, kind: str) -> str:
    cls, subject, detail = status.split(".")
    if subject == "1":
        sender, recipient = _DSN_FIX.get(detail, ("1.0", "1.0"))
        subject, detail = {SENDER: sender, RECIPIENT: recipient}.get(kind, "0.0").split(".")
    return f"{str(code)[0]}.{subject}.{detail}"  # the reply code's class wins


def access_reply(action: AccessAction, kind: str, name: str) -> Reply:
    """The reply smtpd sends for a REJECT/DEFER *action*, e.g.
    ``554 5.7.1 <friend>: Helo command rejected: Access denied``; *kind* is
    :data:`CLIENT`, :data:`HELO`, :data:`SENDER` or :data:`RECIPIENT`, *name*
    the thing looked up (``host[ip]`` for clients, ``""`` for ``<>``)."""
    if action.kind not in (AccessKind.REJECT, AccessKind.DEFER):
        raise ValueError(f"{action.kind.name} has no reply")
    status = _fix_status(action.status, action.code, kind)
    return Reply(action.code, status, f"<{name}>: {kind} rejected: {action.text}")


def access_check(check: str, action: str, value: str | None, kind: str, name: str) -> Result:
    """The :class:`Result` of an access table lookup that returned *value*.

    No match and DUNNO/WARN are ``SKIP`` (the caller goes on; a WARN is in
    the result's ``warnings``), OK is ``PASS``, REJECT/DEFER/NNN are ``FAIL``.  The
    check's configured *action* applies as for any check, except that a
    table's 4xx stays a deferral and 421/521 hang up.  A result smtpguard
    cannot carry out gets smtpd's ``451 4.3.5 Server configuration error``
    whatever the action (smtpd never turns configuration errors into
    warnings).
    """
    if value is None:
        return Result(check, Outcome.SKIP, f"<{name}>: no match")
    try:
        found = parse_action(value)
    except ValueError as exc:
        return Result(check, Outcome.FAIL, f"<{name}>: {exc}", Verdict(Action.DEFER, CONFIG_ERROR))
    reason = f"<{name}>: {value}"
    if found.kind is AccessKind.OK:
        return Result(check, Outcome.PASS, reason)
    if found.kind is AccessKind.WARN:
        return Result(check, Outcome.SKIP, reason, warnings=(Warn(name, found.text),))
    if found.kind is AccessKind.DUNNO:
        return Result(check, Outcome.SKIP, reason)
    reply = access_reply(found, kind, name)
    return Result(check, Outcome.FAIL, str(reply), verdict_for(action, reply, as_given=True))
