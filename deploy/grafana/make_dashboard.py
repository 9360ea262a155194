"""Generate deploy/grafana/dashboards/smtpguard.json (the provisioned dashboard).

    python deploy/grafana/make_dashboard.py > deploy/grafana/dashboards/smtpguard.json

tests/unit/test_deploy.py checks that the committed file is what this script
prints and that every smtpguard metric appears in some panel.
"""

from __future__ import annotations

import json
from typing import Any

DS = {"type": "prometheus", "uid": "${datasource}"}

# (title, unit, [(expr, legend)], width)
ROWS: list[tuple[str, list[tuple[str, str, list[tuple[str, str]], int]]]] = [
    ("Traffic", [
        ("Connections / s", "ops", [
            ("sum(rate(smtpguard_connections_total[$__rate_interval]))", "accepted"),
            ("sum by (reason) (rate(smtpguard_connections_rejected_total[$__rate_interval]))", "refused: {{reason}}"),
        ], 8),
        ("Sessions active", "short", [("sum(smtpguard_sessions_active)", "sessions")], 8),
        ("Messages relayed / s", "ops", [
            ("sum(rate(smtpguard_relayed_messages_total[$__rate_interval]))", "messages"),
        ], 8),
        ("Bytes relayed / s", "Bps", [("sum(rate(smtpguard_relayed_bytes_total[$__rate_interval]))", "bytes")], 8),
        ("Rejects / s by stage and code", "ops", [
            ("sum by (stage, code) (rate(smtpguard_rejects_total[$__rate_interval]))", "{{stage}} {{code}}"),
        ], 16),
    ]),
    ("Screening", [
        ("Check failures / s by check", "ops", [
            ("sum by (check) (rate(smtpguard_check_results_total{outcome=\"fail\"}[$__rate_interval]))",
             "{{check}}"),
        ], 12),
        ("Verdicts / s by check and action", "ops", [
            ("sum by (check, action) (rate(smtpguard_screening_verdicts_total{action!=\"continue\"}"
             "[$__rate_interval]))", "{{check}} {{action}}"),
        ], 12),
        ("Allowlist cache (PASS OLD / PASS NEW) and hand-offs to smtpd / s", "ops", [
            ("sum by (result) (rate(smtpguard_allowlist_cache_total[$__rate_interval]))", "{{result}}"),
            ("sum by (result) (rate(smtpguard_handoffs_total[$__rate_interval]))", "handoff {{result}}"),
        ], 12),
        ("Greylist outcomes / s", "ops", [
            ("sum by (mode, outcome) (rate(smtpguard_greylist_total[$__rate_interval]))", "{{mode}} {{outcome}}"),
        ], 12),
        ("Greylist pass rate (passed / new)", "percentunit", [
            ("sum(increase(smtpguard_greylist_total{outcome=\"passed\"}[1h])) / "
             "clamp_min(sum(increase(smtpguard_greylist_total{outcome=\"new\"}[1h])), 1)", "pass rate (1h)"),
        ], 12),
        ("Greylist SPF results / s ([greylist] spf_key)", "ops", [
            ("sum by (result) (rate(smtpguard_greylist_spf_total[$__rate_interval]))", "{{result}}"),
        ], 12),
    ]),
    ("Policy service (check_policy_service)", [
        ("Policy answers / s by action", "ops", [
            ("sum by (action) (rate(smtpguard_policy_requests_total[$__rate_interval]))", "{{action}}"),
            ("sum by (problem) (rate(smtpguard_policy_errors_total[$__rate_interval]))", "error {{problem}}"),
        ], 8),
        ("Policy answer latency p50 / p99", "s", [
            ("histogram_quantile(0.5, sum by (le) (rate(smtpguard_policy_request_seconds_bucket"
             "[$__rate_interval])))", "p50"),
            ("histogram_quantile(0.99, sum by (le) (rate(smtpguard_policy_request_seconds_bucket"
             "[$__rate_interval])))", "p99"),
        ], 8),
        ("Postfix connections to the policy service", "short", [
            ("sum(smtpguard_policy_connections)", "open"),
        ], 8),
    ]),
    ("DNS", [
        ("DNSBL hits / s per list", "ops", [
            ("sum by (list) (rate(smtpguard_dnsbl_hits_total[$__rate_interval]))", "{{list}}"),
        ], 8),
        ("DNS query latency p50 / p95", "s", [
            ("histogram_quantile(0.5, sum by (le) (rate(smtpguard_dns_query_seconds_bucket[$__rate_interval])))",
             "p50"),
            ("histogram_quantile(0.95, sum by (le) (rate(smtpguard_dns_query_seconds_bucket[$__rate_interval])))",
             "p95"),
        ], 8),
        ("DNS errors / s", "ops", [
            ("sum by (type, error) (rate(smtpguard_dns_errors_total[$__rate_interval]))", "{{type}} {{error}}"),
        ], 8),
    ]),
    ("Upstream Postfix and state", [
        ("Upstream latency p50 / p95", "s", [
            ("histogram_quantile(0.5, sum by (le) (rate(smtpguard_upstream_connect_seconds_bucket"
             "[$__rate_interval])))", "connect+XCLIENT+EHLO p50"),
            ("histogram_quantile(0.95, sum by (le) (rate(smtpguard_upstream_connect_seconds_bucket"
             "[$__rate_interval])))", "connect+XCLIENT+EHLO p95"),
            ("histogram_quantile(0.5, sum by (le) (rate(smtpguard_upstream_data_seconds_bucket"
             "[$__rate_interval])))", "DATA p50"),
            ("histogram_quantile(0.95, sum by (le) (rate(smtpguard_upstream_data_seconds_bucket"
             "[$__rate_interval])))", "DATA p95"),
        ], 12),
        ("Upstream errors / s by stage", "ops", [
            ("sum by (stage) (rate(smtpguard_upstream_errors_total[$__rate_interval]))", "{{stage}}"),
        ], 12),
        ("State store errors / s", "ops", [
            ("sum by (operation) (rate(smtpguard_store_errors_total[$__rate_interval]))", "{{operation}}"),
            ("sum(rate(smtpguard_store_writes_dropped_total[$__rate_interval]))", "cache writes dropped"),
            ("sum(increase(smtpguard_store_breaker_opened_total[$__rate_interval]))", "breaker opened"),
            ("min(smtpguard_store_up)", "store up"),
        ], 8),
        ("Stress mode", "short", [
            ("max(smtpguard_stress_mode)", "under stress"),
            ("sum(increase(smtpguard_stress_entered_total[1h]))", "entered (1h)"),
        ], 8),
        ("Config reloads", "short", [
            ("sum by (result) (increase(smtpguard_config_reloads_total[1h]))", "{{result}} (1h)"),
            ("min(smtpguard_config_last_reload_successful)", "last reload ok"),
        ], 8),
        ("Last successful config load", "dateTimeFromNow", [
            ("max(smtpguard_config_last_reload_success_timestamp_seconds) * 1000", "loaded"),
        ], 8),
    ]),
    ("Process", [
        ("CPU (cores)", "short", [
            ('sum by (instance) (rate(process_cpu_seconds_total{job="smtpguard"}[$__rate_interval]))',
             "{{instance}}"),
        ], 6),
        ("Memory", "bytes", [
            ('sum by (instance) (process_resident_memory_bytes{job="smtpguard"})', "RSS {{instance}}"),
            ('sum by (instance) (process_virtual_memory_bytes{job="smtpguard"})', "virtual {{instance}}"),
        ], 6),
        ("Open files / limit", "percentunit", [
            ('max by (instance) (process_open_fds{job="smtpguard"} / process_max_fds{job="smtpguard"})',
             "{{instance}}"),
        ], 6),
        ("Started", "dateTimeFromNow", [
            ('max(process_start_time_seconds{job="smtpguard"}) * 1000', "last start"),
        ], 6),
    ]),
]


def dashboard() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    pid, y = 1, 0
    for row_title, row_panels in ROWS:
        panels.append({"type": "row", "title": row_title, "id": pid, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        pid, y, x = pid + 1, y + 1, 0
        for title, unit, targets, width in row_panels:
            if x + width > 24:
                x, y = 0, y + 8
            panels.append({
                "type": "timeseries", "title": title, "id": pid, "datasource": DS,
                "gridPos": {"h": 8, "w": width, "x": x, "y": y},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom"},
                            "tooltip": {"mode": "multi"}},
                "targets": [{"datasource": DS, "expr": expr, "legendFormat": legend, "refId": chr(65 + i)}
                            for i, (expr, legend) in enumerate(targets)],
            })
            pid, x = pid + 1, x + width
        y += 8
    return {
        "uid": "smtpguard", "title": "smtpguard", "tags": ["smtp", "postfix"], "timezone": "browser",
        "schemaVersion": 39, "version": 1, "refresh": "30s", "editable": True,
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus",
                                 "label": "Data source", "current": {}, "hide": 0}]},
        "panels": panels,
    }


if __name__ == "__main__":
    print(json.dumps(dashboard(), indent=2))
