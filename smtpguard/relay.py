"""The upstream client: one connection to Postfix per client session.

Modelled on Postfix's own ``smtpd_proxy_filter`` client: the connection is
opened lazily (the session calls :meth:`Upstream.open` at the first RCPT that
passed screening), announces the real client with ``XCLIENT`` (values in
xtext, ``[UNAVAILABLE]`` where unknown), waits for the new ``220``, sends
``EHLO`` and then each command as the client sent it.  Replies are returned
as :class:`UpstreamReply` holding the raw reply lines, so the session relays
Postfix's code, enhanced status code and text verbatim.

Every failure (refused, timed out, closed, garbage) raises
:class:`UpstreamError` with a reason for the log; the session turns it into a
4xx for the client, never a 2xx or 5xx.

Timeouts: each reply and each drain of the message body waits
``upstream.timeout``, except the reply to the final dot, which waits
``upstream.data_done_timeout`` (600 s, Postfix's ``smtp_data_done_timeout``;
RFC 1047): Postfix may take long to queue a message (a slow disk, a
milter), and a 4xx given to the client while Postfix then queues it anyway
would have the client send it again -- a duplicate.  The connection knows
that reply as the first one read after Postfix's ``354`` (the body is only
written, and drained, in between).
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections import deque
from dataclasses import dataclass
from typing import cast

from .config import UpstreamConfig
from .envelope import xtext


class UpstreamError(Exception):
    """The upstream connection failed; ``str()`` says why (for the log)."""


@dataclass(frozen=True)
class UpstreamReply:
    code: int
    raw: bytes  # all reply lines, CRLF-terminated, as Postfix sent them

    @property
    def text(self) -> str:
        """The reply as one line for the log (continuation lines joined)."""
        lines = self.raw.decode("utf-8", "replace").split("\r\n")
        return " ".join(line[4:] if i else line for i, line in enumerate(lines) if line)

    @property
    def queue_id(self) -> str | None:
        m = _QUEUED.search(self.raw)
        return m.group(1).decode() if m else None


_QUEUED = re.compile(rb"queued as ([0-9A-Za-z]+)")
_LINE_END = re.compile(rb"\r?\n")
#: one whole reply whose every line is well-formed (what _reply_end accepts)
_REPLY = re.compile(rb"(?:[0-9]{3}-[^\n]*\n)*[0-9]{3}(?:[ \r][^\n]*)?\n")
_READ_SIZE = 64 * 1024  # also the longest reply line accepted


@dataclass(frozen=True)
class ClientIdentity:
    """What XCLIENT tells Postfix about the real client."""

    addr: str
    port: int | None
    name: str | None  # verified reverse name; None -> [UNAVAILABLE]
    helo: str | None
    proto: str  # SMTP or ESMTP

    def xclient(self) -> bytes:
        addr = f"IPV6:{self.addr}" if ":" in self.addr else self.addr
        fields = [
            ("ADDR", addr),
            ("PORT", str(self.port) if self.port is not None else None),
            ("NAME", self.name),
            ("HELO", self.helo),
            ("PROTO", self.proto),
        ]
        words = [f"{k}={xtext(v) if v else '[UNAVAILABLE]'}" for k, v in fields]
        return ("XCLIENT " + " ".join(words) + "\r\n").encode("ascii")


def _why(exc: Exception) -> str:
    """``Connection refused`` rather than asyncio's ``Connect call failed (...)``."""
    errno = getattr(exc, "errno", None)
    return os.strerror(errno) if errno else str(exc) or type(exc).__name__


