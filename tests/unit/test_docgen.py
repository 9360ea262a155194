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


def test_man_page_is_current() -> None:
    from smtpguard import manpage

    assert (DOCS / "smtpguard.8").read_text() == manpage.manpage(), (
        "docs/smtpguard.8 is stale: python -m smtpguard.manpage > docs/smtpguard.8")
    assert ".B show\\-config" in manpage.manpage() and ".B greylist stats" in manpage.manpage()


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


def test_every_key_has_a_description_and_a_readable_type() -> None:
    assert docgen.undescribed() == []
    text = docgen.configuration()
    for internal in ("| parse |", "| signed int |", "| reply map |", "| reply template |", "|  text |", "| ? |"):
        assert internal not in text


def test_an_undescribed_key_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(docgen.DESCRIPTIONS, "greylist.delay")
    assert docgen.undescribed() == ["greylist.delay"]


def test_reference_is_markdown_not_restructuredtext() -> None:
    text = docgen.configuration()
    assert "``" not in text
    # an indented line outside a fenced block is a Markdown code block
    assert not [line for line in text.splitlines() if line.startswith("    ")]


def test_readable_types() -> None:
    from smtpguard.checks.dnsbl import parse_signed_int, parse_site, sites_of
    from smtpguard.checks.greylist import GreylistConfig

    assert docgen.describe_parser(sites_of(parse_site)) == "list of DNSBL sites (`domain[=filter][*weight]`)"
    assert docgen.describe_parser(parse_signed_int) == "integer (may be negative)"
    mask = {f.name: f for f in dataclasses.fields(GreylistConfig)}["ipv4_mask"].metadata["parse"]
    assert docgen.describe_parser(mask) == "prefix length 1-32"
    assert docgen.describe_parser(lambda v: v) is None


def test_defaults_are_valid_toml() -> None:
    import tomllib

    for line in docgen.configuration().splitlines():
        if line.startswith("| `") and not line.startswith("| key"):
            default = line.split(" | ")[2].strip("`")
            tomllib.loads(f"x = {default}")
