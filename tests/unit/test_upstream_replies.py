"""relay.Upstream's reply reading: whole replies, verbatim with CRLF,
however the bytes arrive (the split is decided on buffers here, the reading
over a loopback socket); garbage and a closed connection are UpstreamErrors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from smtpguard.config import HostPort, UpstreamConfig
from smtpguard.relay import Upstream, UpstreamError

EHLO = b"250-backend.test\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250 SMTPUTF8\r\n"


def upstream(port: int = 10025) -> Upstream:
    return Upstream(UpstreamConfig(address=HostPort("127.0.0.1", port), timeout=5))


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
async def peer(data: bytes) -> AsyncIterator[Upstream]:
    """An Upstream connected to a loopback peer that sends *data* and closes."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(data)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    up = upstream(server.sockets[0].getsockname()[1])
    up._reader, up._writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
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
