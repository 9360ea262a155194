"""The policy service's sockets: a thin asyncio adapter around
:class:`~smtpguard.policy.protocol.PolicyParser` and
:class:`~smtpguard.policy.engine.PolicyEngine`.

One :class:`PolicyConnection` per Postfix connection (an
``asyncio.Protocol``, no streams: a request costs one ``data_received``
and one ``write``).  Requests on a connection are answered in order, one
at a time; a client that pipelines many has its reading paused while more
than :data:`MAX_QUEUED` wait.  Every request that ends gets exactly one
answer: a malformed one (see :mod:`.protocol`) gets ``[policy]
default_action`` and a warning, an internal error too.  Timers, one per
connection and re-armed lazily: a request begun must end within ``timeout``,
a connection without one is closed after ``idle_timeout``.

The engine follows reloads: :class:`PolicyServer` asks *source* for the
current pipeline on each request and builds a new engine when it changed
(the previous engine's X-Greylist instances carry over).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import time
from collections.abc import Callable
from typing import Any, cast

from ..metrics import METRICS
from .engine import PolicyEngine, who
from .protocol import Limits, PolicyParser, PolicyRequest, answer
from .settings import Endpoint, PolicyConfig

log = logging.getLogger("smtpguard")

#: requests waiting on one connection before its reading is paused
MAX_QUEUED = 32
#: attribute names the log has warned about (each once per process)
_WARNED_NAMES: set[str] = set()
_WARNED_LIMIT = 100


class PolicyServer:
    """The listeners of ``[policy] listen`` and their connections."""

    def __init__(self, source: Callable[[], Any]) -> None:
        self.source = source  # -> the current Pipeline (it follows reloads)
        self._pipeline: Any = None
        self._engine: PolicyEngine | None = None
        self.servers: list[asyncio.Server] = []
        self.connections: set[PolicyConnection] = set()
        self._paths: list[str] = []
        self._latency = METRICS.policy_request_seconds
        self._requests: dict[tuple[str, str], Any] = {}

    @property
    def cfg(self) -> PolicyConfig:
        return self.engine.cfg.policy

    @property
    def engine(self) -> PolicyEngine:
        pipeline = self.source()
        if pipeline is not self._pipeline or self._engine is None:
            self._engine = PolicyEngine(pipeline, self._engine)
            self._pipeline = pipeline
        return self._engine

    async def start(self, endpoints: tuple[Endpoint, ...]) -> None:
        checks = self.cfg.checks
        METRICS.init_policy(sorted({state for check in checks for state in check.states}))
        METRICS.init_checks((c.name for c in checks if c.name in _ONE_NAME), mode="policy")
        loop = asyncio.get_running_loop()
        try:
            for ep in endpoints:
                if ep.inet is not None:
                    server = await loop.create_server(self._protocol, ep.inet.host, ep.inet.port,
                                                      reuse_address=True, backlog=1024)
                else:
                    _remove_stale_socket(ep.path)
                    server = await loop.create_unix_server(self._protocol, ep.path, backlog=1024)
                    os.chmod(ep.path, 0o666)  # Postfix's smtpd (user postfix) connects; as postgrey's socketmode
                    self._paths.append(ep.path)
                self.servers.append(server)
                log.info("policy service listening on %s (check_policy_service %s)", ep, ep.postfix)
        except BaseException:
            await self.close()
            raise

    def _protocol(self) -> PolicyConnection:
        return PolicyConnection(self)

    async def close(self) -> None:
        """Stop listening and close every connection (Postfix reconnects to
        whoever listens next, and retries a request that got no answer)."""
        for server in self.servers:
            server.close()
        for conn in list(self.connections):
            conn.close()
        for server in self.servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self.servers.clear()
        for path in self._paths:
            with contextlib.suppress(OSError):
                os.unlink(path)
        self._paths.clear()

    def count(self, state: str, kind: str, started: float) -> None:
        key = (state, kind)
        counter = self._requests.get(key)
        if counter is None:  # labels() is slow: keep the children
            label = state if state in _STATES else "other"
            counter = self._requests[key] = METRICS.policy_requests.labels(state=label, action=kind)
        counter.inc()
        self._latency.observe(time.perf_counter() - started)


#: the policy checks whose results carry the check's own name (helo, sender, recipient and
#: client_name report the sub-check that decided, e.g. helo_required, sender_non_fqdn)
_ONE_NAME = frozenset({"client_access", "dnsbl", "rhsbl_reverse_client", "rhsbl_helo", "rhsbl_sender",
                       "helo_hostname", "sender_domain", "greylist"})
_STATES = frozenset({"CONNECT", "EHLO", "HELO", "MAIL", "RCPT", "DATA", "END-OF-MESSAGE", "VRFY", "ETRN"})


def _remove_stale_socket(path: str) -> None:
    """A socket left by a previous run (never any other kind of file)."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)


