"""The aiosmtpd adapter: the only module that touches aiosmtpd's internals.

aiosmtpd's :class:`~aiosmtpd.smtp.SMTP` protocol gives us the asyncio
plumbing (``connection_made``/``connection_lost``/``eof_received``, the idle
timer, and later STARTTLS and PROXY handling).  Its command loop does not
fit a front end (no hook before the banner, whole-message buffering, 354 sent
before any hook, exception text sent to the client), so
:class:`GuardProtocol` replaces ``_handle_client`` with a loop that reads
command lines and hands them to :class:`~smtpguard.conversation.Conversation`,
and implements the conversation's :class:`~smtpguard.conversation.ClientIO`.

``SMTP.__init__`` is not called: it introspects the class on every
connection (about 0.1 ms); :meth:`GuardProtocol.__init__` sets just the
attributes the inherited plumbing reads.

:class:`Server` owns the listening sockets, the set of live sessions and the
graceful shutdown (stop accepting, let transactions finish within a bound,
421 to whoever is left, never half-acknowledge a message).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any

from aiosmtpd.smtp import SMTP

from . import logs
from .config import Config
from .conversation import Conversation, Hangup
from .metrics import METRICS, reject_reason
from .pipeline import Pipeline
from .session import Session
from .verdict import REPLIES, Action, Reply

log = logging.getLogger("smtpguard")

_READ_LIMIT = 64 * 1024  # StreamReader buffer limit; a command line longer than this is refused


class GuardProtocol(SMTP):
    """One client connection."""

    def __init__(self, server: Server) -> None:  # noqa: D107 - see module docstring
        self.loop = asyncio.get_running_loop()
        asyncio.StreamReaderProtocol.__init__(
            self, asyncio.StreamReader(limit=_READ_LIMIT, loop=self.loop),
            client_connected_cb=self._cb_client_connected, loop=self.loop,
        )
        self.server = server
        cfg = server.cfg
        # Attributes aiosmtpd's inherited connection plumbing reads.
        self.event_handler = None
        self.hostname = cfg.server.hostname
        self.tls_context = None
        self.require_starttls = False
        self._timeout_duration = cfg.server.command_timeout
        self._timeout_handle: asyncio.TimerHandle | None = None
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport = None
        self.session = None
        self.envelope = None
        self.transport = None
        self._handler_coroutine = None
        self._proxy_timeout = None
        self._handle_hooks: dict[str, Any] = {}
        self.conversation: Conversation | None = None
        self._waiting = False  # blocked reading the next command

    # ------------------------------------------------------------ ClientIO

    def send(self, data: bytes) -> None:
        self._writer.write(data)

    async def read_chunk(self) -> bytes:
        self._reset_timeout(self.server.cfg.server.data_timeout)
        return await self._reader.read(_READ_LIMIT)

    def unread(self, data: bytes) -> None:
        """Put back bytes read past the end of DATA (pipelined commands)."""
        if data:
            self._reader._buffer[0:0] = data  # type: ignore[attr-defined]

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # ------------------------------------------------------------ the loop

    async def _handle_client(self) -> None:
        """Replaces aiosmtpd's loop: banner, then one command at a time."""
        assert self.transport is not None
        peer = self.transport.get_extra_info("peername")
        local = self.transport.get_extra_info("sockname")
        s = Session(peer[0], peer[1], local[0], local[1])
        log.info("CONNECT from %s to %s", s.peer, logs.endpoint(local[0], local[1]))
        counts: collections.Counter[str] = collections.Counter()
        conv = self.conversation = Conversation(self.server.cfg, s, self, self.server.pipeline)
        cancelled = False
        try:
            verdict = await self.server.pipeline.on_connect(s, len(self.server.sessions))
            if verdict.action is Action.DROP:
                await self._refuse(s, verdict.reply or REPLIES["not_accepted"])
                return
            self.send(f"220 {self.server.cfg.server.greeting}\r\n".encode())
            while self.transport is not None:
                await self._writer.drain()
                if self.server.closing and not s.in_transaction:
                    self.send(f"{REPLIES['shutdown']}\r\n".encode())
                    break
                self._waiting = True
                line = await self._read_command(conv)
                self._waiting = False
                if line is None:
                    log.info("lost connection after %s from %s", conv.last_command or "CONNECT", s.who)
                    break
                self._reset_timeout()
                try:
                    await conv.handle(line)
                finally:
                    counts[conv.last_command] += 1
        except Hangup:
            pass
        except asyncio.CancelledError:
            cancelled = True  # connection lost or timed out
            raise
        except ConnectionError:
            pass
        except Exception:
            log.exception("error: %s: internal error", s.who)
            self.send(f"{REPLIES['internal_error']}\r\n".encode())
        finally:
            if cancelled:
                conv.upstream.abort()
                self.close()
            else:
                await conv.close()
                await self._flush_and_close()
            log.info("DISCONNECT %s %s", s.peer, _command_counts(counts))

    async def _read_command(self, conv: Conversation) -> bytes | None:
        """One command line without its CRLF/LF; None at end of input."""
        while True:
            try:
                line = await self._reader.readuntil(b"\n")
            except asyncio.IncompleteReadError:
                return None
            except asyncio.LimitOverrunError as exc:
                await self._discard_long_line(exc.consumed)
                conv.reply(REPLIES["line_too_long"])
                await self._writer.drain()
                continue
            if len(line) > self.server.cfg.server.line_length_limit:
                conv.reply(REPLIES["line_too_long"])
                await self._writer.drain()
                continue
            return line[:-2] if line.endswith(b"\r\n") else line[:-1]

    async def _discard_long_line(self, consumed: int) -> None:
        await self._reader.readexactly(consumed)
        while True:
            try:
                await self._reader.readuntil(b"\n")
                return
            except asyncio.LimitOverrunError as exc:
                await self._reader.readexactly(exc.consumed)

    async def _refuse(self, s: Session, reply: Reply) -> None:
        METRICS.connections_rejected.labels(reason=reject_reason(reply)).inc()
        METRICS.rejects.labels(stage="CONNECT", code=str(reply.code)).inc()
        log.info("NOQUEUE: reject: CONNECT from %s: %s; proto=SMTP", s.who, reply)
        self.send(f"{reply}\r\n".encode())

    async def _flush_and_close(self) -> None:
        if self.transport is None:
            return
        try:
            async with asyncio.timeout(5):
                await self._writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        self.close()

    # ------------------------------------------------------------ plumbing

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.server.sessions.add(self)
        METRICS.connections.inc()
        METRICS.sessions_active.inc()

    def connection_lost(self, error: Exception | None) -> None:
        self.server.sessions.discard(self)
        METRICS.sessions_active.dec()
        super().connection_lost(error)
        self.server.session_ended()

    def eof_received(self) -> bool:
        """The client half-closed: let the loop answer what it already sent
        and end at its next read (aiosmtpd would cancel the loop instead)."""
        self._reader.feed_eof()
        return True

    def _timeout_cb(self) -> None:
        """Postfix's ``timeout after CMD``: 421, log, close."""
        conv = self.conversation
        if conv is not None:
            log.info("timeout after %s from %s", conv.last_command or "CONNECT", conv.session.who)
            if conv.in_data:
                conv.upstream.abort()  # never finish a half-received message
        if self.transport is not None:
            self.send(f"421 4.4.2 {self.hostname} Error: timeout exceeded\r\n".encode())
            self.transport.close()

    def shutdown_idle(self) -> None:
        """At shutdown: a session waiting for a command outside a
        transaction is told 421 and closed now; others finish first."""
        conv = self.conversation
        if conv is not None and self._waiting and not conv.session.in_transaction and self.transport is not None:
            self.send(f"{REPLIES['shutdown']}\r\n".encode())
            self.transport.close()

    def force_close(self) -> None:
        conv = self.conversation
        if conv is not None:
            conv.upstream.abort()
        if self.transport is not None:
            self.send(f"{REPLIES['shutdown']}\r\n".encode())
            self.transport.close()


