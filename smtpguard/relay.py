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
from dataclasses import dataclass

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


class Upstream:
    """One connection to the backend Postfix."""

    def __init__(self, cfg: UpstreamConfig) -> None:
        self.cfg = cfg
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._deadline: float | None = None
        self._timed_out = False
        self._buf = bytearray()  # received, not yet returned by read_reply
        self._in_data = False  # Postfix said 354: the next reply is the end-of-data one

    @property
    def connected(self) -> bool:
        return self._writer is not None

    async def open(self, ident: ClientIdentity) -> float:
        """Connect, XCLIENT, then the client's own ``EHLO`` (the session
        only keeps a HELO name that can be forwarded: one token of printable
        ASCII, at most 255 octets).  A client that sent no HELO gets none
        from us either: Postfix sees the session as the client had it.
        Returns the seconds it took."""
        start = time.monotonic()
        self._timed_out = False
        self._in_data = False
        self._buf.clear()
        host, port = self.cfg.address.host, self.cfg.address.port
        try:
            async with asyncio.timeout(self.cfg.connect_timeout):
                self._reader, self._writer = await asyncio.open_connection(host, port)
        except TimeoutError:
            raise UpstreamError(f"connect to {self.cfg.address}: timed out") from None
        except OSError as exc:
            raise UpstreamError(f"connect to {self.cfg.address}: {_why(exc)}") from None
        try:
            self._expect(await self.read_reply(), 220, "greeting")
            self._writer.write(ident.xclient())
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
        if self._writer is None:
            raise UpstreamError("not connected")
        self._writer.write(data)

    async def drain(self) -> None:
        """Wait until the upstream socket buffer has room (bounded memory)."""
        if self._writer is None:
            raise UpstreamError("not connected")
        self._arm()
        try:
            await self._writer.drain()
        except OSError as exc:
            self.abort()
            raise self._failure("write to", exc) from None
        finally:
            self._deadline = None

    async def read_reply(self) -> UpstreamReply:
        """Read one (possibly multi-line) reply.  What Postfix sent at once
        (the 12-line EHLO reply, the MAIL and RCPT replies together) is read
        in one call and split here; bytes past the reply wait in the buffer
        for the next call."""
        if self._reader is None:
            raise UpstreamError("not connected")
        buf = self._buf
        self._arm(self.cfg.data_done_timeout if self._in_data else self.cfg.timeout)
        try:
            while (end := self._reply_end(buf)) < 0:
                chunk = await self._reader.read(_READ_SIZE)
                if not chunk:
                    raise self._failure("read from", None)
                buf += chunk
        except OSError as exc:
            self.abort()
            raise self._failure("read from", exc) from None
        except UpstreamError:
            self.abort()
            raise
        finally:
            self._deadline = None
        raw = bytes(buf[:end])
        del buf[:end]
        if raw.count(b"\n") != raw.count(b"\r\n"):  # bare LF line ends: relayed as CRLF
            raw = _LINE_END.sub(b"\r\n", raw)
        code = int(raw[:3])
        self._in_data = code == 354
        return UpstreamReply(code, raw)

    def _reply_end(self, buf: bytearray) -> int:
        """Where the first complete reply in *buf* ends, or -1; every line
        must look like ``NNN-text`` / ``NNN text``."""
        start = 0
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
        loop = asyncio.get_running_loop()
        self._deadline = deadline = loop.time() + (self.cfg.timeout if timeout is None else timeout)
        timer = self._timer
        if timer is None or deadline < timer.when():  # earlier (a data_done_timeout below timeout): re-arm
            if timer is not None:
                timer.cancel()
            self._timer = loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._deadline is None or self._writer is None:
            return
        loop = asyncio.get_running_loop()
        if loop.time() < self._deadline:
            self._timer = loop.call_at(self._deadline, self._on_timer)
            return
        self._timed_out = True
        self._writer.transport.abort()  # wakes the pending read or drain

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
        if self._writer is None:
            return
        self._writer.write(b"QUIT\r\n")
        self._writer.close()
        self._reader = self._writer = None
        self._disarm()

    def abort(self) -> None:
        """Close at once; a message in progress is discarded by Postfix."""
        if self._writer is not None:
            self._writer.transport.abort()
        self._reader = self._writer = None
        self._disarm()
