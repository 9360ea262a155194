"""Reloader logic without sockets: the pipeline factory (which loads the
tables) failing refuses the configuration; success switches in one step."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from smtpguard.config import Config
from smtpguard.metrics import METRICS
from smtpguard.reload import Reloader


@dataclass
class FakeServer:
    cfg: Config = field(default_factory=Config)
    pipeline: Any = "old-pipeline"


class FakePipeline:
    def __init__(self, cfg: Config, previous: Any = None) -> None:
        self.cfg = cfg
        # long-lived state is handed over, as a real factory does with the store
        self.store = previous.store if isinstance(previous, FakePipeline) else object()


def failures() -> float:
    return METRICS.registry.get_sample_value("smtpguard_config_reloads_total", {"result": "failure"}) or 0.0


async def test_table_error_refuses_reload(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    conf = tmp_path / "g.toml"
    conf.write_text('[server]\nhostname = "new.example"\n')
    server = FakeServer()

    def make(cfg: Config, previous: Any) -> Any:
        raise ValueError("/etc/smtpguard/client_access.cidr, line 3: bad CIDR 10.0.0.0/33")

    before = failures()
    logger = logging.getLogger("smtpguard")
    saved = logger.propagate
    logger.propagate = True
    try:
        with caplog.at_level(logging.ERROR, logger="smtpguard"):
            assert await Reloader(conf, server, make).reload() is False
    finally:
        logger.propagate = saved
    assert server.cfg == Config() and server.pipeline == "old-pipeline"
    assert failures() == before + 1
    assert "bad CIDR 10.0.0.0/33" in caplog.text and "the running configuration stays" in caplog.text


async def test_success_switches_and_keeps_the_store(tmp_path: Path) -> None:
    conf = tmp_path / "g.toml"
    conf.write_text('[server]\nhostname = "new.example"\n')
    old = FakePipeline(Config())
    server = FakeServer(pipeline=old)

    async def make(cfg: Config, previous: Any) -> FakePipeline:  # an async factory works too
        return FakePipeline(cfg, previous)

    reloader = Reloader(conf, server, make)
    assert await reloader.reload() is True
    assert server.cfg.server.hostname == "new.example"
    assert isinstance(server.pipeline, FakePipeline) and server.pipeline.cfg is server.cfg
    assert server.pipeline is not old and server.pipeline.store is old.store
    assert reloader.generation == 2
    assert METRICS.registry.get_sample_value("smtpguard_config_last_reload_successful") == 1


async def test_listen_change_is_kept_until_restart(tmp_path: Path) -> None:
    conf = tmp_path / "g.toml"
    conf.write_text('[server]\nlisten = ["127.0.0.1:2600"]\n[metrics]\nlisten = ""\n')
    server = FakeServer()
    assert await Reloader(conf, server, FakePipeline).reload() is True
    assert server.cfg.server.listen == Config().server.listen
    assert server.cfg.metrics.listen == Config().metrics.listen


async def test_no_file_is_a_no_op() -> None:
    server = FakeServer()
    assert await Reloader(None, server, FakePipeline).reload() is True
    assert server.pipeline == "old-pipeline"
