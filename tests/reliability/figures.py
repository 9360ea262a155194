"""Figures the fault suite measures, and the table ``make soak`` prints.

Each test calls :func:`record` with what it measured; with
``SMTPGUARD_SOAK_REPORT=FILE`` set the figures are appended to FILE as JSON
lines, and ``python tests/reliability/figures.py FILE`` prints them as a
table.  ``SMTPGUARD_SOAK=1`` selects the full sizes (:func:`size`)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def soak() -> bool:
    return os.environ.get("SMTPGUARD_SOAK", "") not in ("", "0")


def size(reduced: int, full: int) -> int:
    """*reduced* in ``make test``, *full* in ``make soak``."""
    return full if soak() else reduced


def record(scenario: str, **figures: object) -> None:
    line = json.dumps({"scenario": scenario, **figures})
    print(f"figures: {line}")
    path = os.environ.get("SMTPGUARD_SOAK_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


def table(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    out = [f"{'scenario':<48} figures", f"{'-' * 48} {'-' * 60}"]
    for row in rows:
        name = row.pop("scenario")
        out.append(f"{name:<48} " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in row.items()))
    return "\n".join(out)


if __name__ == "__main__":
    print(table(Path(sys.argv[1])))
