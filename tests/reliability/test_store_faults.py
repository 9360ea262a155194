"""The state store under faults: a Redis frozen with SIGSTOP costs a
session at most the store deadline, and ``on_store_error`` decides."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from tests.integration.guard import Guard, RawClient
from tests.integration.ops import http_get, scrape, value
from tests.lab import PrivatePostfix, RedisServer, frozen, wait_until
from tests.reliability.figures import record

MakeGuard = Callable[..., Guard]
GREYLIST = '[greylist]\nenabled = true\ndelay = "1s"\nuse_default_client_allowlist = false\n'


def ready(g: Guard) -> tuple[int, str]:
    return http_get(g.metrics_port, "/readyz")


def timed_session(port: int, source: str, subject: str) -> tuple[float, list[str]]:
    """Connect, one transaction, QUIT; the wall time and the replies."""
    start = time.monotonic()
    c = RawClient(port, source=source, timeout=60)
    c.reply()
    replies = c.transaction(subject=subject)
    c.cmd("QUIT")
    c.close()
    return time.monotonic() - start, replies


def test_frozen_redis_costs_a_session_at_most_the_deadline(backend: PrivatePostfix, redis_server: RedisServer,
                                                           redis_url: str, make_guard: MakeGuard) -> None:
    g = make_guard(backend.port, GREYLIST + '[pregreet]\ngreet_wait = "0s"\n', state_url=redis_url)
    ok, replies = timed_session(g.port, "127.0.0.81", "warm")  # a working store: greylisted
    assert replies[2].startswith("450 4.2.0"), replies
    with frozen(redis_server.proc):  # kernel accepts, Redis never answers
        durations = []
        for i in range(4):
            took, replies = timed_session(g.port, f"127.0.1.{i + 1}", f"frozen {i}")
            durations.append(took)
            assert replies[-1].startswith("250 2.0.0 Ok: queued as"), replies  # on_store_error = accept
        status, body = ready(g)  # mail flows: the node stays in the load balancer
        assert status == 200 and "store failed: redis:" in body and "on_store_error = accept" in body, body
        assert value(scrape(g.metrics_port), "smtpguard_store_up") == 0
    # One deadline (1 s) for all of a session's store calls; after a few
    # failures the breaker skips the store: before, ~20 s each.
    record("store: Redis frozen (SIGSTOP), on_store_error = accept", sessions=len(durations),
           longest_s=f"{max(durations):.2f}", after_breaker_s=f"{durations[-1]:.2f}", before_fix_s="~20")
    assert max(durations) < 3.0, durations
    assert sum(durations) < 5.0, durations
    backend.wait_for_messages(4)


def test_frozen_redis_with_tempfail_defers_and_is_not_ready(backend: PrivatePostfix, redis_server: RedisServer,
                                                            redis_url: str, make_guard: MakeGuard) -> None:
    config = GREYLIST.replace("enabled = true", 'enabled = true\non_store_error = "tempfail"')
    g = make_guard(backend.port, config + '[pregreet]\ngreet_wait = "0s"\n', state_url=redis_url)
    assert ready(g)[0] == 200
    with frozen(redis_server.proc):  # kernel accepts, Redis never answers
        for i in range(3):
            took, replies = timed_session(g.port, f"127.0.2.{i + 1}", "deferred")
            assert replies[2] == "451 4.3.0 <bob@example.test>: Temporary lookup failure\r\n", replies
            assert took < 3.0
        status, body = ready(g)
        assert status == 503 and "on_store_error = tempfail" in body, body
    wait_until(lambda: ready(g)[0] == 200, 30, "/readyz 200 once Redis answers (after the breaker's back-off)")


def test_full_disk_under_sqlite_is_reported_and_recovers(tmp_path: Path, backend: PrivatePostfix,
                                                         make_guard: MakeGuard) -> None:
    """The state directory on a tiny tmpfs in smtpguard's own mount
    namespace; filled up, the greylist writes fail: /readyz says so (503
    with tempfail) and clients get 451; room again: ready again."""
    state = tmp_path / "state"
    state.mkdir()
    wrap = ("unshare", "-m", "--propagation", "private", "sh", "-c",
            f'mount -t tmpfs -o size=512k tmpfs {state} && exec "$@"', "sh")
    g = make_guard(backend.port, GREYLIST.replace("enabled = true", 'enabled = true\non_store_error = "tempfail"'),
                   state_url=f"sqlite:///{state}/state.db", wrap=wrap)
    assert g.proc is not None
    inside = ("nsenter", "-t", str(g.proc.pid), "-m", "--")
    assert ready(g) == (200, "upstream ok\nstore ok\n")
    subprocess.run([*inside, "sh", "-c", f"cat /dev/zero > {state}/filler"], capture_output=True)
    answers = set()
    for i in range(60):  # new triplets until the disk refuses them
        c = RawClient(g.port, source="127.0.0.82")
        c.reply()
        answers.add(c.transaction(sender=f"s{i}@sender.test")[2][:3])
        c.close()
        if "451" in answers:
            break
    assert "451" in answers, answers  # on_store_error = tempfail
    status, body = wait_until(lambda: (r := ready(g))[0] == 503 and r, 10, "/readyz 503")
    assert "store failed:" in body and "full" in body, body
    subprocess.run([*inside, "rm", f"{state}/filler"], check=True)
    wait_until(lambda: ready(g)[0] == 200, 10, "/readyz 200 again")
    g.wait_for_log(r"readiness: ready -- upstream ok; store ok")