class PolicyConnection(asyncio.Protocol):
    """One Postfix connection."""

    def __init__(self, server: PolicyServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.peer = "unknown"
        self.queue: list[PolicyRequest] = []
        self.worker: asyncio.Task[None] | None = None
        self.paused = False
        self.deadline = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.parser: PolicyParser | None = None
        self.loop = asyncio.get_running_loop()

    # ------------------------------------------------------------ plumbing

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = f"[{peer[0]}]:{peer[1]}" if isinstance(peer, tuple) else "local"
        server = self.server
        try:
            cfg = server.cfg
        except Exception as exc:  # the engine could not be built: nothing to serve with
            log.error("policy: cannot serve %s: %s", self.peer, exc)
            METRICS.policy_errors.labels(problem="internal").inc()
            transport.close()
            return
        if len(server.connections) >= cfg.max_connections:
            log.warning("policy: too many connections (%d), closing %s", cfg.max_connections, self.peer)
            METRICS.policy_errors.labels(problem="overload").inc()
            transport.close()
            return
        server.connections.add(self)
        METRICS.policy_connections.inc()
        self.parser = PolicyParser(Limits(cfg.max_attribute_size, cfg.max_request_size))
        self._arm(cfg.idle_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.server.connections:
            self.server.connections.discard(self)
            METRICS.policy_connections.dec()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.worker is not None:
            self.worker.cancel()
        self.queue.clear()
        self.transport = None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.parser is None:
            return
        requests = self.parser.feed(data)
        cfg = self.server.cfg
        self._arm(cfg.timeout if self.parser.pending else cfg.idle_timeout)
        if not requests:
            return
        self.queue.extend(requests)
        if self.worker is None:
            self.worker = self.loop.create_task(self._work())
        if len(self.queue) > MAX_QUEUED and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool | None:
        if self.parser is not None and self.parser.pending:
            log.warning("policy: %s closed the connection in the middle of a request", self.peer)
        return None  # close (answers still queued are lost with the connection, as Postfix left)

    # ------------------------------------------------------------ timers

    def _arm(self, seconds: float) -> None:
        self.deadline = self.loop.time() + seconds
        if self.timer is None:
            self.timer = self.loop.call_at(self.deadline, self._expired)

    def _expired(self) -> None:
        self.timer = None
        if self.transport is None:
            return
        if self.worker is not None:  # a request is being answered: wait for it
            self._arm(self.server.cfg.timeout)
            return
        if self.loop.time() < self.deadline:  # pushed forward meanwhile
            self.timer = self.loop.call_at(self.deadline, self._expired)
            return
        partial = self.parser is not None and self.parser.pending
        log.warning("policy: timeout %s from %s, closing", "in the middle of a request" if partial
                    else "waiting for a request", self.peer)
        METRICS.policy_errors.labels(problem="timeout").inc()
        self.transport.close()

    # ------------------------------------------------------------ answering

    async def _work(self) -> None:
        try:
            while self.queue and self.transport is not None:
                req = self.queue.pop(0)
                action = await self._answer(req)
                if self.transport is None:
                    return
                self.transport.write(answer(action))
                if self.paused and len(self.queue) <= MAX_QUEUED // 2:
                    self.paused = False
                    self.transport.resume_reading()
        finally:
            self.worker = None

    async def _answer(self, req: PolicyRequest) -> str:
        server = self.server
        started = time.perf_counter()
        engine = server.engine
        cfg = engine.cfg.policy
        if req.unknown:
            _warn_unknown(req.unknown, self.peer)
        if not req.ok:
            log.warning("policy: malformed request from %s (%s): %s; answering %s", self.peer, who(req),
                        "; ".join(req.problems), cfg.default_action)
            METRICS.policy_errors.labels(problem="malformed").inc()
            server.count(req.state, "default", started)
            return cfg.default_action
        try:
            found = await engine.decide(req)
        except Exception:
            log.exception("policy: internal error on a request from %s (%s); answering %s", self.peer, who(req),
                          cfg.default_action)
            METRICS.policy_errors.labels(problem="internal").inc()
            server.count(req.state, "default", started)
            return cfg.default_action
        server.count(req.state, found.kind, started)
        return found.action


def _warn_unknown(names: list[str], peer: str) -> None:
    """Newer Postfix versions add attributes: say so once per name, not per request."""
    new = [n for n in names if n not in _WARNED_NAMES]
    if new and len(_WARNED_NAMES) < _WARNED_LIMIT:
        _WARNED_NAMES.update(new)
        log.warning("policy: ignoring unknown attribute(s) %s from %s", ", ".join(new), peer)
