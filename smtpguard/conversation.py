"""The asynchronous driver of one client's :class:`~smtpguard.machine.SessionMachine`.

The machine decides; :class:`Conversation` performs.  The listener gives it
one command line at a time (:meth:`Conversation.handle`); it feeds the line
to the machine and carries out what comes back, in order:

* effects: bytes for the client (held back while the error sleep is armed,
  until the listener calls :meth:`Conversation.release`), closing or
  aborting the connection to Postfix, input handed back to the reader,
  the end of the session (:class:`Hangup`);
* requests, whose result goes back to the machine: the pipeline's verdict
  at a stage, the upstream connection (:class:`~smtpguard.relay.Upstream`:
  XCLIENT, EHLO), commands forwarded to Postfix and their replies (an
  :class:`~smtpguard.relay.UpstreamError` when Postfix is unreachable),
  the STARTTLS handshake, the next chunk of a message body.

It talks to the client only through the small :class:`ClientIO` interface,
so it never touches aiosmtpd or asyncio's transports.
"""

from __future__ import annotations

from typing import Protocol

from .config import Config
from .machine import (
    AbortUpstream,
    Arm,
    Close,
    Effect,
    Event,
    OpenUpstream,
    QuitUpstream,
    ReadBody,
    Request,
    Screen,
    Send,
    SessionMachine,
    Stage,
    StartTls,
    Unread,
    Upstream,
)
from .pipeline import Pipeline
from .relay import Upstream as UpstreamConnection
from .relay import UpstreamError
from .session import Session


class ClientIO(Protocol):
    """What the conversation needs from the client connection."""

    def send(self, data: bytes) -> None: ...

    async def read_chunk(self) -> bytes: ...

    def unread(self, data: bytes) -> None: ...

    def close(self) -> None: ...

    @property
    def tls_available(self) -> bool:
        """STARTTLS can be offered now (a certificate, not yet encrypted)."""

    async def start_tls(self) -> str | None:
        """Discard pipelined input, do the handshake; the TLS description
        for the log, or None when the handshake failed."""


class Hangup(Exception):
    """End the session after the reply already sent."""


class Conversation:
    """Runs one session's machine against the pipeline, Postfix and the client."""

    def __init__(self, cfg: Config, session: Session, io: ClientIO, pipeline: Pipeline) -> None:
        self.session = session
        self.io = io
        self.pipeline = pipeline
        self.machine = SessionMachine(cfg, session, io.tls_available)
        self.upstream = UpstreamConnection(cfg.upstream)
        # smtpd_error_sleep_time: output held back while the error sleep is armed.
        self._hold = 0.0
        self._held: list[bytes] = []

    @property
    def hold(self) -> float:
        """Seconds the listener must wait before :meth:`release` (the error
        sleep of the command just handled); 0 when nothing is held."""
        return self._hold

    def release(self) -> None:
        """Send the output held back by the error sleep."""
        self._hold = 0.0
        held, self._held = self._held, []
        for data in held:
            self.io.send(data)

    async def handle(self, raw: bytes, pending: bytes = b"") -> None:
        """Answer one command line *raw* (with its line ending, as received);
        *pending* is the input already received after it.

        Raises :class:`Hangup` when the session must end.
        """
        actions = self.machine.command(raw, pending)
        while actions:
            *effects, last = actions
            for effect in effects:
                self._effect(effect)  # type: ignore[arg-type]  # only the last can be a request
            if not isinstance(last, (Screen, OpenUpstream, Upstream, StartTls, ReadBody)):
                self._effect(last)
                return
            actions = self.machine.answer(await self._request(last))

    def line_too_long(self) -> None:
        """The reader discarded an over-long command line."""
        for effect in self.machine.line_too_long():
            self._effect(effect)  # type: ignore[arg-type]  # no requests here

    def close(self) -> None:
        self.upstream.quit()

    def _effect(self, effect: Effect) -> None:
        match effect:
            case Send(data=data):
                if self._hold:
                    self._held.append(data)
                else:
                    self.io.send(data)
            case Arm(seconds=seconds):
                self._hold = max(self._hold, seconds)
            case AbortUpstream():
                self.upstream.abort()
            case QuitUpstream():
                self.upstream.quit()
            case Unread(data=data):
                self.io.unread(data)
            case Close():
                raise Hangup

    async def _request(self, request: Request) -> Event:
        s, pipeline = self.session, self.pipeline
        match request:
            case Screen(stage=Stage.COMMAND):
                return await pipeline.on_command(s, request.line, request.command, request.pending, request.previous)
            case Screen(stage=Stage.HELO):
                return await pipeline.on_helo(s)
            case Screen(stage=Stage.MAIL):
                return await pipeline.on_mail(s)
            case Screen(stage=Stage.RCPT):
                return await pipeline.on_rcpt(s, request.rcpt or "")
            case Screen(stage=Stage.GREYLIST):
                return await pipeline.on_greylist(s, request.rcpt or "")
            case Screen(stage=Stage.DATA):
                return await pipeline.on_data(s)
            case Screen(stage=Stage.RELAYED):
                await pipeline.on_relayed(s)
                return None
            case StartTls():
                return await self.io.start_tls()
            case ReadBody():
                return await self.io.read_chunk()
        try:
            match request:
                case OpenUpstream():
                    return await self.upstream.open(s.identity())
                case Upstream(data=data, replies=0):
                    self.upstream.write(data)
                    await self.upstream.drain()
                    return []
                case Upstream(data=data, replies=replies):
                    self.upstream.write(data)
                    return [await self.upstream.read_reply() for _ in range(replies)]
        except UpstreamError as exc:
            return exc
        raise AssertionError(f"unknown request {request!r}")
