"""The generated reference documents are committed up to date."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from smtpguard import docgen
from smtpguard.config import Config
from smtpguard.options import list_of, one_of, parse_hostport

DOCS = Path(__file__).resolve().parents[2] / "docs"


@pytest.mark.parametrize(("what", "path"), [("configuration", "configuration.md"),
                                            ("metrics", "metrics-reference.md")])
def test_generated_docs_are_current(what: str, path: str) -> None:
    generated = getattr(docgen, what)()
    assert (DOCS / path).read_text() == generated, (
        f"docs/{path} is stale: python -m smtpguard.docgen {what} > docs/{path}")


def test_every_key_is_documented() -> None:
    text = docgen.configuration()
    for f in dataclasses.fields(Config):
        section = getattr(Config(), f.name)
        assert f"## [{f.name}]" in text
        for kf in dataclasses.fields(section):
            assert f"| `{kf.name}` |" in text, f"{f.name}.{kf.name}"


def test_parser_names_and_values() -> None:
    assert docgen.describe_parser(one_of("a", "b")) == "one of `a`, `b`"
    assert docgen.describe_parser(list_of(parse_hostport)) == "list of `HOST:PORT`"
    assert docgen.duration(300.0) == '"5m"' and docgen.duration(100.0) == '"100s"'
    assert docgen.duration(172800.0) == '"2d"'
