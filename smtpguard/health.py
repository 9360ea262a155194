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
``/readyz``   200 when every readiness probe passes, else 503; the body
              lists each probe (``upstream ok`` / ``store failed: ...``).
              Probes: the listener is accepting (not shutting down),
              upstream Postfix answers 220, the state store answers.
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
from .store import Store

log = logging.getLogger("smtpguard")

READY_CACHE_SECONDS = 1.0
PROBE_TIMEOUT = 5.0
_MAX_REQUEST = 8192


class ProbeError(Exception):
    """A readiness probe failed; ``str()`` says why."""


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
        self.add("store", lambda: get_store().ping())

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
        for name, problem in zip(names, results, strict=True):
            if problem is None:
                lines.append(f"{name} ok")
            else:
                ready = False
                lines.append(f"{name} failed: {problem}")
        return ready, lines

    @staticmethod
    async def _one(probe: Probe) -> str | None:
        try:
            async with asyncio.timeout(PROBE_TIMEOUT + 1):
                await probe()
        except TimeoutError:
            return "timed out"
        except Exception as exc:  # a probe must never take the endpoint down
            return str(exc) or type(exc).__name__
        return None


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
