"""Generate reference documentation from the code, so it cannot drift.

    python -m smtpguard.docgen configuration > docs/configuration.md
    python -m smtpguard.docgen metrics > docs/metrics-reference.md

``configuration`` walks :class:`smtpguard.config.Config`: every section, every
key with its type (read from its parser), default, the Postfix / postscreen /
postgrey parameter it corresponds to (``opt(..., equivalent)``) and its
description (``opt(..., doc=...)``, else :data:`DESCRIPTIONS`).  A section
another branch adds shows up on the next regeneration; the unit test
``tests/unit/test_docgen.py`` fails while the committed files are stale.

``metrics`` lists every metric in :data:`smtpguard.metrics.METRICS` with its
type, labels and help text.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

from .config import Config
from .metrics import METRICS
from .options import HostPort, parse_duration

#: Descriptions for keys whose ``opt()`` carries no ``doc``.
DESCRIPTIONS: dict[str, str] = {
    "server.listen": "Addresses to accept SMTP clients on.",
    "server.hostname": "The name in the banner, EHLO reply and logs.",
    "server.banner": "Text after `220` in the greeting; `$myhostname` is expanded.",
    "server.max_connections": "Client sessions at once; beyond it new clients get `421 4.3.2` and are closed.",
    "server.message_size_limit": "Largest message accepted (advertised in EHLO SIZE); `k`/`m`/`g` suffixes.",
    "server.line_length_limit": "Longest command or message line (at least 1000, RFC 5321).",
    "server.command_timeout": "Idle time allowed between client commands before `421` and close.",
    "server.data_timeout": "Idle time allowed while the client sends the message body.",
    "server.bare_newline": "Bare CR/LF in message data: `reject` (550, like Postfix) or `normalize` to CRLF.",
    "server.disable_vrfy_command": "Answer VRFY with 502.",
    "server.shutdown_timeout": "On SIGTERM: how long transactions in progress may take before 421 and close.",
    "upstream.address": "The Postfix smtpd that receives accepted sessions (must allow XCLIENT from us).",
    "upstream.connect_timeout": "Time to connect to Postfix and get its greeting.",
    "upstream.timeout": "Time to wait for each Postfix reply.",
    "state.url": "Where screening results, allowlist cache and greylist triplets live: "
                 "`sqlite:///relative/path`, `sqlite:////absolute/path`, `redis://host:port/db`, "
                 "`unix:///path/redis.sock?db=N`, `memory://`.",
    "metrics.listen": "HTTP endpoint for `/metrics`, `/healthz`, `/readyz`; `\"\"` disables it.",
    "log.level": "Lowest level logged: debug, info, warning, error.",
    "log.syslog_name": "First part of the program name in each line (`syslog_name/service_name[pid]`), "
                       "as Postfix's `syslog_name`.",
    "log.service_name": "Second part of the program name; `smtpd` keeps pflogsumm and fail2ban working "
                        "unchanged; `\"\"` logs as `syslog_name[pid]` alone.",
    "log.output": "`stderr` (Postfix `maillog_file` format, for journald/containers) or `syslog` "
                  "(/dev/log, facility mail).",
}


def describe_parser(parse: Any) -> str:
    """A human name for a config value's parser (``duration``, ``list of HOST:PORT`` ...)."""
    name = getattr(parse, "__qualname__", "")
    cells = [c.cell_contents for c in (getattr(parse, "__closure__", None) or ())]
    if name.startswith("one_of"):
        choices = next((c for c in cells if isinstance(c, tuple)), ())
        return "one of " + ", ".join(f"`{c}`" for c in choices)
    if name.startswith("list_of"):
        item = next((c for c in cells if callable(c)), None)
        return "list of " + (describe_parser(item) if item else "values")
    return {
        "parse_duration": "duration (`300s`, `5m`, `2d`)",
        "parse_size": "size (bytes, `k`/`m`/`g`)",
        "parse_int": "integer",
        "parse_bool": "boolean",
        "parse_str": "string",
        "parse_hostname": "host name",
        "parse_hostport": "`HOST:PORT`",
        "parse_optional_hostport": "`HOST:PORT` or `\"\"`",
        "parse_state_url": "URL",
    }.get(getattr(parse, "__name__", ""), _readable(getattr(parse, "__name__", "value")))


def _readable(parser_name: str) -> str:
    """``parse_network`` -> ``network`` for parsers this module does not know."""
    return parser_name.removeprefix("parse_").replace("_", " ")


