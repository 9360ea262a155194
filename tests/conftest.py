"""Shared pytest fixtures: the real-component lab (Postfix, redis, dnsmasq).

Markers
-------
``@pytest.mark.postfix``, ``@pytest.mark.redis``, ``@pytest.mark.dns``, ``@pytest.mark.haproxy`` declare
that a test needs the real component.  A test that merely *uses* one of the
lab fixtures gets the matching marker automatically (see ``_FIXTURE_MARKERS``).

If a component is unavailable (binary missing, or for Postfix: not root), the
test is **skipped** with the reason — unless the ``CI`` environment variable is
set to a true-ish value (anything except "", 0, false, no, off), in which case
it **fails** instead, so CI can never go green by silently skipping the lab.

Fixtures
--------
``postfix``        session: one started :class:`~tests.lab.PrivatePostfix`.
``backend``        function: the session ``postfix``, (re)started if a test
                   stopped it, config restored to baseline, queue and Maildir
                   emptied, log offset marked (``log()``/``wait_for_log()`` see
                   only this test's lines).
``postfix_factory`` function: ``postfix_factory(**kw)`` / ``.sender(relay_port)``
                   create extra, *not yet started* instances (e.g. a sending
                   MTA); all are cleaned up after the test.
``redis_server``   session: private redis-server (``.url``, ``.socket``).
``redis_url``      function: FLUSHALL, then the ``redis://127.0.0.1:PORT/0`` url.
``dns_server``     function: factory ``dns_server(args, **kw) -> DnsServer``
                   (started); all stopped at teardown.
``dns_blackhole``  function: a :class:`~tests.lab.DnsBlackhole` that never answers.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

# `tests.lab` must be importable however pytest was launched (`pytest` does
# not put the repo root on sys.path, `python -m pytest` does).
_REPO_ROOT = str(Path(__file__).resolve().parents[1])
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from tests.lab import (  # noqa: E402
    DnsBlackhole,
    DnsServer,
    PostfixFactory,
    PrivatePostfix,
    RedisServer,
    ci_enabled,
    missing_requirements,
    reap_stale_labs,
)

LAB_MARKERS: dict[str, str] = {
    "postfix": "needs a private Postfix instance (postfix binaries, root)",
    "redis": "needs a private redis-server",
    "dns": "needs a private dnsmasq DNS server",
    "prometheus": "needs prometheus and promtool (Debian package prometheus)",
    "pflogsumm": "needs pflogsumm (Debian package pflogsumm)",
    "fail2ban": "needs fail2ban-regex (Debian package fail2ban)",
    "haproxy": "needs the haproxy binary (a load balancer sending PROXY headers)",
}

#: fixture name -> marker it implies
_FIXTURE_MARKERS: dict[str, str] = {
    "postfix": "postfix",
    "backend": "postfix",
    "postfix_factory": "postfix",
    "redis_server": "redis",
    "redis_url": "redis",
    "dns_server": "dns",
}


def pytest_configure(config: pytest.Config) -> None:
    for name, description in LAB_MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {description}")
    # Remove lab dirs/processes left behind by killed earlier runs (only those
    # whose owning process is dead; concurrent runs are left alone).
    with contextlib.suppress(Exception):
        reap_stale_labs()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        present = {m.name for m in item.iter_markers()}
        for fixture in getattr(item, "fixturenames", ()):
            marker = _FIXTURE_MARKERS.get(fixture)
            if marker and marker not in present:
                item.add_marker(getattr(pytest.mark, marker))
                present.add(marker)


def pytest_runtest_setup(item: pytest.Item) -> None:
    for name in LAB_MARKERS:
        if item.get_closest_marker(name) is None:
            continue
        reason = missing_requirements(name)
        if reason is None:
            continue
        if ci_enabled():
            pytest.fail(f"{reason} (CI is set, so this is a failure, not a skip)", pytrace=False)
        pytest.skip(reason)


# --------------------------------------------------------------------------
# Postfix
# --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postfix() -> Iterator[PrivatePostfix]:
    """One private Postfix for the whole session (see :class:`PrivatePostfix`).

    Prefer ``backend``, which resets per-test state.  It also has an smtpd
    pass service (``pass_socket``) for the [handoff] tests."""
    with PrivatePostfix(pass_service=True) as pf:
        yield pf


@pytest.fixture
def backend(postfix: PrivatePostfix) -> PrivatePostfix:
    """The session Postfix, clean for this test: running, baseline config,
    empty queue and Maildir, log marked at test start."""
    postfix.start()  # no-op if running; a previous test may have stopped it
    postfix.reset_config()
    postfix.flush_queue()
    postfix.flush_maildir()
    postfix.mark()
    return postfix


@pytest.fixture
def postfix_factory() -> Iterator[PostfixFactory]:
    """``postfix_factory(name=..., domain=..., extra=...)`` or
    ``postfix_factory.sender(relay_port)``; instances are *not* started."""
    factory = PostfixFactory()
    try:
        yield factory
    finally:
        factory.cleanup()


# --------------------------------------------------------------------------
# redis
# --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """Private redis-server for the session: ``.url`` (TCP), ``.socket`` (unix)."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """An empty redis (FLUSHALL at test start); returns ``redis://127.0.0.1:PORT/0``."""
    redis_server.start()  # restarts it if a test killed it
    redis_server.flushall()
    return redis_server.url


# --------------------------------------------------------------------------
# DNS
# --------------------------------------------------------------------------

DnsServerFactory = Callable[..., DnsServer]


@pytest.fixture
def dns_server() -> Iterator[DnsServerFactory]:
    """Factory: ``dns_server(["--host-record=a.test,192.0.2.1"], timeout_zones=["timeout.test"])``
    returns a started :class:`DnsServer`; every server is stopped at teardown."""
    servers: list[DnsServer] = []

    def make(args: Sequence[str] = (), **kwargs: Any) -> DnsServer:
        server = DnsServer(args, **kwargs)
        servers.append(server)
        server.start()
        return server

    try:
        yield make
    finally:
        for server in servers:
            with contextlib.suppress(Exception):
                server.cleanup()


@pytest.fixture
def dns_blackhole() -> Iterator[DnsBlackhole]:
    """A loopback UDP+TCP port that accepts DNS queries and never answers.

    Point a resolver at it directly, or forward a zone to it from dnsmasq with
    ``blackhole.server_arg("zone.test")``."""
    hole = DnsBlackhole()
    try:
        yield hole
    finally:
        hole.close()
