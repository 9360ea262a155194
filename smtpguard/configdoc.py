"""Configuration reference tables, generated from the sections' metadata.

``python -m smtpguard.configdoc pregreet errors ...`` prints, for each
section, a Markdown table of its keys with their defaults (as TOML) and
their Postfix/postscreen equivalents -- the ``opt(parser, equivalent)``
metadata declared next to each key.  Without arguments it prints the
sections of docs/screening.md; ``--dns`` those of docs/dns.md.  The docs
embed the output; a unit test keeps them in step (:data:`DOCS`).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

from .config import Config

SCREENING = ("screen", "limits", "access", "pregreet", "pipelining", "non_smtp", "bare_newline", "errors",
             "helo", "addresses")
DNS = ("dns", "dnsbl", "client_name", "rhsbl", "sender_domain", "helo_hostname")
# Which page documents which sections.
DOCS = {"screening.md": SCREENING, "dns.md": DNS}


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        for unit, seconds in (("d", 86400), ("h", 3600), ("m", 60)):
            if value >= seconds and value % seconds == 0:
                return f'"{int(value // seconds)}{unit}"'
        return f'"{value:g}s"'
    if isinstance(value, tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, int):
        return str(value)
    return f'"{value}"'


def section_table(name: str, cfg: Config | None = None) -> str:
    section = getattr(cfg or Config(), name)
    rows = [f"**[{name}]**", "", "| key | default | Postfix / postscreen equivalent |", "|---|---|---|"]
    for f in dataclasses.fields(section):
        equivalent = f.metadata.get("equivalent") or "-"
        rows.append(f"| `{f.name}` | `{toml_value(getattr(section, f.name))}` | {equivalent} |")
    return "\n".join(rows) + "\n"


def main(argv: list[str]) -> None:
    names = DNS if argv == ["--dns"] else argv or SCREENING
    print("\n".join(section_table(name) for name in names))


if __name__ == "__main__":
    main(sys.argv[1:])
