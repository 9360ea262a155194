"""How the state store fails fast: a deadline per session, a circuit
breaker, allowlist-cache writes off the reply path.

A store that stops answering (a Redis frozen by a stalled disk, a network
partition, an overloaded host) must not hold SMTP sessions: every session
waiting on it keeps a connection slot, and with the limits' defaults a short
stall would fill ``server.max_connections``.  So every store call goes
through :meth:`FailFast.run` (from :meth:`Store._call <.base.Store._call>`):

* **One deadline per session** (``[state] deadline``, 1 s): the pipeline
  starts a :class:`Budget` when a session connects (:func:`start_deadline`);
  the session's store calls together may take that long.  Each call is
  bounded by what is left and spends what it took; once nothing is left the
  next call fails at once.  The budget lives in a :class:`~contextvars.ContextVar`:
  a session is one asyncio task, and every coroutine it awaits sees its
  budget.  Calls made outside a session -- operator commands, the cleanup
  sweep -- have no budget and no deadline; the background writer and the
  readiness probe give each of their calls a deadline of its own.
* **A circuit breaker** (:class:`Breaker`): after ``breaker_failures``
  consecutive failures the store is skipped for ``breaker_backoff``: calls
  fail at once, as if the store had failed, and ``on_store_error`` decides.
  Then one call goes through (the probe: a session's, or the readiness
  probe's); its success closes the breaker, its failure skips the store for
  another back-off.  A store that fails *fast* (a full disk refusing
  writes) trips it too when nothing succeeds in between.
* **Allowlist-cache writes off the reply path** (:class:`WriteBehind`): a
  test that passed or failed is queued and written by one background task,
  so no client waits for it.  Writes for one client IP are merged in the
  queue; when ``write_queue`` client IPs are waiting, a new one is dropped
  and counted (``smtpguard_store_writes_dropped_total``): a lost cache write
  only means the client is tested again.
* **Health** (:meth:`FailFast.problem`): the breaker's state and whether
  the last read, or the last write, failed; read by ``/readyz`` and
  ``smtpguard_store_up``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import enum
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol, TypeVar

from ..metrics import METRICS

T = TypeVar("T")
log = logging.getLogger("smtpguard")


class StoreError(Exception):
    """The store could not be read or written (unreachable, unwritable, corrupt, skipped)."""


@dataclass(frozen=True)
class Limits:
    """``[state]``'s fail-fast settings (see the module docstring)."""

    deadline: float = 1.0  # seconds of store time per session, all calls together
    breaker_failures: int = 5  # consecutive failures that open the breaker; 0: never
    breaker_backoff: float = 10.0  # seconds the store is skipped before a probe
    write_queue: int = 10000  # client IPs whose cache writes may wait


class Budget:
    """What is left of one session's store deadline, in seconds."""

    __slots__ = ("left",)

    def __init__(self, seconds: float) -> None:
        self.left = seconds


_BUDGET: contextvars.ContextVar[Budget | None] = contextvars.ContextVar("smtpguard_store_budget", default=None)


def start_deadline(seconds: float) -> Budget:
    """Give the current task (one session, one policy request) *seconds*
    of store time for all its store calls together."""
    budget = Budget(seconds)
    _BUDGET.set(budget)
    return budget


class State(enum.Enum):
    CLOSED = "closed"  # the store is used
    OPEN = "open"  # the store is skipped until the back-off ends
    PROBING = "probing"  # one call is trying the store; the others skip it


class Breaker:
    """A circuit breaker on a clock (``time.monotonic``; a fake one in tests)."""

    def __init__(self, failures: int, backoff: float, clock: Callable[[], float] = time.monotonic,
                 name: str = "state store") -> None:
        self.failures = failures
        self.backoff = backoff
        self.clock = clock
        self.name = name
        self.state = State.CLOSED
        self.consecutive = 0
        self.retry_at = 0.0
        self.opened_at = 0.0
        self.last_error = ""

    @property
    def up(self) -> bool:
        return self.state is State.CLOSED

    def admit(self) -> bool:
        """May a call go to the store now?  An open breaker lets one call
        through (the probe) once the back-off is over."""
        if self.state is State.CLOSED:
            return True
        if self.state is State.OPEN and self.clock() >= self.retry_at:
            self.state = State.PROBING
            return True
        return False

    def success(self) -> None:
        self.consecutive = 0
        if self.state is not State.CLOSED:
            log.warning("%s: answering again after %.1fs; using it again", self.name, self.clock() - self.opened_at)
            self.state = State.CLOSED

    def failure(self, error: str) -> None:
        self.consecutive += 1
        self.last_error = error
        if self.state is State.PROBING:
            self.state = State.OPEN
            self.retry_at = self.clock() + self.backoff
        elif self.state is State.CLOSED and self.failures and self.consecutive >= self.failures:
            self.state = State.OPEN
            self.opened_at = self.clock()
            self.retry_at = self.opened_at + self.backoff
            METRICS.store_breaker_opened.inc()
            log.warning("%s: %d consecutive failures, skipped for %gs (on_store_error applies): %s",
                        self.name, self.consecutive, self.backoff, error)

    def abandon(self) -> None:
        """The probe was cancelled (its session ended): no verdict, the next call probes."""
        if self.state is State.PROBING:
            self.state = State.OPEN
            self.retry_at = self.clock()

    def problem(self) -> str | None:
        if self.state is State.CLOSED:
            return None
        wait = max(0.0, self.retry_at - self.clock())
        return (f"skipped after {self.consecutive} consecutive failures (next try in {wait:.0f}s): "
                f"{self.last_error}")


