"""The operations HTTP endpoint: ``/metrics``, ``/healthz``, ``/readyz``.

Served from the asyncio event loop (asyncio streams, a deliberately tiny
HTTP/1.1 subset: one GET/HEAD per connection, ``Connection: close``) rather
than prometheus_client's threaded ``start_http_server``:

* ``/readyz`` must run async checks (connect to Postfix and read its 220
  banner, ping the state store); doing them on the loop needs no second
  event loop nor thread-safety thinking.
* ``/healthz`` answered *by the loop* proves the loop is alive: a process
  whose loop is wedged (a blocking call, a busy loop) stops answering, and
  that is exactly what a liveness probe should see.  A thread would keep
  saying "ok" while no SMTP client gets served.
* ``/metrics`` is ``prometheus_client.generate_latest`` on the registry: a
  few hundred microseconds for our registry, so serving it on the loop costs
  the SMTP sessions nothing measurable.

Endpoints:

``/healthz``  200 ``ok`` while the process and its loop are alive.
``/readyz``   200 while mail can be answered as configured, else 503; the
              body lists each probe (``upstream ok`` / ``store failed: ...``).
              Probes: the listener is accepting (not shutting down),
              upstream Postfix answers 220, the state store answers and
              takes a write (:func:`probe_store`).  A failed store makes the
              node unready only when ``greylist.on_store_error =
              "tempfail"`` (recipients would be deferred); with ``accept``
              mail flows without it, so the node stays ready and the body
              and ``smtpguard_store_up 0`` say the store is down -- taking
              every node out of the load balancer at once for a store they
              share would stop the mail the store is not needed for.
              Results are cached for :data:`READY_CACHE_SECONDS` so a busy
              prober does not turn into connections to Postfix.
``/metrics``  the Prometheus text exposition.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable

from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .config import Config, HostPort
from .metrics import METRICS
from .store import Store, StoreError, start_deadline

log = logging.getLogger("smtpguard")

READY_CACHE_SECONDS = 1.0
PROBE_TIMEOUT = 5.0
_MAX_REQUEST = 8192


class ProbeError(Exception):
    """A readiness probe failed; ``str()`` says why."""


class Degraded(ProbeError):
    """A probe failed, but mail is still answered as configured: reported,
    the node stays ready."""


#: A readiness probe: returns normally when ready, raises ProbeError (or
#: any exception) when not.
Probe = Callable[[], Awaitable[None]]


# ------------------------------------------------------------------ probes

async def probe_upstream(address: HostPort, timeout: float = PROBE_TIMEOUT) -> None:
    """Connect to Postfix, expect a ``220`` greeting, say QUIT."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(address.host, address.port)
            line = await reader.readline()
            while line[3:4] == b"-":  # multi-line greeting
                line = await reader.readline()
            if not line.startswith(b"220"):
                raise ProbeError(f"{address} greeted with {line[:80]!r}")
            writer.write(b"QUIT\r\n")
            with contextlib.suppress(OSError):
                await writer.drain()
                await reader.readline()
    except TimeoutError:
        raise ProbeError(f"{address}: timed out") from None
    except OSError as exc:
        raise ProbeError(f"{address}: {os.strerror(exc.errno) if exc.errno else exc}") from None
    finally:
        if writer is not None:
            writer.close()


def store_needed(cfg: Config) -> bool:
    """Does a failed store change the answers to mail?  Only when
    greylisting defers recipients it cannot decide (``on_store_error =
    "tempfail"``); the allowlist cache and the rate counters fail open."""
    grey = cfg.greylist
    return grey.enabled and grey.on_store_error == "tempfail" and grey.action != "ignore"


async def probe_store(store: Store, cfg: Config) -> None:
    """Ping the store (a write, on a deadline of its own, as a session's);
    while the breaker skips it, the ping is its probe once the back-off is
    over.  Sets ``smtpguard_store_up``.  Raises :class:`Degraded` when the
    store failed and mail flows without it, ProbeError when mail waits."""
    start_deadline(cfg.state.deadline)
    try:
        await store.ping()
        problem = store.problem()
    except StoreError as exc:  # its own error, unless the file is known to be broken for good
        problem = store.problem() if store.failfast.broken else str(exc)
    METRICS.store_up.set(0 if problem else 1)
    if problem is None:
        return
    if store_needed(cfg):
        raise ProbeError(f"{problem} (recipients are deferred: greylist.on_store_error = tempfail)")
    raise Degraded(f"{problem} (mail is answered without it: greylist.on_store_error = "
                   f"{cfg.greylist.on_store_error if cfg.greylist.enabled else 'accept'})")