def _command_counts(counts: collections.Counter[str]) -> str:
    """smtpd's ``ehlo=1 mail=1 rcpt=1 data=1 quit=1 commands=5`` summary."""
    words = [f"{k.lower()}={v}" for k, v in counts.items()]
    return " ".join([*words, f"commands={sum(counts.values())}"])


class Server:
    """The listening sockets and the live sessions."""

    def __init__(self, cfg: Config, pipeline: Pipeline) -> None:
        self.cfg = cfg
        self.pipeline = pipeline
        self.sessions: set[GuardProtocol] = set()
        self.closing = False
        self._servers: list[asyncio.base_events.Server] = []
        self._idle = asyncio.Event()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for hp in self.cfg.server.listen:
            srv = await loop.create_server(
                lambda: GuardProtocol(self), hp.host, hp.port, reuse_address=True, backlog=1024
            )
            self._servers.append(srv)
            log.info("listening on %s", hp)

    def session_ended(self) -> None:
        if not self.sessions:
            self._idle.set()

    async def shutdown(self) -> None:
        """Stop accepting; let transactions finish within shutdown_timeout."""
        self.closing = True
        for srv in self._servers:
            srv.close()
        for p in list(self.sessions):
            p.shutdown_idle()
        deadline = time.monotonic() + self.cfg.server.shutdown_timeout
        while self.sessions and time.monotonic() < deadline:
            self._idle.clear()
            try:
                async with asyncio.timeout(deadline - time.monotonic()):
                    await self._idle.wait()
            except TimeoutError:
                break
        for p in list(self.sessions):
            log.info("shutdown: closing session from %s", p.conversation.session.who if p.conversation else "?")
            p.force_close()
        for srv in self._servers:
            await srv.wait_closed()
