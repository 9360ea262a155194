"""Configuration: one TOML file, one section per concern, frozen dataclasses.

How it works: every section is a frozen dataclass whose fields carry their
default and, in ``metadata``, a *parser* (``field(default=..., metadata=
opt(parse_duration, "postscreen_greet_wait"))``; the parsers are in
:mod:`smtpguard.options`).  :func:`load_section` walks the fields, feeds each
TOML value through its parser and raises :class:`ConfigError` naming the
dotted key (``greylist.delay: ...``) for every bad value and for any key
the section does not declare (all of them, :class:`ConfigErrors`).  Sections are declared next to the concern
that uses them (each check's in its module under :mod:`smtpguard.checks`)
and only assembled here, in :class:`Config`; :func:`load` reads the file and
builds the whole tree.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .checks.access import AccessConfig
from .checks.addresses import AddressConfig
from .checks.barenewline import BareNewlineConfig
from .checks.dnsbl import DnsblConfig, RhsblConfig
from .checks.domains import HeloHostnameConfig, SenderDomainConfig
from .checks.errors import ErrorsConfig
from .checks.greylist import GreylistConfig
from .checks.helo import HeloConfig
from .checks.limits import LimitsConfig
from .checks.nonsmtp import NonSmtpConfig
from .checks.pipelining import PipeliningConfig
from .checks.pregreet import PregreetConfig
from .checks.rdns import ClientNameConfig
from .dns import DnsConfig
from .handoff import HandoffConfig
from .options import ConfigError as ConfigError  # re-exported: load() raises it
from .options import HostPort as HostPort  # re-exported: the type of the address settings
from .options import (
    collect_warnings,
    list_of,
    one_of,
    opt,
    parse_bool,
    parse_duration,
    parse_hostname,
    parse_hostport,
    parse_int,
    parse_network,
    parse_optional_hostport,
    parse_size,
    parse_state_url,
    parse_str,
)
from .policy.settings import PolicyConfig
from .store.failfast import Limits
from .stress import StressConfig
from .tls import TlsConfig

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

Section = TypeVar("Section", bound="DataclassInstance")


# ---------------------------------------------------------------- loading

@dataclass(frozen=True)
class Problem:
    """One error or warning found in a configuration: its dotted key, what is
    wrong and, when read from a file, the line of the key (or its section)."""

    key: str
    problem: str
    warning: bool = False
    line: int | None = None

    def format(self, source: str | None = None) -> str:
        """``smtpguard.toml:14: greylist.delay: ...`` (``warning: `` before the key for a warning)."""
        where = f"{source}:{self.line}: " if source and self.line else f"{source}: " if source else ""
        key = f"{self.key}: " if self.key else ""
        return f"{where}{'warning: ' if self.warning else ''}{key}{self.problem}"


class ConfigErrors(ConfigError):
    """Every error of a configuration (``problems``: errors and warnings);
    ``str()`` joins the errors with ``; ``."""

    def __init__(self, problems: list[Problem]) -> None:
        errors = [p for p in problems if not p.warning]
        super().__init__(errors[0].key, "; ".join(
            [errors[0].problem] + [f"{p.key}: {p.problem}" for p in errors[1:]]))
        self.problems = problems


class Report:
    """Collects the problems of one load; :func:`load_section` and
    :func:`from_dict` go on after an error so that all are reported at once."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def add(self, key: str, problem: str, warning: bool = False) -> None:
        self.problems.append(Problem(key, problem, warning))

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if not p.warning]

    def raise_errors(self) -> None:
        if self.errors:
            raise ConfigErrors(self.problems)


