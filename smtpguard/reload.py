"""Hot reload on SIGHUP: re-read the configuration and the tables it names,
without dropping a session.

What a reload does, in order:

1. Read and validate the file (:func:`smtpguard.config.load`) and build a
   new :class:`~smtpguard.pipeline.Pipeline` from it, which (re)loads every
   lookup table and allowlist the checks use.  Any error -- TOML syntax, a
   bad value, a table that does not parse -- refuses the *whole* new
   configuration: the error is logged (``error: reload: ...``), counted
   (``smtpguard_config_reloads_total{result="failure"}``,
   ``smtpguard_config_last_reload_successful 0``) and the running
   configuration stays, untouched.
2. Otherwise the server switches to the new configuration and pipeline in one
   step (no ``await`` in between).  Sessions already in progress keep the
   pipeline and upstream connection they started with; new connections use
   the new ones.  ``[log]`` changes apply at once.
3. Settings that need sockets re-bound -- ``server.listen`` and
   ``metrics.listen`` -- are not applied by a reload: the running listeners
   stay, a warning says that a restart is needed, and the rest of the new
   configuration is applied.

Reloads are serialised: a SIGHUP arriving during a reload runs after it.

The pipeline factory is called as ``make_pipeline(new_cfg, previous)``.
Long-lived state must survive a reload -- the state store (the PASS OLD
allowlist cache, rate windows, greylist triplets), the DNS resolver and its
cache -- so a factory hands *previous*'s store and resolver to the new
pipeline instead of opening new ones (``Pipeline(cfg, store=previous.store)``),
unless the new configuration changed ``[state] url``.  Nothing is closed by
the reloader: sessions still using the previous pipeline finish with it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from . import config as config_mod
from . import logs, tls
from .config import Config
from .metrics import METRICS

log = logging.getLogger("smtpguard")

#: Keys a reload cannot change (the sockets are bound at start).
RESTART_ONLY = (("server", "listen"), ("metrics", "listen"), ("state", "url"), ("policy", "listen"))


class Reloadable(Protocol):
    """What the reloader switches: the listener's :class:`~smtpguard.listener.Server`."""

    cfg: Config
    pipeline: Any
    tls_context: ssl.SSLContext | None


#: ``make_pipeline(new_cfg, previous_pipeline)`` -> pipeline (or an awaitable of one).
PipelineFactory = Callable[[Config, Any], Any | Awaitable[Any]]


class Reloader:
    def __init__(self, path: str | Path | None, server: Reloadable, make_pipeline: PipelineFactory) -> None:
        self.path = Path(path) if path is not None else None
        self.server = server
        self.make_pipeline = make_pipeline
        self._lock = asyncio.Lock()
        self.generation = 1  # 1 = the configuration loaded at start

    def signal(self) -> None:
        """Signal-handler entry point: schedule a reload on the running loop."""
        task = asyncio.ensure_future(self.reload())
        task.add_done_callback(_log_crash)

    async def reload(self) -> bool:
        """Reload now; True when the new configuration is in effect."""
        async with self._lock:
            return await self._reload()

    async def _reload(self) -> bool:
        if self.path is None:
            log.info("reload: running on the embedded defaults (no -c FILE): nothing to re-read")
            return True
        old = self.server.cfg
        try:
            new = config_mod.load(self.path)
            new, pending = _keep_restart_only(old, new)
            pipeline = self.make_pipeline(new, self.server.pipeline)
            if inspect.isawaitable(pipeline):
                pipeline = await pipeline
            # The certificate is re-read even when the file names did not
            # change: SIGHUP is how a renewed certificate is picked up.
            tls_context = tls.build_context(new.tls)
        except Exception as exc:  # every failure refuses the new configuration
            METRICS.reloads.labels(result="failure").inc()
            METRICS.config_last_reload_success.set(0)
            log.error("reload: configuration %s refused, the running configuration stays: %s", self.path, exc)
            return False
        # One step, no await in between; sessions in progress keep theirs.
        self.server.cfg, self.server.pipeline, self.server.tls_context = new, pipeline, tls_context
        if new.log != old.log:
            logs.setup(new.log)
        for warning in pending:
            log.warning("reload: %s", warning)
        self.generation += 1
        METRICS.reloads.labels(result="success").inc()
        METRICS.config_last_reload_success.set(1)
        METRICS.config_last_reload_timestamp.set_to_current_time()
        changed = ", ".join(_changed_sections(old, new)) or "no changes"
        log.info("reload: configuration %s loaded (generation %d; changed: %s)", self.path, self.generation, changed)
        return True


def _keep_restart_only(old: Config, new: Config) -> tuple[Config, list[str]]:
    """*new* with the socket settings of *old*, and a warning for each that differs."""
    warnings = []
    for section, key in RESTART_ONLY:
        old_value = getattr(getattr(old, section), key)
        new_value = getattr(getattr(new, section), key)
        if old_value != new_value:
            warnings.append(f"{section}.{key} changed ({_show(old_value)} -> {_show(new_value)}): "
                            "takes effect at the next restart")
            new = dataclasses.replace(
                new, **{section: dataclasses.replace(getattr(new, section), **{key: old_value})})
    return new, warnings


def _show(value: object) -> str:
    if isinstance(value, tuple):
        return ", ".join(str(v) for v in value)
    return "off" if value is None else str(value)


def _changed_sections(old: Config, new: Config) -> list[str]:
    return [f.name for f in dataclasses.fields(Config) if getattr(old, f.name) != getattr(new, f.name)]


def _log_crash(task: asyncio.Task[bool]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("reload: internal error: %s", task.exception())
