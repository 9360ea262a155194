"""The listener: the thin adapter between asyncio and one SMTP session.

:class:`GuardProtocol` is a plain :class:`asyncio.Protocol`.  Bytes from the
client go into the session's own read-ahead buffer
(:class:`~smtpguard.clientinput.ClientInput`); one task per connection
(:meth:`GuardProtocol._serve`) drives the session's
:class:`~smtpguard.machine.SessionMachine`, which decides everything: it is
given the connect, each command line and each timeout, and returns
actions, which :meth:`GuardProtocol._drive` carries out in order:

* effects: bytes for the client (``transport.write``; held back while the
  error sleep is armed), closing or aborting the connection to Postfix,
  input handed back to the reader, the end of the session;
* requests, whose result goes back to the machine: the pipeline's verdict
  at a stage (``Screen``), the hand-off of the socket to Postfix's smtpd,
  the pregreet wait, the upstream connection and the commands forwarded on
  it (:class:`~smtpguard.relay.Upstream`), the STARTTLS handshake, the next
  chunk of a message body.

Only public asyncio API is used: writes are gated by
``pause_writing``/``resume_writing`` (:meth:`GuardProtocol.drain`), and
STARTTLS is :meth:`asyncio.loop.start_tls` on the same protocol, which keeps
getting ``data_received`` from the TLS transport it returns.  The idle timer
is one lazily re-armed ``call_at`` whose duration the machine gives
(:attr:`~smtpguard.machine.SessionMachine.timeout`).

aiosmtpd (pinned to 1.4.6 in pyproject.toml) stays the project's SMTP
foundation, but only through its public PROXY protocol parser
(:func:`aiosmtpd.proxy_protocol.get_proxy`, fed from the ClientInput).  Its
:class:`~aiosmtpd.smtp.SMTP` command loop is not used: it sends the banner
before any hook (no pregreet wait), sends ``354`` itself and buffers the
whole message before ``handle_DATA`` (no streaming, no relaying Postfix's
own 354), rejects RCPT parameters and sends exception text to the client;
and its public surface has no hook to replace the loop, so subclassing it
meant overriding a private method.  Re-check get_proxy's
reader contract (``read``/``readexactly``/``readuntil``) when moving the pin.

Transport (docs/transport.md): with ``server.proxy_protocol`` the header is
read first and its addresses are the client's for everything after (Session,
per-client count, pregreet timing).

:class:`Server` owns the listening sockets, the set of live sessions and the
graceful shutdown (stop accepting, let transactions finish within a bound,
421 to whoever is left, never half-acknowledge a message).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from typing import cast

from aiosmtpd.proxy_protocol import AF, get_proxy

from . import handoff, logs, tls
from .checks.limits import client_key
from .clientinput import TOO_LONG, ClientInput
from .config import Config
from .machine import (
    REQUESTS,
    AbortUpstream,
    Arm,
    Close,
    Effect,
    Event,
    Greeted,
    GreetWait,
    HandOff,
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
from .metrics import METRICS
from .net import IPAddress, parse_ip, parse_ip_or_none
from .pipeline import Pipeline
from .relay import Upstream as UpstreamConnection
from .relay import UpstreamError
from .session import Session
from .verdict import REPLIES

log = logging.getLogger("smtpguard")
# aiosmtpd's PROXY parser warns on its own logger; our warning line says the
# same in Postfix's format, so keep its lines off stderr (logging's lastResort).
logging.getLogger("mail.debug").addHandler(logging.NullHandler())

_READ_LIMIT = 64 * 1024  # a DATA read; a command line longer than this (+1) is refused whatever line_length_limit says
_REQUEST_TYPES = frozenset(REQUESTS)  # the action types that need an answer, tested by exact type


class GuardProtocol(asyncio.Protocol):
    """One client connection."""

    def __init__(self, server: Server) -> None:
        self.loop = asyncio.get_running_loop()
        self.server = server
        # One configuration per connection, taken at accept: a SIGHUP never
        # changes the settings (or the pipeline, or the TLS context) of a
        # session in progress; the next connection gets the new ones.
        self.cfg = cfg = server.cfg
        self.pipeline = server.pipeline
        self.tls_context = server.tls_context
        self.transport: asyncio.Transport | None = None  # None once the connection is lost
        self.input = ClientInput()
        self._writable: asyncio.Event | None = None  # while writing is paused: set by resume_writing
        self._task: asyncio.Task[None] | None = None
        self._timeout_duration = cfg.server.command_timeout
        self._timeout_handle: asyncio.TimerHandle | None = None
        self._deadline = 0.0
        self._counted = False  # in server.sessions and the metrics; undone once (_forget)
        self.machine: SessionMachine | None = None  # the session's logic, made once the client is known
        self.upstream: UpstreamConnection | None = None  # made at the first OpenUpstream
        # smtpd_error_sleep_time: output held back while the error sleep is armed.
        self._hold = 0.0
        self._held: list[bytes] = []
        self._session: Session | None = None
        self._waiting = False  # blocked reading the next command
        self._ip: str | None = None  # the client's key in server.per_ip (limits.client_key)
        self._first_data: float | None = None  # loop time of the client's first byte
        self._encrypted = False  # STARTTLS done
        self._line_open = False  # under stress, in DATA: the body's current line has no LF yet

    # ------------------------------------------------------------ client I/O

    def send(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    async def drain(self) -> None:
        """Until the transport's write buffer is below its high-water mark."""
        writable = self._writable
        if writable is not None:
            await writable.wait()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    @property
    def tls_available(self) -> bool:
        return self.tls_context is not None and not self._encrypted

    async def start_tls(self) -> str | None:
        """After ``220 Ready to start TLS``: discard the input pipelined
        behind STARTTLS (RFC 3207 section 4.2; CVE-2011-0411), then the
        server-side handshake on the same connection.  Returns the
        connection's description for the log, None when the handshake failed
        (the connection is closed then)."""
        assert self.transport is not None and self.tls_context is not None
        await self.drain()
        plain = self.transport
        # No await between the discard and start_tls() pausing the plain
        # transport: nothing sent in clear can slip into the TLS session.
        self.input.discard()
        try:
            async with asyncio.timeout(self.machine.timeout if self.machine else self._timeout_duration):
                encrypted = await self.loop.start_tls(plain, self, self.tls_context, server_side=True)
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            who = self._session.who if self._session else "?"
            log.info("SSL_accept error from %s: %s", who, exc or type(exc).__name__)
            plain.abort()  # start_tls closed it already; abort drops what is unsent
            self._lost_in_handshake()
            return None
        if encrypted is None:  # closed during the handshake (the idle timer)
            self._lost_in_handshake()
            return None
        self.transport = encrypted
        self.input.attach(self.transport)
        self._encrypted = True
        return tls.describe(cast(ssl.SSLObject, encrypted.get_extra_info("ssl_object")))

    # ------------------------------------------------------------ the loop

    async def _serve(self) -> None:
        """The session: the client's endpoints, then the machine driven
        until it closes."""
        assert self.transport is not None
        peer = self.transport.get_extra_info("peername")
        local = self.transport.get_extra_info("sockname")
        client, ours = (parse_ip(peer[0]), peer[1]), (_address(local[0]), local[1])
        if self.cfg.server.proxy_protocol:
            proxied = await self._read_proxy(client, ours)
            if proxied is None:
                self.close()
                return
            client, ours = proxied
            # The pregreet test times the client's first byte, not the header's.
            self._first_data = self.loop.time() if self.input.pending() else None
        self._count_client(client[0])
        s = self._session = Session(client[0], client[1], ours[0], ours[1])
        log.info("CONNECT from %s to %s", s.peer, logs.endpoint(*ours))
        m = self.machine = SessionMachine(self.cfg, s, self.tls_available)
        cancelled = False
        client_input, server = self.input, self.server
        try:
            await self._drive(m.connect())
            # The first command's full time, after the greet wait -- the machine's
            # timeout now (the screening limit; under stress, the stress one).
            self._reset_timeout(m.timeout)
            while not m.closed and self.transport is not None:
                if self._writable is not None:  # drain(), without a coroutine per command
                    await self._writable.wait()
                if server.closing and not s.in_transaction:
                    self.send(REPLIES["shutdown"].wire())
                    break
                self._waiting = True
                line = await self._read_command(m)
                self._waiting = False
                if line is None:
                    m.lost()
                    break
                # Input already received past this line: the pipelining test's evidence.
                pending = client_input.peek(256) if client_input.pending() else b""
                self._reset_timeout(m.timeout)
                await self._drive(m.command(line, pending))
                # The next command's own time: a wait the command ended with (Postfix's
                # reply to the final dot, see SessionMachine.timeout) is not the client's.
                self._reset_timeout(m.timeout)
        except asyncio.CancelledError:
            cancelled = True  # connection lost or timed out
            raise
        except ConnectionError:
            pass
        except Exception:
            log.exception("%s: internal error", s.who)
            self.send(REPLIES["internal_error"].wire())
        finally:
            self.pipeline.on_disconnect(s)
            if self.upstream is not None:
                if cancelled:
                    self.upstream.abort()
                else:
                    self.upstream.quit()
            self.close()  # the transport flushes what is left, then closes
            m.finish()

    # ------------------------------------------------------------ the machine's actions

    async def _drive(self, actions: list[Effect | Request]) -> None:
        """Carry out the machine's actions in order; a request's result goes
        back to the machine, whose next actions follow.  Then the error
        sleep, if one was armed: the replies it held go out after it."""
        m = self.machine
        assert m is not None
        try:
            while actions:
                last = actions[-1]
                if type(last) not in _REQUEST_TYPES:
                    self._effects(actions)
                    break
                self._effects(actions[:-1])
                actions = m.answer(await self._request(last))
        finally:
            if self._hold:
                await self._release()

    def _effects(self, effects: list[Effect | Request]) -> None:
        """Effects in order (the machine returns a request only as its last
        action); replies that follow each other go out in one write -- the
        replies to a pipelined group of recipients, say."""
        replies: list[bytes] = []
        for effect in effects:
            if type(effect) is Send:
                (self._held if self._hold else replies).append(effect.data)
                continue
            if replies:
                self.send(b"".join(replies))
                replies = []
            self._effect(effect)
        if replies:
            self.send(b"".join(replies))

    def _effect(self, effect: Effect | Request) -> None:
        """One effect other than Send."""
        if type(effect) is Arm:
            # Each error reply waits its own sleep, as in smtpd: the replies
            # to a pipelined group that held several wait for them all.
            self._hold += effect.seconds
        elif type(effect) is AbortUpstream:
            if self.upstream is not None:
                self.upstream.abort()
        elif type(effect) is QuitUpstream:
            if self.upstream is not None:
                self.upstream.quit()
        elif type(effect) is Unread:
            self.input.unread(effect.data)  # read past the end of DATA
        elif type(effect) is not Close:  # Close: the machine is closed, _serve ends and closes the connection
            raise AssertionError(f"a request among the effects: {effect!r}")

    async def _request(self, request: Effect | Request) -> Event:
        """One request's answer; the frequent ones (Postfix, a command's
        screening) are tested first, by exact type: this runs several times
        per command."""
        if type(request) is Upstream:
            return await self._upstream(request)
        s = self._session
        assert s is not None
        if type(request) is Screen:
            return await self._screen(s, request)
        if type(request) is OpenUpstream:
            self.upstream = UpstreamConnection(self.cfg.upstream)  # one object per connection
            try:
                return await self.upstream.open(s.identity())
            except UpstreamError as exc:
                return exc
        if type(request) is ReadBody:
            assert self.machine is not None
            if not self._line_open:
                self._reset_timeout(self.machine.timeout)
            chunk = await self.input.read(_READ_LIMIT)
            # Under stress, smtpd_per_record_deadline: the timeout is a deadline for each
            # line of the body, not pushed back by every byte of it (a trickler).
            self._line_open = s.stress and b"\n" not in chunk
            return chunk
        if type(request) is HandOff:
            return self._hand_off(s)
        if type(request) is GreetWait:
            return await self._greet_wait(request.seconds, request.stop_early)
        if type(request) is StartTls:
            return await self.start_tls()
        raise AssertionError(f"unknown request {request!r}")

    async def _upstream(self, request: Upstream) -> Event:
        """Write to Postfix; its replies (or, with none wanted, room to write)."""
        upstream = self.upstream
        machine = self.machine
        if machine is not None and machine.in_data and not self._line_open:
            # Postfix's pace, not the client's: the body's drains, and the reply to
            # the final dot, which may take upstream.data_done_timeout (the
            # machine's timeout then; server.data_timeout must not cut it short).
            self._reset_timeout(machine.timeout)
        try:
            if upstream is None:
                raise UpstreamError("not connected")
            upstream.write(request.data)
            if request.replies == 0:
                await upstream.drain()
                return []
            return await upstream.replies(request.replies)
        except UpstreamError as exc:
            return exc

    async def _screen(self, s: Session, request: Screen) -> Event:
        pipeline, stage = self.pipeline, request.stage
        if stage is Stage.COMMAND:
            return await pipeline.on_command(s, request.line, request.command, request.pending, request.previous)
        if stage is Stage.RCPT:
            return await pipeline.on_rcpt(s, request.rcpt or "")
        if stage is Stage.RELAYED:
            await pipeline.on_relayed(s)
            return None
        if stage is Stage.MAIL:
            return await pipeline.on_mail(s)
        if stage is Stage.HELO:
            return await pipeline.on_helo(s)
        if stage is Stage.DATA:
            return await pipeline.on_data(s)
        if stage is Stage.GREYLIST:
            return await pipeline.on_greylist(s, request.rcpt or "")
        if stage is Stage.CONNECT:
            concurrent = self.server.per_ip.get(self._ip or "", 1)
            return await pipeline.on_connect(s, len(self.server.sessions), concurrent)
        if stage is Stage.GREET:
            return await pipeline.on_greet(s, request.line, request.after)
        if stage is Stage.BANNER:
            return await pipeline.on_banner(s)
        raise AssertionError(f"unknown stage {stage!r}")

    def _hand_off(self, s: Session) -> bool:
        """Give the client's socket to Postfix's smtpd pass service
        (:mod:`smtpguard.handoff`); True when it went.  Not when the client
        has sent something already (early talk, or bytes behind a PROXY
        header): what is in our buffer could not go along."""
        if self.transport is None or self.input.pending() or self.input.eof:
            return False
        transport = self.transport
        path = self.cfg.handoff.socket
        transport.pause_reading()  # what the client sends now stays in the kernel, for smtpd
        try:
            handoff.send(path, transport.get_extra_info("socket").fileno(),
                         (s.client_addr, s.client_port), (s.server_ip, s.server_port))
        except OSError as exc:
            log.warning("cannot pass connection to service %s: %s", path, exc.strerror or exc)
            transport.resume_reading()
            self.pipeline.on_handoff(s, False)
            return False
        self.pipeline.on_handoff(s, True)
        return True

    async def _read_proxy(self, sender: tuple[IPAddress, int], ours: tuple[str, int]
                          ) -> tuple[tuple[IPAddress, int], tuple[str, int]] | None:
        """PROXY protocol v1/v2 header from a trusted load balancer: the real
        client's and server's endpoints; None (and a log line) when the
        sender is not trusted or the header is missing, late or bad.  A
        ``LOCAL`` (v2) or ``UNKNOWN`` (v1) header, as health checks send,
        keeps the connection's own endpoints, as postscreen does."""
        cfg = self.cfg.server
        where = logs.endpoint(str(sender[0]), sender[1])
        if not any(sender[0] in net for net in cfg.proxy_trusted):
            log.warning("PROXY protocol: connection from %s, which is not in server.proxy_trusted: closed", where)
            return None
        try:
            async with asyncio.timeout(cfg.proxy_timeout):
                data = await get_proxy(self.input)
        except TimeoutError:
            log.warning("PROXY protocol: read from %s: time limit exceeded", where)
            return None
        except (asyncio.IncompleteReadError, ConnectionError):
            log.warning("PROXY protocol: read from %s: lost connection", where)
            return None
        if not data:
            log.warning("PROXY protocol: bad header from %s: %s", where, data.error or "unsupported")
            return None
        if data.family == AF.UNIX:
            log.warning("PROXY protocol: header from %s: unsupported address family UNIX", where)
            return None
        if data.src_addr is None or data.src_port is None or data.dst_addr is None or data.dst_port is None:
            return sender, ours  # LOCAL / UNKNOWN: not proxied
        client = parse_ip_or_none(str(data.src_addr))
        if client is None:
            log.warning("PROXY protocol: bad header from %s: %s", where, "bad source address")
            return None
        return (client, data.src_port), (_address(str(data.dst_addr)), data.dst_port)

    def _count_client(self, ip: IPAddress) -> None:
        """anvil's per-client count (IPv6 by /64); undone in connection_lost."""
        self._ip = key = client_key(ip)
        self.server.per_ip[key] = self.server.per_ip.get(key, 0) + 1

    async def _release(self) -> None:
        """After the error sleep: send the output it held back."""
        try:
            if self.transport is not None:
                await asyncio.sleep(self._hold)
        finally:
            self._hold = 0.0
            held, self._held = self._held, []
            if held:
                self.send(b"".join(held))

    async def _greet_wait(self, wait: float, stop_early: bool) -> Greeted:
        """Wait *wait* seconds after ``220-``; return what the client sent
        meanwhile (left in the buffer for the command loop) and when its
        first byte came.  *stop_early*: end the wait at the first byte."""
        loop = self.loop
        start = loop.time()
        self._waiting = True  # a shutdown may close the connection now
        try:
            if self._first_data is None and not self.input.at_eof():
                try:
                    async with asyncio.timeout(wait):
                        await self.input.wait_data()
                except TimeoutError:
                    pass
            if not stop_early and not self.input.at_eof():  # early talk then EOF: wait on
                remaining = wait - (loop.time() - start)
                if remaining > 0:
                    await asyncio.sleep(remaining)
        finally:
            self._waiting = False
        after = max(0.0, self._first_data - start) if self._first_data is not None else 0.0
        return Greeted(self.input.peek(512), after, self.input.at_eof())

    async def _read_command(self, m: SessionMachine) -> bytes | None:
        """One command line as received (with its CRLF/LF); None at end of input."""
        # Longer lines were refused before, whatever line_length_limit said (StreamReader's limit).
        limit = min(self.cfg.server.line_length_limit, _READ_LIMIT + 1)
        while True:
            line = await self.input.readline(limit)
            if line is not TOO_LONG:
                return line or None
            # The error sleep delays this reply; it never waits for another command.
            await self._drive(m.line_too_long())
            await self.drain()

    # ------------------------------------------------------------ plumbing

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """The client is counted in ``server.per_ip`` by :meth:`_serve`,
        once its address is known (a PROXY header may give it)."""
        self.transport = cast(asyncio.Transport, transport)
        self.input.attach(self.transport)
        self._reset_timeout()
        self._task = self.loop.create_task(self._serve())
        self.server.sessions.add(self)
        self._counted = True
        METRICS.connections.inc()
        METRICS.sessions_active.inc()

    def data_received(self, data: bytes) -> None:
        if self._first_data is None:
            self._first_data = self.loop.time()
        self.input.feed(data)

    def eof_received(self) -> bool:
        """The client half-closed: let the loop answer what it already sent
        and end at its next read."""
        self.input.feed_eof()
        return not self._encrypted  # keeping a TLS transport half-open is not possible

    def pause_writing(self) -> None:
        if self._writable is None:
            self._writable = asyncio.Event()

    def resume_writing(self) -> None:
        writable, self._writable = self._writable, None
        if writable is not None:
            writable.set()

    def connection_lost(self, error: Exception | None) -> None:
        self._forget()
        self.input.feed_eof()
        self.resume_writing()
        if self._task is not None:
            self._task.cancel()
        self.transport = None

    def _lost_in_handshake(self) -> None:
        """asyncio's TLS layer reports a connection closed in mid-handshake
        to nobody (no connection_lost for us): do its bookkeeping here."""
        self._forget()
        self.transport = None

    def _forget(self) -> None:
        """Take the connection out of the server's counts (once)."""
        if not self._counted:
            return
        self._counted = False
        self.server.sessions.discard(self)
        if self._ip is not None:
            ip, self._ip = self._ip, None
            left = self.server.per_ip.get(ip, 1) - 1
            if left > 0:
                self.server.per_ip[ip] = left
            else:
                self.server.per_ip.pop(ip, None)
        METRICS.sessions_active.dec()
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()
        self.server.session_ended()

    def _reset_timeout(self, duration: float | None = None) -> None:
        """Push the idle deadline forward.  Cheap on purpose (it runs per
        command and per DATA chunk): the one timer is re-armed lazily by
        :meth:`_timeout_cb` instead of being cancelled and re-created --
        unless the deadline moved *earlier* than the timer (a shorter timeout:
        the screening limit, stress mode), which the lazy timer would miss."""
        self._deadline = self.loop.time() + (duration or self._timeout_duration)
        handle = self._timeout_handle
        if handle is None or self._deadline < handle.when():
            if handle is not None:
                handle.cancel()
            self._timeout_handle = self.loop.call_at(self._deadline, self._timeout_cb)

    def _timeout_cb(self) -> None:
        """Postfix's ``timeout after CMD``: 421, log, close."""
        if self.loop.time() < self._deadline:  # activity since: sleep on
            self._timeout_handle = self.loop.call_at(self._deadline, self._timeout_cb)
            return
        if self.machine is not None:  # none yet while a PROXY header is read
            self._effects(self.machine.timed_out())
        self.close()

    def shutdown_idle(self) -> None:
        """At shutdown: a session waiting for a command outside a
        transaction is told 421 and closed now; others finish first."""
        s = self._session
        if s is not None and self._waiting and not s.in_transaction and self.transport is not None:
            self.send(f"{REPLIES['shutdown']}\r\n".encode())
            self.transport.close()

    def force_close(self) -> None:
        if self.upstream is not None:
            self.upstream.abort()
        if self.transport is not None:
            self.send(f"{REPLIES['shutdown']}\r\n".encode())
            self.transport.close()


def _address(ip: str) -> str:
    """Our own address as Postfix writes it: canonical, IPv4-mapped IPv6 as IPv4."""
    if ":" not in ip:  # IPv4 from the kernel or a PROXY header is canonical already
        return ip
    addr = parse_ip_or_none(ip)
    return ip if addr is None else str(addr)


class Server:
    """The listening sockets and the live sessions."""

    def __init__(self, cfg: Config, pipeline: Pipeline) -> None:
        self.cfg = cfg
        self.pipeline = pipeline
        self.sessions: set[GuardProtocol] = set()
        self.per_ip: dict[str, int] = {}  # open connections per client address (anvil's count)
        self.closing = False
        self._servers: list[asyncio.Server] = []
        self._idle = asyncio.Event()
        self.tls_context = tls.build_context(cfg.tls)

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
            log.info("shutdown: closing session from %s", p._session.who if p._session else "?")
            p.force_close()
        for srv in self._servers:
            await srv.wait_closed()
