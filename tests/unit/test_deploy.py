"""deploy/: the provisioned Grafana dashboard is generated and covers every
metric; the compose file keeps Postfix unpublished and Grafana optional."""

from __future__ import annotations

import json
import re
import runpy
import subprocess
from pathlib import Path

import pytest

from smtpguard.metrics import METRICS
from tests.lab import which

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def _dashboard() -> dict[str, object]:
    module = runpy.run_path(str(DEPLOY / "grafana" / "make_dashboard.py"))
    result: dict[str, object] = module["dashboard"]()
    return result


def test_committed_dashboard_is_generated() -> None:
    committed = json.loads((DEPLOY / "grafana" / "dashboards" / "smtpguard.json").read_text())
    assert committed == _dashboard(), (
        "regenerate: python deploy/grafana/make_dashboard.py > deploy/grafana/dashboards/smtpguard.json")


def test_dashboard_shows_every_metric() -> None:
    exprs = " ".join(t["expr"] for p in _dashboard()["panels"] for t in p.get("targets", []))  # type: ignore[attr-defined]
    missing = [family.name for family in METRICS.registry.collect() if family.name not in exprs]
    assert not missing, f"metrics without a dashboard panel: {missing}"


def _services(compose: str) -> dict[str, str]:
    body = compose.split("\nservices:\n", 1)[1].split("\nvolumes:\n", 1)[0]
    parts = re.split(r"^  (\w[\w-]*):\n", body, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_compose_layout() -> None:
    services = _services((DEPLOY / "docker-compose.yml").read_text())
    assert set(services) == {"smtpguard", "postfix", "redis", "prometheus", "grafana"}
    assert not re.search(r"^    ports:", services["postfix"] + services["redis"], re.M)
    assert '${SMTP_PORT:-25}:25"' in services["smtpguard"]
    assert '"127.0.0.1:${PROMETHEUS_PORT:-9090}:9090"' in services["prometheus"]
    assert 'profiles: ["grafana"]' in services["grafana"]
    for name, text in services.items():
        assert "restart: unless-stopped" in text, name
        if name != "grafana":
            assert "healthcheck:" in text, name
    assert "smtpguard:9125" in (DEPLOY / "prometheus" / "prometheus.yml").read_text()
    entrypoint = (DEPLOY / "postfix" / "entrypoint.sh").read_text()
    for setting in ('"smtpd_authorized_xclient_hosts = $addr"', '"smtpd_forbid_bare_newline = reject"',
                    '"smtpd_forbid_bare_newline_exclusions ="'):
        assert setting in entrypoint


@pytest.mark.prometheus
def test_prometheus_config_and_rules_are_valid(tmp_path: Path) -> None:
    promtool = which("promtool")
    assert promtool is not None
    rules = DEPLOY / "prometheus" / "alerts.yml"
    r = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    # the config names the rules by their in-container path
    config = tmp_path / "prometheus.yml"
    config.write_text((DEPLOY / "prometheus" / "prometheus.yml").read_text()
                      .replace("/etc/prometheus/alerts.yml", str(rules)))
    r = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    text = rules.read_text()
    assert "smtpguard_upstream_errors_total" in text and "smtpguard_config_last_reload_successful" in text
