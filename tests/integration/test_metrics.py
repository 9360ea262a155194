"""Operations endpoint: exact metric counts after scripted sessions, promtool,
a real Prometheus scraping a test instance, /healthz and /readyz."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.integration.guard import Guard, RawClient
from tests.integration.ops import PrivatePrometheus, Samples, http_get, scrape, value
from tests.integration.test_greylist_e2e import DELAY, GREYLIST, GREYLISTED, attempt, wait_past
from tests.lab import PrivatePostfix, free_port, wait_until, which

pytestmark = pytest.mark.postfix


def send_message(c: RawClient, body: bytes, rcpt: str = "bob@example.test") -> str:
    assert c.cmd("MAIL FROM:<alice@sender.test>").startswith("250")
    assert c.cmd(f"RCPT TO:<{rcpt}>").startswith("250")
    assert c.cmd("DATA").startswith("354")
    c.send(body + b".\r\n")
    return c.reply()


def session(port: int, source: str) -> RawClient:
    c = RawClient(port, source=source)
    banner = c.reply()  # "220 ..." or, with the pregreet test, "220-...\r\n220 ..."
    assert banner.splitlines()[-1].startswith("220 "), banner
    assert c.cmd("EHLO client.example").startswith("250-")
    return c


def wait_metric(port: int, name: str, expected: float, **labels: str) -> Samples:
    def ok() -> Samples | None:
        s = scrape(port)
        return s if value(s, name, **labels) == expected else None

    try:
        return wait_until(ok, timeout=10, what=f"{name}{labels} == {expected}")
    except Exception:
        raise AssertionError(f"{name}{labels} = {value(scrape(port), name, **labels)}, expected {expected}") from None


BODY1 = b"Subject: m1\r\n\r\nhello\r\n"
BODY2 = b"Subject: m2\r\n\r\nsecond message\r\n..dot stuffed\r\n"
BODY3 = b"Subject: m3\r\n\r\nthird\r\n"


def scripted_sessions(backend: PrivatePostfix, g: Guard) -> None:
    """5 sessions + 1 refused connection; see test_metrics_exact_counts."""
    # 1: one message relayed
    c = session(g.port, "127.0.0.11")
    assert send_message(c, BODY1).startswith("250 2.0.0 Ok: queued as ")
    c.cmd("QUIT")
    c.close()
    # 2: two messages in one session
    c = session(g.port, "127.0.0.12")
    assert send_message(c, BODY2).startswith("250 ")
    assert send_message(c, BODY3).startswith("250 ")
    c.cmd("QUIT")
    c.close()
    # 3: Postfix refuses the recipient (relayed verbatim; not smtpguard's reject)
    c = session(g.port, "127.0.0.13")
    c.cmd("MAIL FROM:<a@sender.test>")
    assert c.cmd("RCPT TO:<x@elsewhere.invalid>").startswith("454 4.7.1")
    c.cmd("QUIT")
    c.close()
    # 4: bare LF in the body: smtpguard's own END-OF-MESSAGE reject
    c = session(g.port, "127.0.0.14")
    reply = send_message(c, b"Subject: bare\r\n\r\nbad\nline\r\n")
    assert reply.startswith("550 5.5.2"), reply
    c.cmd("QUIT")
    c.close()
    # 5: held open while a 6th connection is refused (max_connections = 1)
    c = session(g.port, "127.0.0.15")
    wait_metric(g.metrics_port, "smtpguard_sessions_active", 1)
    busy = RawClient(g.port, source="127.0.0.16")
    assert busy.reply().startswith("421 4.3.2 All server ports are busy")
    assert busy.closed()
    busy.close()
    c.cmd("QUIT")
    c.close()
    backend.wait_for_messages(3)


def test_metrics_exact_counts(backend: PrivatePostfix, make_guard: Callable[..., Guard]) -> None:
    g = make_guard(backend.port, "[server]\nmax_connections = 1\n")
    before = scrape(g.metrics_port)
    assert value(before, "smtpguard_connections_total") == 0
    # Known label sets are exported at 0 from the start.
    for mode in ("frontend", "policy"):
        for outcome in ("new", "early_retry", "passed", "known", "allowlisted"):
            assert ("smtpguard_greylist_total", frozenset({("mode", mode), ("outcome", outcome)})) in before
    assert value(before, "smtpguard_rejects_total", stage="END-OF-MESSAGE", code="550") == 0
    assert value(before, "smtpguard_store_errors_total", operation="cache_get") == 0
    assert value(before, "smtpguard_check_results_total", mode="frontend", check="pregreet", outcome="fail") == 0
    scripted_sessions(backend, g)
    s = wait_metric(g.metrics_port, "smtpguard_sessions_active", 0)
    assert value(s, "smtpguard_connections_total") == 6
    assert value(s, "smtpguard_connections_rejected_total", reason="busy") == 1
    assert value(s, "smtpguard_rejects_total", stage="CONNECT", code="421") == 1
    assert value(s, "smtpguard_rejects_total", stage="END-OF-MESSAGE", code="550") == 1
    assert sum(v for (n, _), v in s.items() if n == "smtpguard_rejects_total") == 2
    assert value(s, "smtpguard_relayed_messages_total") == 3
    assert value(s, "smtpguard_relayed_bytes_total") == len(BODY1) + len(BODY2) + len(BODY3)
    # sessions 1-4 opened an upstream connection; session 5 sent no RCPT
    assert value(s, "smtpguard_upstream_connect_seconds_count") == 4
    assert value(s, "smtpguard_upstream_data_seconds_count") == 3
    assert value(s, "smtpguard_upstream_connect_seconds_sum") > 0
    upstream_errors = {dict(labels)["stage"]: v for (n, labels), v in s.items()
                       if n == "smtpguard_upstream_errors_total"}
    assert upstream_errors == {"RCPT": 0, "DATA": 0, "END-OF-MESSAGE": 0, "RSET": 0}  # at 0 from the start
    # No label anywhere carries a client address.
    assert not any("127.0.0." in v for (_, labels) in s for _, v in labels)


def test_upstream_down_counts_errors_and_is_not_ready(make_guard: Callable[..., Guard]) -> None:
    g = make_guard(free_port())  # nothing listens there
    status, body = http_get(g.metrics_port, "/readyz")
    assert status == 503
    assert "upstream failed:" in body and "Connection refused" in body, body
    assert "store ok" in body
    assert http_get(g.metrics_port, "/healthz") == (200, "ok\n")
    c = session(g.port, "127.0.0.21")
    c.cmd("MAIL FROM:<a@sender.test>")
    assert c.cmd("RCPT TO:<bob@example.test>").startswith("451 4.4.1")
    c.cmd("QUIT")
    s = scrape(g.metrics_port)
    assert value(s, "smtpguard_upstream_errors_total", stage="RCPT") == 1
    assert value(s, "smtpguard_relayed_messages_total") == 0


def test_readyz_follows_postfix(backend: PrivatePostfix, guard: Guard) -> None:
    assert http_get(guard.metrics_port, "/healthz") == (200, "ok\n")
    status, body = http_get(guard.metrics_port, "/readyz")
    assert (status, body) == (200, "upstream ok\nstore ok\n")
    backend.stop()

    def not_ready() -> bool:
        return http_get(guard.metrics_port, "/readyz")[0] == 503

    wait_until(not_ready, timeout=10, what="/readyz to turn 503")
    status, body = http_get(guard.metrics_port, "/readyz")
    assert "upstream failed:" in body, body
    assert http_get(guard.metrics_port, "/healthz")[0] == 200  # alive, just not ready
    guard.wait_for_log(r"warning: readiness: NOT ready -- upstream failed")
    backend.start()
    wait_until(lambda: http_get(guard.metrics_port, "/readyz")[0] == 200, timeout=10, what="/readyz 200 again")
    guard.wait_for_log(r"readiness: ready -- upstream ok; store ok")


def test_http_endpoint_edges(guard: Guard) -> None:
    assert http_get(guard.metrics_port, "/nope")[0] == 404
    status, body = http_get(guard.metrics_port, "/metrics?x=1")
    assert status == 200 and "smtpguard_sessions_active" in body


@pytest.mark.prometheus
def test_promtool_check_metrics(backend: PrivatePostfix, make_guard: Callable[..., Guard]) -> None:
    g = make_guard(backend.port, "[server]\nmax_connections = 1\n")
    scripted_sessions(backend, g)
    status, exposition = http_get(g.metrics_port, "/metrics")
    assert status == 200
    promtool = which("promtool")
    assert promtool is not None
    r = subprocess.run([promtool, "check", "metrics"], input=exposition, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), (r.stdout, r.stderr)


@pytest.mark.prometheus
def test_prometheus_scrapes_smtpguard(backend: PrivatePostfix, guard: Guard, tmp_path: Path) -> None:
    prom = PrivatePrometheus(tmp_path, [f"127.0.0.1:{guard.metrics_port}"]).start()
    try:
        c = session(guard.port, "127.0.0.31")
        assert send_message(c, BODY1).startswith("250 ")
        c.cmd("QUIT")
        c.close()

        def scraped(expr: str, expected: str) -> bool:
            result = prom.query(expr)
            return bool(result) and result[0]["value"][1] == expected

        wait_until(lambda: scraped('up{job="smtpguard"}', "1"), timeout=60, what="prometheus to scrape smtpguard",
                   interval=0.5, on_timeout=prom.log)
        wait_until(lambda: scraped("smtpguard_relayed_messages_total", "1"), timeout=30, interval=0.5,
                   what="smtpguard_relayed_messages_total == 1 in prometheus")
        wait_until(lambda: scraped("smtpguard_connections_total", "1"), timeout=30, interval=0.5,
                   what="smtpguard_connections_total == 1 in prometheus")
        assert scraped(f'smtpguard_relayed_bytes_total{{instance="127.0.0.1:{guard.metrics_port}"}}',
                       str(len(BODY1)))
    finally:
        prom.stop()


def test_readyz_not_ready_while_shutting_down(backend: PrivatePostfix, guard: Guard) -> None:
    """SIGTERM with a transaction in progress: the process drains the
    session and meanwhile tells load balancers it is not ready."""
    c = session(guard.port, "127.0.0.61")
    assert c.cmd("MAIL FROM:<a@sender.test>").startswith("250")
    assert c.cmd("RCPT TO:<bob@example.test>").startswith("250")
    assert http_get(guard.metrics_port, "/readyz")[0] == 200
    assert guard.proc is not None
    guard.proc.send_signal(signal.SIGTERM)
    guard.wait_for_log(r"shutting down: no new connections, 1 session\(s\) to finish")

    def draining() -> bool:
        status, body = http_get(guard.metrics_port, "/readyz")
        return status == 503 and "listener failed: not accepting connections" in body

    wait_until(draining, timeout=10, what="/readyz 503 while draining")
    assert http_get(guard.metrics_port, "/healthz")[0] == 200
    assert c.cmd("DATA").startswith("354")
    c.send(b"Subject: during shutdown\r\n\r\nbody\r\n.\r\n")
    assert c.reply().startswith("250 2.0.0 Ok: queued as ")
    assert guard.proc.wait(30) == 0
    backend.wait_for_messages(1)


def documented_query(question: str) -> str:
    """The PromQL of a row of docs/metrics.md's "What to look at" table."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "metrics.md").read_text()
    m = re.search(rf"^\| {re.escape(question)} \| `([^`]+)` \|$", doc, re.M)
    assert m, f"no row {question!r} in docs/metrics.md"
    return m[1]


