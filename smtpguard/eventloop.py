"""Which event loop runs the daemon (``[server] event_loop``).

``uvloop`` is a declared dependency (pinned in pyproject.toml), so
``auto`` -- the default -- runs on it; a system without it (a distribution
package built without uvloop, an unsupported platform) falls back to the
standard library's loop.  ``asyncio`` forces the standard loop, ``uvloop``
insists on uvloop and refuses to start without it.  Everything smtpguard
does goes through public asyncio API (protocols, transports,
``loop.start_tls``, ``call_at``), which both loops implement.

The choice is made once, before the loop starts, so a SIGHUP cannot change
it; :func:`describe` names the running loop for the start-up log line.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Callable, Coroutine
from types import ModuleType
from typing import Any, TypeVar

from .options import ConfigError

T = TypeVar("T")


def _uvloop() -> ModuleType | None:
    try:
        return importlib.import_module("uvloop")
    except ImportError:
        return None


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The factory for ``asyncio.Runner`` (None: the standard loop)."""
    if choice == "asyncio":
        return None
    uvloop = _uvloop()
    if uvloop is None:
        if choice == "uvloop":
            raise ConfigError("server.event_loop", '"uvloop" but uvloop is not installed (pip install uvloop)')
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run(main: Callable[[], Coroutine[Any, Any, T]], choice: str) -> T:
    """``asyncio.run(main())`` on the loop *choice* names (ConfigError, and
    no coroutine made, when that loop is not there)."""
    factory = loop_factory(choice)
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main())


def describe(loop: asyncio.AbstractEventLoop) -> str:
    """``uvloop 0.23.0`` or ``asyncio``: which loop runs, for the log."""
    if type(loop).__module__.startswith("uvloop"):
        uvloop = _uvloop()
        return f"uvloop {getattr(uvloop, '__version__', '')}".rstrip()
    return "asyncio"
