"""Configuration: one TOML file, one section per concern, frozen dataclasses.

How it works: every section is a frozen dataclass whose fields carry their
default and, in ``metadata``, a *parser* (``field(default=..., metadata=
opt(parse_duration, "postscreen_greet_wait"))``).  :func:`load_section` walks
the fields, feeds each TOML value through its parser and raises
:class:`ConfigError` naming the dotted key (``greylist.delay: ...``) for the
first bad value or for any key the section does not declare.  Sections are
declared next to the concern that uses them and gathered in :class:`Config`;
:func:`load` reads the file and builds the whole tree.

Durations are written like Postfix's (``300s``, ``5m``, ``2d``, a bare number
is seconds); sizes as bytes with optional ``k``/``m``/``g`` suffix.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad configuration value; ``str()`` names the key: ``key: problem``."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


# ---------------------------------------------------------------- parsers
# Each parser takes the raw TOML value and returns the typed value or raises
# ValueError with a message that does not repeat the key (load_section adds it).

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(value: Any) -> float:
    """``300s``/``5m``/``2d``/``1w`` or a bare number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like 300s, 5m or 2d, got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"must not be negative, got {value}")
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _UNITS[m.group(2)]
    raise ValueError(f'expected a duration like 300s, 5m or 2d, got "{value}"')


_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]?)b?\s*$", re.IGNORECASE)


def parse_size(value: Any) -> int:
    """Bytes, optionally with a ``k``/``m``/``g`` suffix (powers of 1024)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            return int(m.group(1)) * 1024 ** " kmg".index(m.group(2).lower() or " ")
    raise ValueError(f'expected a size in bytes like 10240000 or 10m, got "{value}"')


def parse_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {value!r}")
    if value < 0:
        raise ValueError(f"must not be negative, got {value}")
    return value


def parse_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def parse_str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def parse_hostname(value: Any) -> str:
    text = parse_str(value)
    if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*", text):
        raise ValueError(f'expected a host name like mx.example.com, got "{text}"')
    return text


def one_of(*choices: str) -> Callable[[Any], str]:
    """Parser for an enumerated string value."""

    def parse(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {value!r}")
        return str(value)

    return parse


def list_of(item: Callable[[Any], T]) -> Callable[[Any], tuple[T, ...]]:
    """Parser for a TOML array; the error names the bad entry's index."""

    def parse(value: Any) -> tuple[T, ...]:
        if not isinstance(value, list):
            raise ValueError(f"expected a list, got {value!r}")
        out = []
        for i, entry in enumerate(value):
            try:
                out.append(item(entry))
            except ValueError as exc:
                raise ValueError(f"entry {i + 1}: {exc}") from None
        return tuple(out)

    return parse


@dataclass(frozen=True)
class HostPort:
    """A ``HOST:PORT`` endpoint; IPv6 hosts are written ``[::1]:25``."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_hostport(value: Any) -> HostPort:
    """``HOST:PORT`` / ``[IPv6]:PORT`` -> :class:`HostPort`."""
    text = value if isinstance(value, str) else repr(value)
    m = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:\[\]\s]+):(\d+)", text)
    if not isinstance(value, str) or not m:
        raise ValueError(f'expected HOST:PORT, got "{text}"')
    host, port = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    if m.group(1):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f'bad IPv6 address in "{text}"') from None
    if not 0 < int(port) < 65536:
        raise ValueError(f'port must be 1-65535, got "{text}"')
    return HostPort(host, int(port))


def parse_network(value: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """``192.0.2.0/24``, ``2001:db8::/32`` or a single address (a host network)."""
    if not isinstance(value, str):
        raise ValueError(f"expected a network like 192.0.2.0/24, got {value!r}")
    try:
        return ipaddress.ip_network(value.strip("[]"), strict=False)
    except ValueError:
        raise ValueError(f'expected a network like 192.0.2.0/24, got "{value}"') from None


def parse_optional_hostport(value: Any) -> HostPort | None:
    """Like :func:`parse_hostport`; an empty string disables the listener."""
    return None if value == "" else parse_hostport(value)


def parse_state_url(value: Any) -> str:
    """``sqlite:///relative/path``, ``sqlite:////abs/path``, ``memory://``,
    ``redis://host:port/db`` (or ``unix:///path/redis.sock?db=N``)."""
    text = parse_str(value)
    if text == "memory://":
        return text
    if text.startswith("sqlite:///") and len(text) > len("sqlite:///"):
        return text
    if re.fullmatch(r"rediss?://[^/\s]+(/\d+)?", text) or text.startswith("unix://"):
        return text
    raise ValueError(
        f'expected sqlite:///PATH, redis://HOST:PORT/DB or memory://, got "{text}"'
    )


