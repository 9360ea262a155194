"""ClientInput, the session's read-ahead buffer: no sockets, no sleeps."""

from __future__ import annotations

import asyncio

import pytest

from smtpguard.clientinput import TOO_LONG, ClientInput


class FakeTransport:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def pause_reading(self) -> None:
        self.calls.append("pause")

    def resume_reading(self) -> None:
        self.calls.append("resume")


async def test_readline_returns_lines_as_received() -> None:
    buf = ClientInput()
    buf.feed(b"EHLO a\r\nMAIL FROM:<x>\nRC")
    assert await buf.readline(100) == b"EHLO a\r\n"
    assert await buf.readline(100) == b"MAIL FROM:<x>\n"
    assert buf.peek(10) == b"RC"
    assert buf.pending() == 2


async def test_readline_waits_for_the_rest_of_a_line() -> None:
    buf = ClientInput()
    buf.feed(b"NO")
    task = asyncio.ensure_future(buf.readline(100))
    await asyncio.sleep(0)
    assert not task.done()
    buf.feed(b"OP\r")
    await asyncio.sleep(0)
    assert not task.done()
    buf.feed(b"\nQUIT\r\n")
    assert await task == b"NOOP\r\n"
    assert buf.peek(100) == b"QUIT\r\n"  # the pipelining test's evidence


async def test_line_at_the_limit_passes_one_over_is_too_long() -> None:
    buf = ClientInput()
    buf.feed(b"x" * 9 + b"\n" + b"y" * 10 + b"\nNOOP\n")
    assert await buf.readline(10) == b"x" * 9 + b"\n"
    assert await buf.readline(10) is TOO_LONG
    assert await buf.readline(10) == b"NOOP\n"  # the next line is intact


async def test_over_long_line_is_discarded_without_keeping_it() -> None:
    buf = ClientInput()
    task = asyncio.ensure_future(buf.readline(1000))
    for _ in range(100):
        buf.feed(b"z" * 500)
        await asyncio.sleep(0)
        assert buf.pending() <= 1000  # no more than the limit kept meanwhile
    assert not task.done()  # the reply waits for the end of the line
    buf.feed(b"zzz\r\nQUIT\r\n")
    assert await task is TOO_LONG
    assert await buf.readline(1000) == b"QUIT\r\n"


async def test_eof_ends_readline_and_drops_an_unterminated_line() -> None:
    buf = ClientInput()
    buf.feed(b"QUIT\r\nHALF")
    buf.feed_eof()
    assert buf.eof and not buf.at_eof()
    assert await buf.readline(100) == b"QUIT\r\n"
    assert await buf.readline(100) == b""
    assert buf.at_eof()


async def test_eof_wakes_a_waiting_reader() -> None:
    buf = ClientInput()
    line = asyncio.ensure_future(buf.readline(100))
    await asyncio.sleep(0)
    buf.feed_eof()
    assert await line == b""
    assert await buf.read(10) == b""


async def test_read_unread_discard() -> None:
    buf = ClientInput()
    buf.feed(b"abcdef")
    assert await buf.read(4) == b"abcd"
    buf.unread(b"XY")
    assert await buf.read(100) == b"XYef"
    buf.feed(b"pipelined")
    buf.discard()
    assert buf.pending() == 0


async def test_wait_data() -> None:
    buf = ClientInput()
    waiting = asyncio.ensure_future(buf.wait_data())
    await asyncio.sleep(0)
    assert not waiting.done()
    buf.feed(b"x")
    await waiting
    assert buf.peek(512) == b"x"  # left for the command loop


async def test_readexactly_and_readuntil_for_the_proxy_header() -> None:
    buf = ClientInput()
    buf.feed(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\nEHLO")
    assert await buf.readexactly(5) == b"PROXY"
    assert await buf.readuntil() == b" TCP4 1.2.3.4 5.6.7.8 1 2\r\n"
    buf.feed_eof()
    with pytest.raises(asyncio.IncompleteReadError):
        await buf.readexactly(5)


async def test_readuntil_limit() -> None:
    buf = ClientInput(high=16, low=8)
    buf.feed(b"x" * 20)
    with pytest.raises(asyncio.LimitOverrunError):
        await buf.readuntil()
    buf2 = ClientInput()
    buf2.feed(b"abc")
    buf2.feed_eof()
    with pytest.raises(asyncio.IncompleteReadError):
        await buf2.readuntil()


async def test_pause_above_high_water_resume_at_low_water() -> None:
    transport = FakeTransport()
    buf = ClientInput(transport, high=100, low=40)
    buf.feed(b"x" * 100)
    assert transport.calls == []  # at the mark: still reading
    buf.feed(b"x")
    assert transport.calls == ["pause"]
    buf.feed(b"x" * 50)
    assert transport.calls == ["pause"]  # once
    await buf.read(100)  # 51 left
    assert transport.calls == ["pause"]
    await buf.read(11)  # 40 left
    assert transport.calls == ["pause", "resume"]
    await buf.read(40)
    assert transport.calls == ["pause", "resume"]


async def test_discard_resumes_and_attach_starts_unpaused() -> None:
    transport = FakeTransport()
    buf = ClientInput(transport, high=10, low=5)
    buf.feed(b"x" * 11)
    buf.discard()
    assert transport.calls == ["pause", "resume"]
    buf.feed(b"x" * 11)
    other = FakeTransport()
    buf.attach(other)  # the TLS transport after STARTTLS
    buf.discard()
    assert transport.calls == ["pause", "resume", "pause"] and other.calls == []
    buf.feed(b"y" * 11)
    assert other.calls == ["pause"]


async def test_a_line_longer_than_the_high_water_mark_resumes_reading() -> None:
    transport = FakeTransport()
    buf = ClientInput(transport, high=10, low=5)
    buf.feed(b"x" * 15)
    assert transport.calls == ["pause"]
    line = asyncio.ensure_future(buf.readline(100))
    await asyncio.sleep(0)
    assert transport.calls == ["pause", "resume"]  # else the LF could never come
    buf.feed(b"\n")
    assert await line == b"x" * 15 + b"\n"


async def test_eof_in_the_middle_of_an_over_long_line_is_end_of_input() -> None:
    buf = ClientInput()
    buf.feed(b"x" * 2000)
    buf.feed_eof()
    assert await buf.readline(1000) == b""  # not an exception (main logged "internal error")