@pytest.mark.prometheus
def test_greylist_pass_rate_query_equals_smtpguard_report(backend: PrivatePostfix,
                                                          make_guard: Callable[..., Guard], tmp_path: Path) -> None:
    """The documented pass-rate query, on a real Prometheus scrape, gives
    the figure `smtpguard report` prints for the same traffic (issue 14: a
    known triplet once counted as passed, 230% against the report's 50%)."""
    g = make_guard(backend.port, GREYLIST)
    prom = PrivatePrometheus(tmp_path, [f"127.0.0.1:{g.metrics_port}"]).start()
    try:
        def scraped(expr: str, expected: float) -> bool:
            result = prom.query(expr)
            return bool(result) and float(result[0]["value"][1]) == expected

        # Prometheus must hold the counters at 0 before the traffic, or increase() misses it.
        wait_until(lambda: scraped('sum(smtpguard_greylist_total{outcome="new"})', 0), timeout=60, interval=0.5,
                   what="prometheus to scrape smtpguard", on_timeout=prom.log)
        for n in (1, 2, 3, 4):  # four triplets greylisted
            assert attempt(g.port, f"127.0.{11 + n}.1", sender=f"a{n}@sender.test") == GREYLISTED
        start = time.time()
        assert attempt(g.port, "127.0.15.1", sender="a4@sender.test") == GREYLISTED  # an early retry
        wait_past(start, DELAY)
        assert attempt(g.port, "127.0.12.1", sender="a1@sender.test").startswith("250")  # passed
        assert attempt(g.port, "127.0.13.1", sender="a2@sender.test").startswith("250")  # passed
        assert attempt(g.port, "127.0.12.1", sender="a1@sender.test").startswith("250")  # known
        backend.wait_for_messages(3)
        wait_until(lambda: scraped('sum(smtpguard_greylist_total{outcome="known"})', 1), timeout=30, interval=0.5,
                   what="the last decision in prometheus")
        s = scrape(g.metrics_port)
        assert {o: value(s, "smtpguard_greylist_total", mode="frontend", outcome=o) for o in
                ("new", "early_retry", "passed", "known", "allowlisted")} == {
            "new": 4, "early_retry": 1, "passed": 2, "known": 1, "allowlisted": 0}
        [result] = prom.query(documented_query("greylist pass rate"))
        from_prometheus = float(result["value"][1])
        wait_until(lambda: g.log().count("DISCONNECT [127.0.12.1]") == 3, timeout=10, what="the last DISCONNECT")
        r = subprocess.run([sys.executable, "-m", "smtpguard", "report", "--json", str(g.log_path)],
                           capture_output=True, text=True, timeout=60, check=True)
        report = json.loads(r.stdout)["greylist"]
        assert (report["triplets"], report["passed"]) == (4, 2)
        assert from_prometheus == pytest.approx(report["pass_rate"]) == 0.5
    finally:
        prom.stop()


