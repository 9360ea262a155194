"""The client connection's read-ahead: our own buffer, fed by the protocol.

:class:`ClientInput` replaces :class:`asyncio.StreamReader` for the client
side of a session.  The listener's protocol feeds it from
``data_received``/``eof_received`` (:meth:`feed`, :meth:`feed_eof`); the
session's one task reads from it (:meth:`readline`, :meth:`read`, and
:meth:`readexactly`/:meth:`readuntil` for aiosmtpd's PROXY header parser).
Unlike a StreamReader, what has been received but not read yet is part of
its public surface (:meth:`pending`, :meth:`peek`, :meth:`discard`,
:meth:`unread`): the pregreet test ("the client talked before the
greeting"), the pipelining test ("the client sent more before our reply"),
STARTTLS (discard what was pipelined behind it) and DATA (put back what
came after the end of the message) all need it.

Flow control: above ``high`` bytes buffered the transport is asked to
:meth:`~asyncio.ReadTransport.pause_reading`; once reads bring the buffer
down to ``low`` it is resumed.  :meth:`attach` switches to a new transport
(after STARTTLS).

One reader at a time (the session's task); no I/O of its own, so the unit
tests drive it with a fake transport and no sockets.
"""

from __future__ import annotations

import asyncio
import enum
from typing import Final, Literal, Protocol


class _Marker(enum.Enum):
    TOO_LONG = "TOO_LONG"


#: What :meth:`ClientInput.readline` returns for a line longer than its limit.
TOO_LONG: Final = _Marker.TOO_LONG

HIGH_WATER: Final = 64 * 1024  # pause reading above this many bytes buffered
LOW_WATER: Final = HIGH_WATER // 2  # resume at or below this


class Readable(Protocol):
    """The part of a transport flow control needs (:class:`asyncio.ReadTransport`)."""

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class ClientInput:
    """Bytes received from the client and not yet read by the session."""

    __slots__ = ("_data", "_eof", "_waiter", "_reader", "_paused", "_high", "_low", "_scanned", "_skipping")

    def __init__(self, transport: Readable | None = None, high: int = HIGH_WATER, low: int = LOW_WATER) -> None:
        self._data = bytearray()
        self._eof = False
        self._waiter: asyncio.Future[None] | None = None
        self._reader = transport
        self._paused = False
        self._high = high
        self._low = low
        self._scanned = 0  # readline: bytes already searched for LF
        self._skipping = False  # readline: discarding the rest of an over-long line

    # ------------------------------------------------------------ producer side

    def attach(self, transport: Readable | None) -> None:
        """Use *transport* for flow control from now on (a new TLS transport
        starts reading, so it is not paused)."""
        self._reader = transport
        self._paused = False

    def feed(self, data: bytes) -> None:
        self._data += data
        self._wake()
        if not self._paused and len(self._data) > self._high and self._reader is not None:
            self._paused = True
            self._reader.pause_reading()

    def feed_eof(self) -> None:
        self._eof = True
        self._wake()

    def at_eof(self) -> bool:
        """End of input seen and everything read."""
        return self._eof and not self._data

    @property
    def eof(self) -> bool:
        """End of input seen (data may still be buffered)."""
        return self._eof

    # ------------------------------------------------------------ read-ahead

    def pending(self) -> int:
        """Bytes received and not read yet."""
        return len(self._data)

    def peek(self, n: int) -> bytes:
        """Up to *n* of the bytes received and not read yet, left in place."""
        return bytes(self._data[:n])

    def discard(self) -> None:
        """Forget everything received and not read yet."""
        self._data.clear()
        self._scanned = 0
        self._skipping = False
        self._consumed()

    def unread(self, data: bytes) -> None:
        """Put *data* back in front of what is buffered."""
        if data:
            self._data[0:0] = data
            self._scanned = 0

    # ------------------------------------------------------------ reading

    async def wait_data(self) -> None:
        """Until something is buffered or the input ended."""
        while not self._data and not self._eof:
            await self._wait()

    async def readline(self, limit: int) -> bytes | Literal[_Marker.TOO_LONG]:
        """The next line with its LF; b"" at end of input (an unterminated
        last line is dropped).  A line longer than *limit* bytes (its LF
        included) is discarded up to and including its LF, without keeping
        more than *limit* bytes of it, and :data:`TOO_LONG` returned once
        its LF has arrived."""
        while True:
            data = self._data
            end = data.find(b"\n", self._scanned)
            if end >= 0:
                self._scanned = 0
                if self._skipping or end + 1 > limit:
                    self._skipping = False
                    del data[:end + 1]
                    self._consumed()
                    return TOO_LONG
                line = bytes(data[:end + 1])
                del data[:end + 1]
                self._consumed()
                return line
            if len(data) > limit or (self._skipping and data):  # no LF within the limit: skip to the LF
                self._skipping = True
                data.clear()
                self._consumed()
            self._scanned = len(data)
            if self._eof:
                data.clear()
                self._scanned = 0
                self._skipping = False
                return b""
            await self._wait()

    async def read(self, n: int = -1) -> bytes:
        """Up to *n* bytes (at least one; all that is buffered when *n* < 0);
        b"" at end of input."""
        while not self._data:
            if self._eof:
                return b""
            await self._wait()
        data = self._data
        if n < 0 or n >= len(data):
            chunk = bytes(data)
            data.clear()
        else:
            chunk = bytes(data[:n])
            del data[:n]
        self._scanned = 0
        self._consumed()
        return chunk

    async def readexactly(self, n: int) -> bytes:
        """Exactly *n* bytes; :class:`asyncio.IncompleteReadError` when the
        input ends first (what was there is consumed, as StreamReader does)."""
        while len(self._data) < n:
            if self._eof:
                partial = bytes(self._data)
                self.discard()
                raise asyncio.IncompleteReadError(partial, n)
            await self._wait()
        chunk = bytes(self._data[:n])
        del self._data[:n]
        self._scanned = 0
        self._consumed()
        return chunk

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        """Up to and including *separator*, as :meth:`asyncio.StreamReader.readuntil`:
        :class:`asyncio.IncompleteReadError` at end of input,
        :class:`asyncio.LimitOverrunError` when more than ``high`` bytes
        come without it (nothing consumed then)."""
        offset = 0
        while True:
            end = self._data.find(separator, offset)
            if end >= 0:
                break
            offset = max(0, len(self._data) + 1 - len(separator))
            if offset > self._high:
                raise asyncio.LimitOverrunError("separator not found within the limit", offset)
            if self._eof:
                partial = bytes(self._data)
                self.discard()
                raise asyncio.IncompleteReadError(partial, None)
            await self._wait()
        if end > self._high:
            raise asyncio.LimitOverrunError("separator found beyond the limit", end)
        end += len(separator)
        chunk = bytes(self._data[:end])
        del self._data[:end]
        self._scanned = 0
        self._consumed()
        return chunk

    # ------------------------------------------------------------ internals

    async def _wait(self) -> None:
        if self._paused:  # nothing more can come: should not happen with a sane limit
            self._paused = False
            if self._reader is not None:
                self._reader.resume_reading()
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _consumed(self) -> None:
        if self._paused and len(self._data) <= self._low:
            self._paused = False
            if self._reader is not None:
                self._reader.resume_reading()