def _discard(op: Awaitable[object]) -> None:
    if inspect.iscoroutine(op):
        op.close()  # never awaited: no "coroutine was never awaited" warning


class FailFast:
    """The deadline, the breaker and the health of one store."""

    def __init__(self, backend: str, limits: Limits | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.backend = backend
        self.clock = clock
        self.limits = limits or Limits()
        self.breaker = Breaker(self.limits.breaker_failures, self.limits.breaker_backoff, clock)
        # "read" / "write" / a backend's own ("checkpoint") -> the last failure of that kind, until one succeeds
        self.failing: dict[str, str] = {}
        self.broken: str | None = None  # a failure that does not heal (a corrupt database): until restart

    def configure(self, limits: Limits) -> None:
        """New settings (start, reload); the breaker's state is kept."""
        self.limits = limits
        self.breaker.failures, self.breaker.backoff = limits.breaker_failures, limits.breaker_backoff

    async def run(self, op: Awaitable[T], write: bool, errors: tuple[type[BaseException], ...],
                  fatal: Callable[[BaseException], bool] = lambda exc: False) -> T:
        budget = _BUDGET.get()
        if budget is not None and budget.left <= 0:
            _discard(op)
            raise StoreError(f"{self.backend}: the session's store deadline ({self.limits.deadline:g}s) is spent")
        if not self.breaker.admit():
            _discard(op)
            raise StoreError(f"{self.backend}: {self.breaker.problem()}")
        start = self.clock()
        try:
            if budget is None:
                result = await op
            else:
                async with asyncio.timeout(budget.left):
                    result = await op
        except TimeoutError:  # before OSError, of which it is a subclass
            if budget is None:
                raise
            error = f"{self.backend}: no answer within the store deadline"
            self._failed(write, error)
            raise StoreError(error) from None
        except errors as exc:
            error = f"{self.backend}: {exc}"
            if fatal(exc) and self.broken is None:
                self.broken = error
                log.error("state store: %s: the store stays failed until smtpguard is restarted", error)
            self._failed(write, error)
            raise StoreError(error) from exc
        except BaseException:  # cancelled with its session: nothing learnt
            self.breaker.abandon()
            raise
        finally:
            if budget is not None:
                budget.left -= self.clock() - start
        if self.failing or not self.breaker.up:
            self.failing.pop("write" if write else "read", None)
            self.breaker.success()
            self._show()
        else:
            self.breaker.consecutive = 0
        return result

    def _failed(self, write: bool, error: str) -> None:
        self.failing["write" if write else "read"] = error
        self.breaker.failure(error)
        self._show()

    def answered(self) -> None:
        """The readiness probe (a write and a read) succeeded: the calls
        that failed before would succeed now too."""
        cleared = [self.failing.pop(kind) for kind in ("read", "write") if kind in self.failing]
        if cleared:
            self._show()

    def observe(self, kind: str, error: str | None) -> None:
        """A backend's own background work (SQLite's checkpoints) failed
        (*error*) or succeeded (None): reported, not counted by the breaker."""
        if error is None:
            if self.failing.pop(kind, None) is not None:
                self._show()
        elif self.failing.get(kind) != error:
            self.failing[kind] = error
            self._show()

    def _show(self) -> None:
        METRICS.store_up.set(0 if self.problem() else 1)

    def problem(self) -> str | None:
        """Why the store is not to be trusted now, or None."""
        if self.broken is not None:
            return f"broken: {self.broken}"
        if (skipped := self.breaker.problem()) is not None:
            return skipped
        for kind, error in self.failing.items():
            return f"{kind}s failing: {error}"
        return None


class CacheStore(Protocol):
    """What the background writer needs of its :class:`~.base.Store`."""

    failfast: FailFast

    async def put_cache(self, ip: str, tests: Mapping[str, float]) -> None: ...


class WriteBehind:
    """Allowlist-cache writes queued for one background task."""

    def __init__(self, store: CacheStore) -> None:
        self.store = store
        self._pending: dict[str, dict[str, float]] = {}  # client IP -> {test: expiry}, in arrival order
        self._task: asyncio.Task[None] | None = None

    def put(self, ip: str, tests: dict[str, float]) -> bool:
        """Queue a cache write; False (counted) when the queue is full."""
        queued = self._pending.get(ip)
        if queued is not None:
            queued.update(tests)  # merged: later results win
        elif len(self._pending) >= self.store.failfast.limits.write_queue:
            METRICS.store_writes_dropped.inc()
            return False
        else:
            self._pending[ip] = dict(tests)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._drain())
        return True

    @property
    def queued(self) -> int:
        return len(self._pending)

    async def _drain(self) -> None:
        try:
            while self._pending:
                ip = next(iter(self._pending))
                tests = self._pending.pop(ip)
                start_deadline(self.store.failfast.limits.deadline)
                try:
                    await self.store.put_cache(ip, tests)
                except StoreError as exc:
                    METRICS.store_errors.labels(operation="cache_put").inc()
                    if self.store.failfast.breaker.up:  # while it is skipped, the breaker's line says it
                        log.warning("state store: allowlist cache update for %s failed: %s", ip, exc)
        finally:
            self._task = None

    async def wait(self) -> None:
        """Until what is queued now, and what is queued meanwhile, is written (or failed)."""
        while (task := self._task) is not None:
            await asyncio.shield(task)

    async def flush(self, timeout: float) -> None:
        """Write what is queued (at close), within *timeout*."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self.wait()
        task = self._task
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
