"""The listener's side of the machine's actions, on a fake transport: how
replies become writes."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from smtpguard.config import Config
from smtpguard.listener import GuardProtocol
from smtpguard.machine import Arm, Close, Send


class Transport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)


def protocol() -> tuple[GuardProtocol, Transport]:
    server: Any = SimpleNamespace(cfg=Config(), pipeline=None, tls_context=None)
    p = GuardProtocol(server)
    transport = Transport()
    p.transport = transport  # type: ignore[assignment]
    return p, transport


def test_replies_that_follow_each_other_go_out_in_one_write() -> None:
    """The replies to a pipelined group of recipients: one write, not one each."""
    async def main() -> None:
        p, transport = protocol()
        p._effects([Send(b"250 2.1.5 Ok\r\n"), Send(b"550 5.1.1 no\r\n"), Send(b"250 2.1.5 Ok\r\n"), Close()])
        assert transport.writes == [b"250 2.1.5 Ok\r\n550 5.1.1 no\r\n250 2.1.5 Ok\r\n"]
    asyncio.run(main())


def test_replies_after_an_error_sleep_is_armed_are_held_for_it() -> None:
    async def main() -> None:
        p, transport = protocol()
        p._effects([Send(b"250 2.1.5 Ok\r\n"), Arm(1.5), Send(b"550 5.1.1 no\r\n"), Send(b"550 5.1.1 no\r\n")])
        assert transport.writes == [b"250 2.1.5 Ok\r\n"]
        assert p._held == [b"550 5.1.1 no\r\n", b"550 5.1.1 no\r\n"] and p._hold == 1.5
    asyncio.run(main())


def test_the_sleeps_of_several_error_replies_add_up() -> None:
    """Each error reply waits its own error sleep, as in smtpd: a pipelined
    group with two refusals past the soft limit waits for both."""
    async def main() -> None:
        p, transport = protocol()
        p._effects([Arm(1.5), Send(b"550 5.1.1 no\r\n"), Arm(1.5), Send(b"550 5.1.1 no\r\n")])
        assert transport.writes == [] and p._hold == 3.0
    asyncio.run(main())


def test_after_the_error_sleep_the_held_replies_go_out_in_one_write(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:  # a fake clock: no real waiting in tests
        slept.append(seconds)

    monkeypatch.setattr(asyncio, "sleep", sleep)

    async def main() -> None:
        p, transport = protocol()
        p._effects([Arm(1.5), Send(b"550 5.1.1 a\r\n"), Arm(1.5), Send(b"550 5.1.1 b\r\n")])
        await p._release()
        assert slept == [3.0] and transport.writes == [b"550 5.1.1 a\r\n550 5.1.1 b\r\n"]
        assert p._hold == 0.0 and p._held == []
    asyncio.run(main())
