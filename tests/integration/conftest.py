"""Fixtures for end-to-end tests: smtpguard (a real subprocess) in front of
the private Postfix from ``tests/conftest.py``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.guard import Guard
from tests.lab import PrivatePostfix


@pytest.fixture
def make_guard(tmp_path: Path) -> Iterator[Callable[..., Guard]]:
    """Factory: ``make_guard(upstream_port, extra_toml)`` starts smtpguard."""
    started: list[Guard] = []

    def make(upstream_port: int, extra: str = "", **kw: object) -> Guard:
        workdir = tmp_path / f"guard{len(started)}"
        workdir.mkdir()
        g = Guard(workdir, upstream_port, extra, **kw).start()  # type: ignore[arg-type]
        started.append(g)
        return g

    yield make
    for g in started:
        g.stop()


@pytest.fixture
def guard(backend: PrivatePostfix, make_guard: Callable[..., Guard]) -> Guard:
    """smtpguard on its defaults, relaying to the private Postfix."""
    return make_guard(backend.port)