def toml_value(value: Any) -> str:
    """A default as it would be written in the TOML file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return '""'
    if isinstance(value, HostPort):
        return f'"{value}"'
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    sources = getattr(value, "sources", None)  # a value loaded from files: what was written is the file list
    if isinstance(sources, tuple):
        return toml_value(sources)
    if dataclasses.is_dataclass(value):  # written as a string: [policy]'s endpoints and checks
        return f'"{value}"'
    return str(value)


def duration(seconds: float) -> str:
    """``300.0`` -> ``"5m"``: the largest unit that divides evenly."""
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f'"{int(seconds // size)}{unit}"'
    return f'"{int(seconds)}s"' if float(seconds).is_integer() else f'"{seconds}s"'


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _sections(cls: type, prefix: str) -> list[tuple[str, type]]:
    out = [(prefix, cls)]
    for f in dataclasses.fields(cls):
        if "parse" not in f.metadata and dataclasses.is_dataclass(_default(f)):
            out += _sections(type(_default(f)), f"{prefix}.{f.name}")
    return out


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def configuration() -> str:
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated by `python -m smtpguard.docgen configuration > docs/configuration.md`;"
        " do not edit by hand. -->",
        "",
        "One TOML file (`smtpguard serve -c /etc/smtpguard/smtpguard.toml`), one table per section. Every key is"
        " optional; the default is used when it is absent. `smtpguard check-config -c FILE` validates a file and"
        " names the key of the first error (`greylist.delay: ...`). SIGHUP re-reads the file (see"
        " [operations](operations.md#hot-reload)); `server.listen` and `metrics.listen` need a restart.",
        "",
        "Durations are written like Postfix's: `300s`, `5m`, `2h`, `2d`, `1w`, or a bare number of seconds."
        " Sizes are bytes with an optional `k`/`m`/`g` suffix (powers of 1024).",
        "",
    ]
    for f in dataclasses.fields(Config):
        for section, cls in _sections(type(_default(f)), f.name):
            lines += [f"## [{section}]", ""]
            doc = (cls.__doc__ or "").strip()
            if doc and not doc.startswith(cls.__name__ + "("):
                lines += [doc, ""]
            lines += ["| key | type | default | Postfix / postscreen / postgrey | description |",
                      "|---|---|---|---|---|"]
            for kf in dataclasses.fields(cls):
                if "parse" not in kf.metadata:
                    continue
                key = f"{section}.{kf.name}"
                desc = kf.metadata.get("doc") or DESCRIPTIONS.get(key, "")
                equivalent = kf.metadata.get("equivalent") or ""
                equivalent_cell = f"`{_cell(equivalent)}`" if equivalent and " " not in equivalent else _cell(
                    equivalent) or "—"
                default = _default(kf)
                shown = duration(default) if kf.metadata["parse"] is parse_duration else toml_value(default)
                lines.append(f"| `{kf.name}` | {_cell(describe_parser(kf.metadata['parse']))} | "
                             f"`{_cell(shown)}` | {equivalent_cell} | {_cell(desc)} |")
            lines.append("")
    return "\n".join(lines)


def metrics() -> str:
    lines = [
        "# Metrics reference",
        "",
        "<!-- Generated by `python -m smtpguard.docgen metrics > docs/metrics-reference.md`;"
        " do not edit by hand. -->",
        "",
        "Every metric smtpguard exports on `[metrics] listen` at `/metrics`. Labels are bounded sets; no label"
        " ever holds a client address, sender or recipient. See [metrics.md](metrics.md) for queries and alerts.",
        "",
        "| metric | type | labels | help |",
        "|---|---|---|---|",
    ]
    for family in sorted(METRICS.registry.collect(), key=lambda fam: fam.name):
        name = family.name + ("_total" if family.type == "counter" else "")
        labels = _label_names(family.name)
        lines.append(f"| `{name}` | {family.type} | {', '.join(f'`{x}`' for x in labels) or '—'} | "
                     f"{_cell(family.documentation)} |")
    return "\n".join(lines) + "\n"


def _label_names(family_name: str) -> list[str]:
    for f in dataclasses.fields(METRICS):
        obj = getattr(METRICS, f.name)
        if getattr(obj, "_name", None) == family_name:
            return list(getattr(obj, "_labelnames", ()))
    return []


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    what = args[0] if args else "configuration"
    if what == "configuration":
        sys.stdout.write(configuration())
    elif what == "metrics":
        sys.stdout.write(metrics())
    else:
        print("usage: python -m smtpguard.docgen configuration|metrics", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