def load_section(cls: type[Section], table: Any, prefix: str, report: Report | None = None) -> Section:
    """Build dataclass *cls* from TOML *table*; problems name ``prefix.key``.

    With a *report*, every problem goes into it and a section with errors
    comes back with its defaults; without one, errors raise
    :class:`ConfigErrors` (all of them).  A section may have ``imply(values)``
    (values implied by others, before construction) and ``validate()``
    (checks across keys; may :func:`~smtpguard.options.warn`)."""
    if report is None:
        report = Report()
        obj = load_section(cls, table, prefix, report)
        report.raise_errors()
        return obj
    if not isinstance(table, Mapping):
        report.add(prefix, f"expected a table [{prefix}], got {table!r}")
        return cls()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    failed = False
    for key, raw in table.items():
        f = fields.get(key)
        if f is None:
            report.add(f"{prefix}.{key}", "unknown key")
            failed = True
            continue
        parse = f.metadata.get("parse")
        if parse is None:  # a nested section
            before = len(report.errors)
            values[key] = load_section(_section_type(f), raw, f"{prefix}.{key}", report)
            failed = failed or len(report.errors) > before
            continue
        with collect_warnings() as warnings:
            try:
                values[key] = parse(raw)
            except ValueError as exc:
                report.add(f"{prefix}.{key}", str(exc))
                failed = True
        for _, message in warnings:
            report.add(f"{prefix}.{key}", message, warning=True)
    if failed:
        return cls()
    imply = getattr(cls, "imply", None)
    if imply is not None:
        imply(values)
    obj = cls(**values)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        with collect_warnings() as warnings:
            try:
                validate()
            except ConfigError as exc:
                report.add(f"{prefix}.{exc.key}", exc.problem)
                obj = cls()
        for key, message in warnings:
            report.add(f"{prefix}.{key}" if key else prefix, message, warning=True)
    return obj


def _section_type(f: dataclasses.Field[Any]) -> type:
    factory = f.default_factory
    if factory is dataclasses.MISSING:
        raise TypeError(f"field {f.name} has neither parser nor section factory")
    return type(factory())


# ---------------------------------------------------------------- sections

