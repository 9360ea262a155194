"""The ``[policy]`` section: where the policy service listens, which checks it
runs at which ``protocol_state``, and what it answers.

:mod:`smtpguard.config` registers the section with a lazy factory and does
not import this module when it is itself imported, so this module may use
its parsers without an import cycle.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ..options import ConfigError, HostPort, opt, parse_duration, parse_hostport, parse_int, parse_size, parse_str

#: Postfix's protocol_state values (SMTPD_POLICY_README).
STATES = ("CONNECT", "EHLO", "HELO", "MAIL", "RCPT", "DATA", "END-OF-MESSAGE", "VRFY", "ETRN")

#: The checks the policy service can run, in the order it runs them
#: (smtpd's restriction classes: client, helo, sender, recipient; then
#: greylisting, which postgrey puts last).  Each names the section whose
#: settings it uses.
CHECKS: dict[str, str] = {
    "connection_rate": "limits",
    "client_access": "access",
    "dnsbl": "dnsbl",
    "client_name": "client_name",
    "rhsbl_reverse_client": "rhsbl",
    "helo": "helo",
    "helo_hostname": "helo_hostname",
    "rhsbl_helo": "rhsbl",
    "sender": "addresses",
    "sender_domain": "sender_domain",
    "rhsbl_sender": "rhsbl",
    "sender_rate": "limits",
    "recipient": "addresses",
    "greylist": "greylist",
}


#: Where a check runs when no ``@STATE`` follows its name (RCPT for the others).
DEFAULT_STATES: dict[str, frozenset[str]] = {"connection_rate": frozenset({"CONNECT"})}
#: The only states a check may run at: a rate counts each request it sees,
#: so the connection rate counts at CONNECT (once per SMTP session) and the
#: sender rate at MAIL or RCPT (once per message, by ``instance``).
ALLOWED_STATES: dict[str, frozenset[str]] = {"connection_rate": frozenset({"CONNECT"}),
                                             "sender_rate": frozenset({"MAIL", "RCPT"})}


@dataclass(frozen=True)
class Endpoint:
    """A policy listener: ``HOST:PORT`` (inet) or ``unix:/path``."""

    inet: HostPort | None = None
    path: str = ""

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.inet is None else str(self.inet)

    @property
    def postfix(self) -> str:
        """How ``check_policy_service`` names it (``inet:127.0.0.1:10023``)."""
        return f"unix:{self.path}" if self.inet is None else f"inet:{self.inet}"


def parse_endpoint(value: Any) -> Endpoint:
    text = parse_str(value)
    if text.startswith("unix:"):
        path = text.removeprefix("unix:")
        if not path.startswith("/"):
            raise ValueError(f'expected unix:/absolute/path, got "{text}"')
        return Endpoint(path=path)
    return Endpoint(inet=parse_hostport(text.removeprefix("inet:")))


def parse_endpoints(value: Any) -> tuple[Endpoint, ...]:
    """One endpoint, a list of them, or ``""``/``[]`` for none (off)."""
    if value == "" or value == []:
        return ()
    items = value if isinstance(value, list) else [value]
    out = []
    for i, item in enumerate(items):
        try:
            out.append(parse_endpoint(item))
        except ValueError as exc:
            raise ValueError(f"entry {i + 1}: {exc}" if len(items) > 1 else str(exc)) from None
    return tuple(out)


@dataclass(frozen=True)
class CheckAt:
    """A check and the protocol states it runs at."""

    name: str
    states: frozenset[str]

    def __str__(self) -> str:
        return f"{self.name}@{','.join(s for s in STATES if s in self.states)}"


def parse_check(value: Any) -> CheckAt:
    """``greylist`` (at RCPT) or ``rhsbl_helo@RCPT,HELO``."""
    text = parse_str(value).strip()
    name, at, states = text.partition("@")
    if name not in CHECKS:
        raise ValueError(f"unknown check {name!r}; expected one of {', '.join(CHECKS)}")
    chosen = (frozenset(s.strip().upper() for s in states.split(",")) if at
              else DEFAULT_STATES.get(name, frozenset({"RCPT"})))
    bad = sorted(chosen - set(STATES))
    if bad:
        raise ValueError(f"unknown protocol_state {bad[0]!r} in {text!r}; expected {', '.join(STATES)}")
    allowed = ALLOWED_STATES.get(name)
    if allowed is not None and not chosen <= allowed:
        raise ValueError(f"{name} runs only at {' or '.join(s for s in STATES if s in allowed)}, not {text!r}")
    return CheckAt(name, chosen)


def parse_checks(value: Any) -> tuple[CheckAt, ...]:
    if not isinstance(value, list):
        raise ValueError(f"expected a list like [\"greylist\", \"rhsbl_sender@RCPT\"], got {value!r}")
    out: dict[str, CheckAt] = {}
    for i, item in enumerate(value):
        try:
            check = parse_check(item)
        except ValueError as exc:
            raise ValueError(f"entry {i + 1}: {exc}") from None
        if check.name in out:
            raise ValueError(f"entry {i + 1}: {check.name} is listed twice")
        out[check.name] = check
    return tuple(sorted(out.values(), key=lambda c: list(CHECKS).index(c.name)))


_ACTION = re.compile(
    r"(DUNNO|OK|DEFER_IF_PERMIT|DEFER_IF_REJECT|DEFER|REJECT|WARN|INFO|HOLD|DISCARD|PREPEND|[45]\d\d)(\s.*)?",
    re.IGNORECASE,
)


def parse_action(value: Any) -> str:
    """An access(5) action (``DUNNO``, ``DEFER_IF_PERMIT``, ``451 4.3.5 text``...)."""
    text = parse_str(value).strip()
    if not _ACTION.fullmatch(text) or "\n" in text or "\r" in text:
        raise ValueError(f'expected an access(5) action like DUNNO, DEFER_IF_PERMIT or "451 4.3.0 text", got "{text}"')
    return text


def parse_greylist_action(value: Any) -> str:
    """What a greylisted recipient gets: ``DEFER_IF_PERMIT``, ``DEFER`` or a
    4xx code (postgrey's ``--greylist-action``); the text follows it."""
    text = parse_str(value).strip()
    if not re.fullmatch(r"DEFER_IF_PERMIT|DEFER|4\d\d", text, re.IGNORECASE):
        raise ValueError(f'expected DEFER_IF_PERMIT, DEFER or a 4xx code like 451, got "{text}"')
    return text.upper()


def parse_header(value: Any) -> str:
    text = parse_str(value)
    if text and not re.fullmatch(r"[!-9;-~]+:[ -~]*", text):
        raise ValueError(f'expected one header line "Name: value" (or "" for none), got "{text}"')
    return text


#: postgrey's --x-greylist-header, with smtpguard's name
DEFAULT_HEADER = "X-Greylist: delayed %t seconds by smtpguard-%v at %h; %d"


@dataclass(frozen=True)
class PolicyConfig:
    """The Postfix policy service (`check_policy_service`), see [policy.md](policy.md)."""

    listen: tuple[Endpoint, ...] = field(
        default=(),
        metadata=opt(parse_endpoints, "postgrey --inet=10023 / --unix=PATH",
                     '"127.0.0.1:10023" or "unix:/path"; empty: no policy service in `serve`'),
    )
    checks: tuple[CheckAt, ...] = field(
        default=(CheckAt("greylist", frozenset({"RCPT"})),),
        metadata=opt(parse_checks, "",
                     "checks to run, each at RCPT or at the states after @ (\"rhsbl_helo@HELO,RCPT\"); "
                     "each uses its own section's settings"),
    )
    default_action: str = field(
        default="DUNNO",
        metadata=opt(parse_action, "", "the answer to a request that cannot be evaluated (malformed, "
                                       "oversized) or that failed with an internal error"),
    )
    greylist_action: str = field(
        default="DEFER_IF_PERMIT",
        metadata=opt(parse_greylist_action, "--greylist-action=DEFER_IF_PERMIT",
                     "followed by 4.2.0 and [greylist] text"),
    )
    greylist_header: str = field(
        default=DEFAULT_HEADER,
        metadata=opt(parse_header, "--x-greylist-header",
                     "PREPENDed when a triplet passes (%t delay, %v version, %h hostname, %d date); "
                     "\"\" for none"),
    )
    timeout: float = field(
        default=100.0,
        metadata=opt(parse_duration, "smtpd_policy_service_timeout",
                     "a request begun must end within this"),
    )
    idle_timeout: float = field(
        default=330.0,
        metadata=opt(parse_duration, "smtpd_policy_service_max_idle (300s)",
                     "a connection without a request is closed after this"),
    )
    max_attribute_size: int = field(
        default=8192, metadata=opt(parse_size, "", "one name=value line; longer: default_action")
    )
    max_request_size: int = field(
        default=65536, metadata=opt(parse_size, "", "one request; larger: default_action")
    )
    max_connections: int = field(
        default=1000, metadata=opt(parse_int, "postgrey's Net::Server max_servers",
                                   "concurrent Postfix connections; more are closed at once")
    )

    def validate(self) -> None:
        if self.max_attribute_size < 512:
            raise ConfigError("max_attribute_size", "must be at least 512")
        if self.max_request_size < self.max_attribute_size:
            raise ConfigError("max_request_size", "must not be smaller than max_attribute_size")
        if self.max_connections < 1:
            raise ConfigError("max_connections", "must be at least 1")

    def states_of(self, check: str) -> frozenset[str]:
        for c in self.checks:
            if c.name == check:
                return c.states
        return frozenset()