def documented_queries() -> list[str]:
    """Every PromQL expression of docs/metrics.md's "What to look at" table."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "metrics.md").read_text()
    table = doc.split("## What to look at", 1)[1].split("\n\n", 2)[1]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "PromQL" not in line]
    exprs = [e.replace("\\|", "|") for row in rows for e in re.findall(r"`([^`]+)`", row.rsplit(" | ", 1)[1])]
    assert len(rows) >= 15 and len(exprs) > len(rows), rows
    return exprs


def dashboard_queries() -> list[str]:
    """Every target of the provisioned Grafana dashboard, with Grafana's
    ``$__rate_interval`` as Grafana would set it for a 1s scrape."""
    path = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards" / "smtpguard.json"
    panels = json.loads(path.read_text())["panels"]
    exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
    assert len(exprs) > 30
    return [e.replace("$__rate_interval", "30s") for e in exprs]


@pytest.mark.prometheus
@pytest.mark.dns
def test_every_documented_and_dashboard_query_answers(backend: PrivatePostfix, make_guard: Callable[..., Guard],
                                                      dns_server: Callable[..., Any], tmp_path: Path) -> None:
    """Issue 17: each query of docs/metrics.md and of the Grafana dashboard,
    run by a real Prometheus on real traffic (relayed mail, a DNSBL reject,
    greylisting, a policy request), returns a series -- never "no data"."""
    from tests.integration.test_dns_e2e import DNSBL, LISTED, RECORDS
    from tests.integration.test_policy_e2e import policy_request

    dns = dns_server(RECORDS, timeout_zones=["slow.test"])
    policy_port = free_port()
    g = make_guard(backend.port, f'[dns]\nnameservers = ["{dns.address}:{dns.port}"]\ntimeout = "0.5s"\n'
                                 f'lifetime = "1s"\n' + DNSBL + GREYLIST
                                 + f'[policy]\nlisten = "127.0.0.1:{policy_port}"\n')
    prom = PrivatePrometheus(tmp_path, [f"127.0.0.1:{g.metrics_port}"]).start()
    try:
        def answered(expr: str) -> list[dict[str, Any]]:
            return prom.query(expr)

        wait_until(lambda: answered('smtpguard_connections_total{job="smtpguard"}'), timeout=60, interval=0.5,
                   what="prometheus to scrape smtpguard", on_timeout=prom.log)
        # A listed client: DNSBL hit, check failure, verdict, smtpguard's own 550 at RCPT.
        c = RawClient(g.port, source=LISTED)
        c.reply()
        assert c.transaction()[2].startswith("550 5.7.1 Service unavailable")
        c.cmd("QUIT")
        c.close()
        # Greylisting: new, then passed after the delay and relayed through Postfix.
        assert attempt(g.port, "127.0.0.7") == GREYLISTED
        wait_past(time.time(), DELAY)  # from the answer: the triplet was first seen during the attempt
        assert attempt(g.port, "127.0.0.7").startswith("250"), g.log()[-3000:]
        backend.wait_for_messages(1)
        # The policy service answers a request as Postfix's smtpd would send it.
        assert policy_request(policy_port, "127.0.9.1", "a@sender.test", "bob@example.test", "i1").startswith(
            "DEFER_IF_PERMIT")
        wait_until(lambda: answered("sum(smtpguard_relayed_messages_total) == 1"), timeout=30, interval=0.5,
                   what="the relayed message in prometheus")
        time.sleep(2)  # two more scrapes: every rate() has its samples
        empty = [e for e in documented_queries() + dashboard_queries() if not answered(e)]
        assert not empty, empty
        # And the traffic shows where it should.
        for expr in ("sum(smtpguard_dnsbl_hits_total)", "sum(smtpguard_relayed_messages_total)",
                     'sum(smtpguard_rejects_total{stage="RCPT",code="550"})',
                     'sum(smtpguard_greylist_total{outcome="passed"})', "sum(smtpguard_policy_requests_total)"):
            [result] = answered(expr)
            assert float(result["value"][1]) >= 1, expr
    finally:
        prom.stop()
