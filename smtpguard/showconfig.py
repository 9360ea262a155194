"""``smtpguard show-config [-n]``: the effective configuration as TOML.

Like ``postconf``: every key with the value in effect (the file's or the
default); with ``-n`` (``postconf -n``) only what differs from the defaults,
values a key implies included (``[dnsbl] sites`` turns ``enabled`` on).  The
output is a valid configuration file: loading it gives the same
configuration (a unit test checks it).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
from typing import Any

from .config import Config
from .docgen import duration, key_type


def _string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a JSON string is a TOML basic string


def value(v: Any, kind: str = "") -> str:
    """*v*, a parsed setting, written back as the TOML value that parses to
    it; *kind* is the key's readable type (:func:`smtpguard.docgen.key_type`)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return '""'
    if isinstance(v, str):
        return _string(v)
    if isinstance(v, float) and kind.startswith("duration"):
        return duration(v)
    if isinstance(v, (int, float)):
        return repr(v)
    sources = getattr(v, "sources", None)  # allowlists loaded from files: the file names
    if isinstance(sources, tuple):
        return value(sources)
    if isinstance(v, tuple):
        if kind.startswith("table of"):  # reply_map: (name, shown) pairs
            return "{" + ", ".join(f"{_string(k)} = {_string(x)}" for k, x in v) + "}"
        if len(v) == 2 and isinstance(v[0], str) and isinstance(v[1], int) and not isinstance(v[1], bool):
            host, port = v  # a nameserver
            return _string(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        return "[" + ", ".join(value(e) for e in v) + "]"
    if isinstance(v, (ipaddress.IPv4Network, ipaddress.IPv6Network)) or dataclasses.is_dataclass(v):
        return _string(str(v))  # HostPort, Site, Endpoint, CheckAt: their str() is what is written
    return _string(str(v))


def render(cfg: Config, only_changed: bool = False, source: str = "") -> str:
    defaults = Config()
    lines = [f"# smtpguard show-config{' -n' if only_changed else ''}" + (f": {source}" if source else "")]
    for f in dataclasses.fields(Config):
        section, default = getattr(cfg, f.name), getattr(defaults, f.name)
        rows = []
        for kf in dataclasses.fields(section):
            if "parse" not in kf.metadata:
                continue
            v = getattr(section, kf.name)
            if only_changed and v == getattr(default, kf.name):
                continue
            kind = key_type(f"{f.name}.{kf.name}", kf.metadata["parse"]) or ""
            rows.append(f"{kf.name} = {value(v, kind)}")
        if rows:
            lines += ["", f"[{f.name}]", *rows]
    return "\n".join(lines) + "\n"