class Upstream(asyncio.Protocol):
    """One connection to the backend Postfix, as a plain :class:`asyncio.Protocol`.

    No StreamReader: :meth:`data_received` splits what Postfix sent into
    whole replies as it arrives (:meth:`_reply_end`), and a caller waiting
    for *n* replies (:meth:`replies`) waits on one future, woken once the
    *n*-th is complete -- the MAIL and RCPT replies of a pipelined group
    cost one wake-up, not one per read.  One deadline timer per connection
    (:meth:`_arm`), pushed forward by a plain assignment, bounds every wait;
    no ``wait_for``, no task.
    """

    def __init__(self, cfg: UpstreamConfig) -> None:
        self.cfg = cfg
        self._loop: asyncio.AbstractEventLoop | None = None
        self.conn: asyncio.Transport | None = None  # our side of the connection to Postfix; None once closed
        self._timer: asyncio.TimerHandle | None = None
        self._deadline: float | None = None
        self._timed_out = False
        self._buf = bytearray()  # received, not yet a whole reply
        self._ready: deque[UpstreamReply] = deque()  # whole replies not yet taken
        self._want = 0  # replies the waiter needs
        self._waiter: asyncio.Future[None] | None = None  # replies() or drain()
        self._error: UpstreamError | None = None  # the connection failed: every later wait raises it
        self._paused = False  # the transport's write buffer is full (pause_writing)
        self._in_data = False  # Postfix said 354: the next reply is the end-of-data one

    @property
    def connected(self) -> bool:
        return self.conn is not None

    # ------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.conn = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        ready, start = self._ready, 0
        while True:
            # The common case in one C call: whole well-formed replies.
            m = _REPLY.match(buf, start)
            if m is None:
                try:  # incomplete, or malformed: the line-by-line check says which
                    end = self._reply_end(buf, start)
                except UpstreamError as exc:
                    self._fail(exc)
                    return
                if end < 0:
                    break
            else:
                end = m.end()
            raw = bytes(buf[start:end])
            if raw.count(b"\n") != raw.count(b"\r\n"):  # bare LF line ends: relayed as CRLF
                raw = _LINE_END.sub(b"\r\n", raw)
            ready.append(UpstreamReply(int(raw[:3]), raw))
            start = end
        if start:
            del buf[:start]
        if self._waiter is not None and len(ready) >= self._want:
            self._wake()

    def eof_received(self) -> bool:
        return False  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn = None
        self._disarm()
        if self._error is None:
            self._error = self._failure("read from", exc)
        self._wake()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._want == 0:
            self._wake()

    # ------------------------------------------------------------ the session's side

    async def connect(self) -> None:
        """The TCP connection alone (within ``connect_timeout``).  Once per
        object: a new connection is a new Upstream (a closed transport's late
        ``connection_lost`` must not reach the next one)."""
        if self._loop is not None:
            raise RuntimeError("an Upstream connects once")
        self._loop = loop = asyncio.get_running_loop()
        host, port = self.cfg.address.host, self.cfg.address.port
        try:
            async with asyncio.timeout(self.cfg.connect_timeout):
                await loop.create_connection(lambda: self, host, port)
        except TimeoutError:
            raise UpstreamError(f"connect to {self.cfg.address}: timed out") from None
        except OSError as exc:
            raise UpstreamError(f"connect to {self.cfg.address}: {_why(exc)}") from None

    async def open(self, ident: ClientIdentity) -> float:
        """Connect, XCLIENT, then the client's own ``EHLO`` (the session
        only keeps a HELO name that can be forwarded: one token of printable
        ASCII, at most 255 octets).  A client that sent no HELO gets none
        from us either: Postfix sees the session as the client had it.
        Returns the seconds it took."""
        start = time.monotonic()
        await self.connect()
        try:
            self._expect(await self.read_reply(), 220, "greeting")
            self.write(ident.xclient())
            self._expect(await self.read_reply(), 220, "XCLIENT")
            if ident.helo is not None:
                self._expect(await self.command(f"EHLO {ident.helo}\r\n".encode("ascii")), 250, "EHLO")
        except UpstreamError:
            self.abort()
            raise
        return time.monotonic() - start

    @staticmethod
    def _expect(reply: UpstreamReply, code: int, what: str) -> None:
        if reply.code != code:
            raise UpstreamError(f"{what} rejected: {reply.text}")

    async def command(self, line: bytes) -> UpstreamReply:
        """Send one command line (CRLF included) and read its reply."""
        self.write(line)
        return await self.read_reply()

    def write(self, data: bytes) -> None:
        if self.conn is None:
            raise self._error or UpstreamError("not connected")
        self.conn.write(data)

    async def drain(self) -> None:
        """Wait until the upstream socket buffer has room (bounded memory)."""
        if self.conn is None:
            raise self._error or UpstreamError("not connected")
        if self._paused:
            self._want = 0
            await self._wait()

    async def read_reply(self) -> UpstreamReply:
        """Read one (possibly multi-line) reply."""
        [reply] = await self.replies(1)
        return reply

    async def replies(self, n: int) -> list[UpstreamReply]:
        """The next *n* replies (what Postfix sent at once -- the MAIL and
        RCPT replies together -- is split here; more wait for the next call)."""
        ready = self._ready
        if len(ready) < n:
            await self._wait_replies(n)
        replies = [ready.popleft() for _ in range(n)]
        self._in_data = replies[-1].code == 354
        return replies

    async def _wait_replies(self, n: int) -> None:
        if self.conn is None:
            raise self._error or UpstreamError("not connected")
        self._want = n
        await self._wait()

    async def _wait(self) -> None:
        """Until :meth:`_wake` (enough replies, room to write, or the end),
        within the deadline; raises the connection's failure."""
        assert self._loop is not None
        want = self._want
        # The reply to the final dot may take smtp_data_done_timeout (RFC 1047).
        self._arm(self.cfg.data_done_timeout if self._in_data and want else None)
        waiter = self._waiter = self._loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None
            self._deadline = None
            self._want = 0
        if self._error is not None and (want == 0 or want > len(self._ready)):
            self.abort()
            raise self._error

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, exc: UpstreamError) -> None:
        self._error = exc
        self.abort()
        self._wake()

    def _reply_end(self, buf: bytearray, start: int = 0) -> int:
        """Where the first complete reply in *buf* (from *start*) ends, or -1;
        every line must look like ``NNN-text`` / ``NNN text``."""
        while (nl := buf.find(b"\n", start)) >= 0:
            line = bytes(buf[start:min(start + 4, nl + 1)])
            if len(line) < 4 or not line[:3].isdigit() or line[3:4] not in (b" ", b"-", b"\r", b"\n"):
                raise UpstreamError(f"{self.cfg.address} sent a malformed reply: {bytes(buf[start:nl + 1])[:80]!r}")
            start = nl + 1
            if line[3:4] != b"-":
                return start
        if len(buf) - start > _READ_SIZE:
            raise UpstreamError(f"{self.cfg.address} sent a reply line longer than {_READ_SIZE} bytes")
        return -1

    # One timer per connection, re-armed lazily: per-command deadlines cost
    # two attribute writes instead of a timer cancel and re-create.

    def _arm(self, timeout: float | None = None) -> None:
        loop = self._loop
        assert loop is not None
        self._deadline = deadline = loop.time() + (self.cfg.timeout if timeout is None else timeout)
        timer = self._timer
        if timer is None or deadline < timer.when():  # earlier (a data_done_timeout below timeout): re-arm
            if timer is not None:
                timer.cancel()
            self._timer = loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._deadline is None or self.conn is None or self._loop is None:
            return
        if self._loop.time() < self._deadline:
            self._timer = self._loop.call_at(self._deadline, self._on_timer)
            return
        self._timed_out = True
        self._fail(self._failure("read from", None))

    def _disarm(self) -> None:
        self._deadline = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _failure(self, what: str, exc: Exception | None) -> UpstreamError:
        if self._timed_out:
            return UpstreamError(f"{self.cfg.address}: timeout waiting for a reply")
        if exc is None:
            return UpstreamError(f"{self.cfg.address} closed the connection")
        return UpstreamError(f"{what} {self.cfg.address}: {_why(exc)}")

    def quit(self) -> None:
        """Say QUIT without waiting for the answer; the transport closes
        once it is written."""
        transport, self.conn = self.conn, None
        self._disarm()
        if transport is not None:
            transport.write(b"QUIT\r\n")
            transport.close()

    def abort(self) -> None:
        """Close at once; a message in progress is discarded by Postfix."""
        transport, self.conn = self.conn, None
        self._disarm()
        if transport is not None:
            transport.abort()
