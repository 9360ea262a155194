"""relay.Upstream's reply reading: whole replies, verbatim with CRLF,
however the bytes arrive (the split is decided on buffers here, the reading
over a loopback socket); garbage, a closed connection and a silent Postfix
(the one deadline timer) are UpstreamErrors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from smtpguard.config import HostPort, UpstreamConfig
from smtpguard.relay import Upstream, UpstreamError

EHLO = b"250-backend.test\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250 SMTPUTF8\r\n"


def upstream(port: int = 10025, timeout: float = 5) -> Upstream:
    return Upstream(UpstreamConfig(address=HostPort("127.0.0.1", port), timeout=timeout))


def test_a_reply_ends_at_its_last_line_wherever_the_bytes_stop() -> None:
    up = upstream()
    for cut in range(len(EHLO)):
        assert up._reply_end(bytearray(EHLO[:cut])) == -1  # incomplete: read more
    assert up._reply_end(bytearray(EHLO)) == len(EHLO)
    assert up._reply_end(bytearray(EHLO + b"250 2.1.0 Ok\r\n")) == len(EHLO)


@pytest.mark.parametrize("garbage", [b"hello\r\n", b"25\r\n250 ok\r\n", b"250+x\r\n"])
def test_a_malformed_line_is_an_upstream_error(garbage: bytes) -> None:
    with pytest.raises(UpstreamError, match="sent a malformed reply"):
        upstream()._reply_end(bytearray(garbage))


def test_an_endless_line_is_an_upstream_error() -> None:
    with pytest.raises(UpstreamError, match="longer than 65536 bytes"):
        upstream()._reply_end(bytearray(b"250 " + b"x" * 70_000))


@asynccontextmanager
async def peer(data: bytes, close: bool = True, timeout: float = 5) -> AsyncIterator[Upstream]:
    """An Upstream connected to a loopback peer that sends *data* and
    closes (or, with *close* false, then says nothing)."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(data)
        await writer.drain()
        if close:
            writer.close()
        else:
            await reader.read()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    up = upstream(server.sockets[0].getsockname()[1], timeout)
    await up.connect()
    try:
        yield up
    finally:
        up.abort()
        server.close()


async def test_replies_sent_together_come_back_one_by_one() -> None:
    rejected = b"550 5.1.1 <x@example.test>: Recipient address rejected\r\n"
    async with peer(EHLO + b"250 2.1.0 Ok\r\n" + rejected) as up:
        assert [(await up.read_reply()).raw for _ in range(3)] == [EHLO, b"250 2.1.0 Ok\r\n", rejected]


async def test_bare_lf_line_ends_are_relayed_as_crlf() -> None:
    async with peer(b"250-first\n250 last\n") as up:
        reply = await up.read_reply()
    assert (reply.code, reply.raw) == (250, b"250-first\r\n250 last\r\n")


async def test_closed_mid_reply() -> None:
    async with peer(b"250-partial\r\n250 no end") as up:
        with pytest.raises(UpstreamError, match="closed the connection"):
            await up.read_reply()
        assert not up.connected


async def test_several_replies_wanted_at_once() -> None:
    async with peer(b"250 2.1.0 Ok\r\n" + b"250 2.1.5 Ok\r\n" + b"354 go\r\n") as up:
        assert [r.code for r in await up.replies(2)] == [250, 250]
        assert [r.code for r in await up.replies(1)] == [354]


async def test_replies_before_the_close_are_still_read() -> None:
    async with peer(b"250 2.0.0 Ok: queued as 4XyZ\r\n221 2.0.0 Bye\r\n") as up:
        await asyncio.sleep(0.05)  # the close has arrived too
        assert [r.queue_id for r in await up.replies(2)] == ["4XyZ", None]
        with pytest.raises(UpstreamError, match="closed the connection"):
            await up.read_reply()


async def test_a_silent_postfix_times_out() -> None:
    async with peer(b"", close=False, timeout=0.2) as up:
        up.write(b"DATA\r\n")
        with pytest.raises(UpstreamError, match="timeout waiting for a reply"):
            await up.read_reply()
        assert not up.connected


async def test_an_upstream_connects_once() -> None:
    async with peer(b"220 hi\r\n") as up:
        with pytest.raises(RuntimeError, match="connects once"):
            await up.connect()


async def test_refused() -> None:
    with pytest.raises(UpstreamError, match="Connection refused"):
        await upstream(1).connect()