@dataclass(frozen=True)
class ServerConfig:
    listen: tuple[HostPort, ...] = field(
        default=(HostPort("127.0.0.1", 2525),),
        metadata=opt(list_of(parse_hostport), "inet_interfaces, inet_protocols + master.cf smtp service"),
    )
    hostname: str = field(default="localhost", metadata=opt(parse_hostname, "myhostname"))
    banner: str = field(default="$myhostname ESMTP", metadata=opt(parse_str, "smtpd_banner"))
    max_connections: int = field(
        default=1000, metadata=opt(parse_int, "default_process_limit (postscreen: postscreen_pre_queue_limit)")
    )
    message_size_limit: int = field(default=10240000, metadata=opt(parse_size, "message_size_limit"))
    line_length_limit: int = field(default=2048, metadata=opt(parse_size, "line_length_limit"))
    command_timeout: float = field(default=300.0, metadata=opt(parse_duration, "smtpd_timeout"))
    data_timeout: float = field(default=300.0, metadata=opt(parse_duration, "smtpd_timeout (during DATA)"))
    bare_newline: str = field(
        default="reject",
        metadata=opt(one_of("reject", "normalize"), "smtpd_forbid_bare_newline"),
    )
    disable_vrfy_command: bool = field(default=True, metadata=opt(parse_bool, "disable_vrfy_command"))
    shutdown_timeout: float = field(default=30.0, metadata=opt(parse_duration, ""))
    # PROXY protocol input (v1 and v2) from a load balancer; see docs/transport.md.
    proxy_protocol: bool = field(
        default=False, metadata=opt(parse_bool, "postscreen_upstream_proxy_protocol = haproxy")
    )
    proxy_trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = field(
        default=(ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")),
        metadata=opt(list_of(parse_network), "none (Postfix trusts every sender on a proxy listener)"),
    )
    proxy_timeout: float = field(default=5.0, metadata=opt(parse_duration, "postscreen_upstream_proxy_timeout"))
    # The asyncio event loop implementation (smtpguard.eventloop); a restart changes it.
    event_loop: str = field(
        default="auto",
        metadata=opt(one_of("auto", "asyncio", "uvloop"), "",
                     "Event loop: `uvloop` (libuv, about a tenth less CPU per relayed message), `asyncio` "
                     "(the standard library's), or `auto`: uvloop when it is installed, else asyncio. "
                     "Logged at start; a change needs a restart."),
    )

    def validate(self) -> None:
        if not self.listen:
            raise ConfigError("listen", "at least one HOST:PORT is required")
        if self.line_length_limit < 1000:
            raise ConfigError("line_length_limit", "must be at least 1000 (RFC 5321)")

    @property
    def greeting(self) -> str:
        """The banner text with ``$myhostname`` expanded, as smtpd_banner."""
        return self.banner.replace("$myhostname", self.hostname).replace("${myhostname}", self.hostname)


@dataclass(frozen=True)
class UpstreamConfig:
    address: HostPort = field(
        default=HostPort("127.0.0.1", 10025), metadata=opt(parse_hostport, "smtpd_proxy_filter")
    )
    connect_timeout: float = field(default=10.0, metadata=opt(parse_duration, "smtp_connect_timeout"))
    timeout: float = field(default=100.0, metadata=opt(parse_duration, "smtpd_proxy_timeout"))
    data_done_timeout: float = field(
        default=600.0,
        metadata=opt(parse_duration, "smtp_data_done_timeout",
                     "How long the reply to the final dot may take (RFC 1047): a 4xx while Postfix still queues "
                     "the message would make the client send it twice."),
    )


@dataclass(frozen=True)
class StateConfig:
    url: str = field(
        default="sqlite:///state/smtpguard.db",
        metadata=opt(parse_state_url, "postscreen_cache_map; postgrey --dbdir"),
    )
    cleanup_interval: float = field(
        default=3600.0,
        metadata=opt(parse_duration, "postscreen_cache_cleanup_interval; postgrey's nightly maintenance"),
    )
    # How the store fails fast (smtpguard.store.failfast, docs/operations.md).
    deadline: float = field(
        default=1.0,
        metadata=opt(parse_duration, "", "Store time one session may spend, all its store calls together; "
                     "then `greylist.on_store_error` decides."),
    )
    breaker_failures: int = field(
        default=5,
        metadata=opt(parse_int, "", "Consecutive store failures after which the store is skipped for "
                     "`breaker_backoff` (0: never skipped)."),
    )
    breaker_backoff: float = field(
        default=10.0,
        metadata=opt(parse_duration, "", "How long a failing store is skipped before one call tries it again."),
    )
    write_queue: int = field(
        default=10000,
        metadata=opt(parse_int, "", "Client IPs whose allowlist-cache writes may wait for the background "
                     "writer; more are dropped and counted."),
    )

    def validate(self) -> None:
        if self.deadline <= 0:
            raise ConfigError("deadline", "must be longer than 0s")
        if self.breaker_failures < 0:
            raise ConfigError("breaker_failures", "must be 0 (never) or more")
        if self.write_queue < 1:
            raise ConfigError("write_queue", "must be at least 1")

    def limits(self) -> Limits:
        return Limits(self.deadline, self.breaker_failures, self.breaker_backoff, self.write_queue)


@dataclass(frozen=True)
class MetricsConfig:
    listen: HostPort | None = field(
        default=HostPort("127.0.0.1", 9125), metadata=opt(parse_optional_hostport, "")
    )


@dataclass(frozen=True)
class LogConfig:
    level: str = field(default="info", metadata=opt(one_of("debug", "info", "warning", "error"), ""))
    syslog_name: str = field(default="postfix", metadata=opt(parse_str, "syslog_name"))
    service_name: str = field(
        default="smtpd", metadata=opt(parse_str, "master.cf service name (the part after syslog_name/)")
    )
    output: str = field(
        default="stderr", metadata=opt(one_of("stderr", "syslog", "journal", "auto"), "maillog_file / syslog")
    )


@dataclass(frozen=True)
class ScreenConfig:
    """``[screen]``: how screening verdicts are delivered."""

    delay_reject: bool = field(default=True, metadata=opt(parse_bool, "smtpd_delay_reject"))


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    handoff: HandoffConfig = field(default_factory=HandoffConfig)
    state: StateConfig = field(default_factory=StateConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    # Screening, in the order the pipeline applies them.
    screen: ScreenConfig = field(default_factory=ScreenConfig)
    stress: StressConfig = field(default_factory=StressConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    access: AccessConfig = field(default_factory=AccessConfig)
    dnsbl: DnsblConfig = field(default_factory=DnsblConfig)
    pregreet: PregreetConfig = field(default_factory=PregreetConfig)
    pipelining: PipeliningConfig = field(default_factory=PipeliningConfig)
    non_smtp: NonSmtpConfig = field(default_factory=NonSmtpConfig)
    bare_newline: BareNewlineConfig = field(default_factory=BareNewlineConfig)
    errors: ErrorsConfig = field(default_factory=ErrorsConfig)
    client_name: ClientNameConfig = field(default_factory=ClientNameConfig)
    helo: HeloConfig = field(default_factory=HeloConfig)
    helo_hostname: HeloHostnameConfig = field(default_factory=HeloHostnameConfig)
    addresses: AddressConfig = field(default_factory=AddressConfig)
    greylist: GreylistConfig = field(default_factory=GreylistConfig)
    sender_domain: SenderDomainConfig = field(default_factory=SenderDomainConfig)
    rhsbl: RhsblConfig = field(default_factory=RhsblConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)


def from_dict(data: Mapping[str, Any], report: Report | None = None) -> Config:
    """Build a :class:`Config` from an already parsed TOML document (see
    :func:`load_section` for *report*)."""
    if report is None:
        report = Report()
        cfg = from_dict(data, report)
        report.raise_errors()
        return cfg
    root = {f.name: f for f in dataclasses.fields(Config)}
    values: dict[str, Any] = {}
    for key, table in data.items():
        f = root.get(key)
        if f is None:
            report.add(key, "unknown section")
            continue
        values[key] = load_section(_section_type(f), table, key, report)
    return Config(**values)


_TOML_LINE = re.compile(r"\(at line (\d+), column \d+\)")
_HEADER = re.compile(r"\s*\[\[?\s*([A-Za-z0-9_.\-\" ]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"\s*([A-Za-z0-9_\-]+(?:\s*\.\s*[A-Za-z0-9_\-]+)*)\s*=")


def key_lines(text: str) -> dict[str, int]:
    """Where each ``section.key`` (and each ``section``) of a TOML document
    is first written: enough of TOML's grammar for the line of a problem."""
    lines: dict[str, int] = {}
    table = ""
    depth = 0  # inside a multi-line array or inline table
    for number, line in enumerate(text.splitlines(), 1):
        if depth == 0:
            m = _HEADER.match(line)
            if m:
                table = m.group(1).replace(" ", "").replace('"', "")
                lines.setdefault(table, number)
                continue
            m = _KEY.match(line)
            if m:
                key = m.group(1).replace(" ", "")
                lines.setdefault(f"{table}.{key}" if table else key, number)
        code = re.sub(r"\"(\\.|[^\"\\])*\"|'[^']*'", "", line).partition("#")[0]
        depth = max(0, depth + code.count("[") + code.count("{") - code.count("]") - code.count("}"))
    return lines


def _line_of(key: str, lines: Mapping[str, int]) -> int | None:
    while key:
        if key in lines:
            return lines[key]
        key = key.rpartition(".")[0]
    return None


def check(path: str | Path) -> tuple[Config | None, list[Problem]]:
    """Read *path*: the configuration (None when there are errors) and every
    problem found, each with the line of its key."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        return None, [Problem("", exc.strerror or str(exc))]
    except UnicodeDecodeError as exc:
        return None, [Problem("", f"not UTF-8 text: {exc}")]
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = _TOML_LINE.search(str(exc))
        return None, [Problem("", f"TOML syntax error: {exc}", line=int(m.group(1)) if m else None)]
    report = Report()
    cfg = from_dict(data, report)
    lines = key_lines(text)
    problems = [dataclasses.replace(pr, line=_line_of(pr.key, lines)) for pr in report.problems]
    problems.sort(key=lambda pr: pr.line or 0)
    return (None if report.errors else cfg), problems


def load(path: str | Path) -> Config:
    """Read and validate a TOML configuration file; errors raise
    :class:`ConfigError` (:class:`ConfigErrors` with all of them)."""
    cfg, problems = check(path)
    if cfg is None:
        errors = [pr for pr in problems if not pr.warning]
        if len(errors) == 1 and not errors[0].key:  # unreadable, or not TOML
            raise ConfigError(str(path), errors[0].problem)
        raise ConfigErrors(problems)
    return cfg