def opt(parser: Callable[[Any], Any], equivalent: str = "", doc: str = "") -> dict[str, Any]:
    """Field metadata: the value parser, the Postfix/postscreen/postgrey
    equivalent and a one-line description (both read by smtpguard.docgen)."""
    return {"parse": parser, "equivalent": equivalent, "doc": doc}


# ---------------------------------------------------------------- loading

def load_section(cls: type[T], table: Any, prefix: str) -> T:
    """Build dataclass *cls* from TOML *table*; errors name ``prefix.key``."""
    if not isinstance(table, Mapping):
        raise ConfigError(prefix, f"expected a table [{prefix}], got {table!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    for key, raw in table.items():
        f = fields.get(key)
        if f is None:
            raise ConfigError(f"{prefix}.{key}", "unknown key")
        parse = f.metadata.get("parse")
        if parse is None:  # a nested section
            values[key] = load_section(_section_type(f), raw, f"{prefix}.{key}")
            continue
        try:
            values[key] = parse(raw)
        except ValueError as exc:
            raise ConfigError(f"{prefix}.{key}", str(exc)) from None
    obj = cls(**values)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate()
        except ConfigError as exc:
            raise ConfigError(f"{prefix}.{exc.key}", exc.problem) from None
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
    output: str = field(default="stderr", metadata=opt(one_of("stderr", "syslog"), "maillog_file"))


@dataclass(frozen=True)
class ScreenConfig:
    """``[screen]``: how screening verdicts are delivered."""

    delay_reject: bool = field(default=True, metadata=opt(parse_bool, "smtpd_delay_reject"))


# The check sections are declared next to their checks (smtpguard/checks/),
# which import the parsers above: import them only now.
from .checks.access import AccessConfig  # noqa: E402
from .checks.addresses import AddressConfig  # noqa: E402
from .checks.barenewline import BareNewlineConfig  # noqa: E402
from .checks.dnsbl import DnsblConfig, RhsblConfig  # noqa: E402
from .checks.domains import HeloHostnameConfig, SenderDomainConfig  # noqa: E402
from .checks.errors import ErrorsConfig  # noqa: E402
from .checks.greylist import GreylistConfig  # noqa: E402
from .checks.helo import HeloConfig  # noqa: E402
from .checks.limits import LimitsConfig  # noqa: E402
from .checks.nonsmtp import NonSmtpConfig  # noqa: E402
from .checks.pipelining import PipeliningConfig  # noqa: E402
from .checks.pregreet import PregreetConfig  # noqa: E402
from .checks.rdns import ClientNameConfig  # noqa: E402
from .dns import DnsConfig  # noqa: E402
from .handoff import HandoffConfig  # noqa: E402
from .tls import TlsConfig  # noqa: E402

if TYPE_CHECKING:
    from .policy.settings import PolicyConfig


def _policy_section() -> PolicyConfig:
    """``[policy]``, imported lazily: smtpguard.policy uses this module's parsers."""
    from .policy.settings import PolicyConfig

    return PolicyConfig()


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
    policy: PolicyConfig = field(default_factory=_policy_section)


def from_dict(data: Mapping[str, Any]) -> Config:
    """Build a :class:`Config` from an already parsed TOML document."""
    root = {f.name: f for f in dataclasses.fields(Config)}
    values: dict[str, Any] = {}
    for key, table in data.items():
        f = root.get(key)
        if f is None:
            raise ConfigError(key, "unknown section")
        values[key] = load_section(_section_type(f), table, key)
    return Config(**values)


def load(path: str | Path) -> Config:
    """Read and validate a TOML configuration file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(p), exc.strerror or str(exc)) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(p), f"TOML syntax error: {exc}") from None
    return from_dict(data)
