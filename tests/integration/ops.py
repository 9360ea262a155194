"""Helpers for the operations tests: HTTP GET, metric samples, a private Prometheus."""

from __future__ import annotations

import http.client
import json
import subprocess
import urllib.parse
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.lab import free_port, wait_until, which


def http_get(port: int, path: str, timeout: float = 10) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(exposition: str) -> Samples:
    """``{(sample_name, frozenset(labels)): value}`` for every sample."""
    out: Samples = {}
    for family in text_string_to_metric_families(exposition):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def scrape(port: int) -> Samples:
    status, body = http_get(port, "/metrics")
    assert status == 200, body
    return samples(body)


def value(s: Samples, name: str, **labels: str) -> float:
    return s.get((name, frozenset(labels.items())), 0.0)


class PrivatePrometheus:
    """A real ``prometheus`` scraping the given targets every second."""

    def __init__(self, workdir: Path, targets: list[str]) -> None:
        self.dir = workdir
        self.port = free_port()
        self.config = workdir / "prometheus.yml"
        self.config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
            "scrape_configs:\n  - job_name: smtpguard\n    static_configs:\n"
            f"      - targets: {json.dumps(targets)}\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> PrivatePrometheus:
        binary = which("prometheus")
        assert binary is not None
        log = (self.dir / "prometheus.log").open("ab")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={self.config}", f"--storage.tsdb.path={self.dir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        log.close()

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited: {self.log()[-3000:]}")
            try:
                return http_get(self.port, "/-/ready", timeout=2)[0] == 200
            except OSError:
                return False

        wait_until(ready, timeout=60, what="prometheus to be ready")
        return self

    def log(self) -> str:
        p = self.dir / "prometheus.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def query(self, expr: str) -> list[dict[str, Any]]:
        status, body = http_get(self.port, "/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        assert status == 200, body
        data = json.loads(body)
        assert data["status"] == "success", data
        result: list[dict[str, Any]] = data["data"]["result"]
        return result

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
