"""Option parsers: how one TOML value becomes a typed setting.

Every configuration section (declared next to the concern that uses it:
:mod:`smtpguard.config` for the server's own, each check's in its module
under :mod:`smtpguard.checks`) describes its fields with :func:`opt`, which
names the field's parser and its Postfix equivalent.  A parser takes the raw
TOML value and returns the typed value or raises :class:`ValueError` with a
message that does not repeat the key; :func:`smtpguard.config.load_section`
adds the key and raises :class:`ConfigError`.

Durations are written like Postfix's (``300s``, ``5m``, ``2d``, a bare number
is seconds); sizes as bytes with optional ``k``/``m``/``g`` suffix.

This module imports nothing of smtpguard's but :mod:`smtpguard.net` (which
imports nothing), so any module may import it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

from .net import valid_hostname

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad configuration value; ``str()`` names the key: ``key: problem``."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


#: Warnings of the parser or validate() running now: (key or "", message).
_WARNINGS: ContextVar[list[tuple[str, str]] | None] = ContextVar("_WARNINGS", default=None)


def warn(message: str, key: str = "") -> None:
    """Report a value that is valid but probably not what was meant
    (``check-config`` prints it with the key, ``serve`` logs it).  A parser
    leaves *key* empty (the key being parsed is meant); a section's
    ``validate()`` names its key.  Outside :func:`collect_warnings`: ignored."""
    found = _WARNINGS.get()
    if found is not None:
        found.append((key, message))


@contextmanager
def collect_warnings() -> Iterator[list[tuple[str, str]]]:
    """The :func:`warn` calls made inside the ``with`` block."""
    found: list[tuple[str, str]] = []
    token = _WARNINGS.set(found)
    try:
        yield found
    finally:
        _WARNINGS.reset(token)


# ---------------------------------------------------------------- parsers

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
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def parse_size(value: Any) -> int:
    """Bytes, optionally with a ``k``/``m``/``g`` suffix (powers of 1024)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            return int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
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
    """A host name of ours (``server.hostname``, ``helo.our_domains``): no
    ``_``, since it goes into our banner and replies; no length limits and
    all-numeric names accepted, as always (see :func:`~smtpguard.net.valid_hostname`)."""
    text = parse_str(value)
    if not valid_hostname(text, underscore=False, lengths=False, numeric=True):
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
        network = ipaddress.ip_network(value.strip("[]"), strict=False)
    except ValueError:
        raise ValueError(f'expected a network like 192.0.2.0/24, got "{value}"') from None
    if "/" in value and network.network_address != ipaddress.ip_address(value.strip("[]").partition("/")[0]):
        host = value.strip("[]").partition("/")[0]
        warn(f'"{value}" has host bits set: it is read as {network}; '
             f'write "{network}", or "{host}/{network.max_prefixlen}" for the one host')
    return network


def parse_optional_hostport(value: Any) -> HostPort | None:
    """Like :func:`parse_hostport`; an empty string disables the listener."""
    return None if value == "" else parse_hostport(value)


def parse_state_url(value: Any) -> str:
    """``sqlite:///relative/path``, ``sqlite:////abs/path``, ``memory://``,
    ``redis://host:port/db`` (or ``unix:///path/redis.sock?db=N``,
    ``redis+sentinel://host:port,host:port/service?db=N``)."""
    text = parse_str(value)
    if text == "memory://":
        return text
    if text.startswith("sqlite:///") and len(text) > len("sqlite:///"):
        path = text.removeprefix("sqlite:///")
        if not path.startswith("/"):
            warn(f'"{text}" is the relative path {path}, from the directory smtpguard is started in; '
                 f'an absolute path takes four slashes: "sqlite:////{path}"')
        return text
    if re.fullmatch(r"rediss?://[^/\s]+(/\d+)?", text) or text.startswith("unix://"):
        return text
    if re.fullmatch(r"redis\+sentinel://[^/\s,]+:\d+(,[^/\s,]+:\d+)*/[^/?\s]+(\?db=\d+)?", text):
        return text
    raise ValueError(
        f'expected sqlite:///PATH, redis://HOST:PORT/DB, redis+sentinel://HOST:PORT,HOST:PORT/SERVICE?db=N '
        f'or memory://, got "{text}"'
    )


def opt(parser: Callable[[Any], Any], equivalent: str = "", doc: str = "") -> dict[str, Any]:
    """Field metadata: the value parser, the Postfix/postscreen/postgrey
    equivalent and a one-line description (both read by smtpguard.docgen)."""
    return {"parse": parser, "equivalent": equivalent, "doc": doc}