# ------------------------------------------------------------------ readiness

class Readiness:
    """Named probes, evaluated together, result cached briefly.

    The upstream probe reads the *current* configuration through *get_cfg*
    (so a reload that points upstream elsewhere is probed there); the store
    probe pings the store the pipeline really uses (*get_store*); other
    modules may :meth:`add` theirs.
    """

    def __init__(self, get_cfg: Callable[[], Config], get_store: Callable[[], Store],
                 accepting: Callable[[], bool] | None = None) -> None:
        self.probes: dict[str, Probe] = {}
        self._accepting = accepting
        self._cached: tuple[float, bool, list[str]] | None = None
        self._running: asyncio.Task[tuple[bool, list[str]]] | None = None
        self.add("upstream", lambda: probe_upstream(get_cfg().upstream.address,
                                                    min(get_cfg().upstream.connect_timeout, PROBE_TIMEOUT)))
        self.add("store", lambda: probe_store(get_store(), get_cfg()))

    def add(self, name: str, probe: Probe) -> None:
        self.probes[name] = probe

    async def check(self) -> tuple[bool, list[str]]:
        """``(ready, lines)``; one line per probe."""
        now = time.monotonic()
        if self._cached is not None and now - self._cached[0] < READY_CACHE_SECONDS:
            return self._cached[1], self._cached[2]
        if self._running is None or self._running.done():
            self._running = asyncio.ensure_future(self._run())
        ready, lines = await asyncio.shield(self._running)
        self._cached = (time.monotonic(), ready, lines)
        return ready, lines

    async def _run(self) -> tuple[bool, list[str]]:
        lines: list[str] = []
        ready = True
        if self._accepting is not None and not self._accepting():
            ready = False
            lines.append("listener failed: not accepting connections (starting or shutting down)")
        names = list(self.probes)
        results = await asyncio.gather(*(self._one(self.probes[n]) for n in names))
        for name, (problem, blocking) in zip(names, results, strict=True):
            if problem is None:
                lines.append(f"{name} ok")
            else:
                ready = ready and not blocking
                lines.append(f"{name} failed: {problem}")
        return ready, lines

    @staticmethod
    async def _one(probe: Probe) -> tuple[str | None, bool]:
        """(what failed or None, does it make the node unready)."""
        try:
            async with asyncio.timeout(PROBE_TIMEOUT + 1):
                await probe()
        except TimeoutError:
            return "timed out", True
        except Degraded as exc:
            return str(exc), False
        except Exception as exc:  # a probe must never take the endpoint down
            return str(exc) or type(exc).__name__, True
        return None, False


# ------------------------------------------------------------------ HTTP

class OpsServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` on ``[metrics] listen``."""

    def __init__(self, listen: HostPort, readiness: Readiness,
                 exposition: Callable[[], bytes] = METRICS.exposition) -> None:
        self.listen = listen
        self.readiness = readiness
        self.exposition = exposition
        self._server: asyncio.base_events.Server | None = None
        self._last_ready: bool | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.listen.host, self.listen.port,
                                                  reuse_address=True)
        log.info("metrics and health endpoint on http://%s/metrics", self.listen)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                head = await reader.readuntil(b"\r\n\r\n")
                status, ctype, body, method = await self._respond(head)
                out = (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                       "Connection: close\r\nCache-Control: no-store\r\n\r\n").encode()
                writer.write(out if method == "HEAD" else out + body)
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _respond(self, head: bytes) -> tuple[str, str, bytes, str]:
        text = "text/plain; charset=utf-8"
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split()
        if len(parts) != 3 or len(head) > _MAX_REQUEST:
            return "400 Bad Request", text, b"bad request\n", "GET"
        method, target = parts[0], parts[1].split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", text, b"method not allowed\n", method
        if target == "/metrics":
            return "200 OK", CONTENT_TYPE_LATEST, self.exposition(), method
        if target == "/healthz":
            return "200 OK", text, b"ok\n", method
        if target == "/readyz":
            ready, lines = await self.readiness.check()
            if ready is not self._last_ready:
                (log.info if ready else log.warning)("readiness: %s -- %s", "ready" if ready else "NOT ready",
                                                     "; ".join(lines))
                self._last_ready = ready
            body = ("\n".join(lines) + "\n").encode()
            return ("200 OK" if ready else "503 Service Unavailable"), text, body, method
        return "404 Not Found", text, b"not found: try /metrics, /healthz, /readyz\n", method
