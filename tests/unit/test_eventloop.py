"""[server] event_loop: which loop runs the daemon (smtpguard.eventloop)."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from smtpguard import eventloop
from smtpguard.config import ConfigError, ServerConfig, load_section


async def _running() -> str:
    return eventloop.describe(asyncio.get_running_loop())


def test_auto_is_uvloop_when_installed() -> None:
    assert ServerConfig().event_loop == "auto"
    assert eventloop.loop_factory("auto") is uvloop.new_event_loop
    assert eventloop.run(_running, "auto") == f"uvloop {uvloop.__version__}"


def test_asyncio_is_the_standard_loop() -> None:
    assert eventloop.loop_factory("asyncio") is None
    assert eventloop.run(_running, "asyncio") == "asyncio"


def test_without_uvloop_auto_falls_back_and_uvloop_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(eventloop, "_uvloop", lambda: None)
    assert eventloop.loop_factory("auto") is None
    assert eventloop.run(_running, "auto") == "asyncio"
    with pytest.raises(ConfigError, match=r"server\.event_loop: .*uvloop is not installed"):
        eventloop.run(_running, "uvloop")


def test_config_names_the_key() -> None:
    assert load_section(ServerConfig, {"event_loop": "asyncio"}, "server").event_loop == "asyncio"
    with pytest.raises(ConfigError, match=r"server\.event_loop: expected one of auto, asyncio, uvloop"):
        load_section(ServerConfig, {"event_loop": "trio"}, "server")
