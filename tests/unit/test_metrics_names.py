"""Metric naming conventions and bounded labels, checked on the registry."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from smtpguard.metrics import METRICS, Metrics, reject_reason
from smtpguard.verdict import REPLIES, Reply

FORBIDDEN_LABELS = {"ip", "client", "client_ip", "address", "addr", "sender", "recipient", "rcpt", "helo", "host"}


def test_names_follow_prometheus_conventions() -> None:
    m = Metrics.create()
    for family in m.registry.collect():
        assert family.name.startswith(("smtpguard_", "process_")), family.name  # process_*: the standard collector
        if family.type == "histogram":
            assert family.name.endswith("_seconds"), family.name
        assert family.documentation, family.name
    text = m.exposition().decode()
    counters = [f for f in text_string_to_metric_families(text) if f.type == "counter"]
    assert counters and all(s.name.endswith(("_total", "_created")) for f in counters for s in f.samples)


def test_labels_are_bounded() -> None:
    for name in Metrics.__dataclass_fields__:
        obj = getattr(METRICS, name)
        labels = set(getattr(obj, "_labelnames", ()))
        assert not labels & FORBIDDEN_LABELS, (name, labels)


def test_known_label_values_start_at_zero() -> None:
    m = Metrics.create()
    text = m.exposition().decode()
    for line in ('smtpguard_greylist_total{mode="frontend",outcome="new"} 0.0',
                 'smtpguard_greylist_total{mode="policy",outcome="passed"} 0.0',
                 'smtpguard_policy_errors_total{problem="malformed"} 0.0',
                 'smtpguard_allowlist_cache_total{result="pass_old"} 0.0',
                 'smtpguard_config_reloads_total{result="failure"} 0.0',
                 "smtpguard_config_last_reload_successful 1.0"):
        assert line in text
    m.init_checks(["pregreet"])
    m.init_dnsbl_lists(["zen.test"])
    text = m.exposition().decode()
    assert 'smtpguard_screening_verdicts_total{action="drop",check="pregreet"} 0.0' in text
    assert 'smtpguard_dnsbl_hits_total{list="zen.test"} 0.0' in text


def test_reject_reason() -> None:
    assert reject_reason(REPLIES["busy"]) == "busy"
    assert reject_reason(Reply(421, "4.3.2", "All server ports are busy")) == "busy"
    assert reject_reason(Reply(550, "5.7.1", "Service unavailable; client [192.0.2.1] blocked")) == "550"
    assert reject_reason(None) == "unknown"


def test_process_metrics_and_dns_buckets_to_the_lifetime() -> None:
    """Issue 17: the standard process_* metrics, and DNS latency buckets up to
    the default [dns] lifetime (10s), not 5s."""
    from smtpguard.config import DnsConfig

    text = Metrics.create().exposition().decode()
    assert "process_cpu_seconds_total" in text and "process_resident_memory_bytes" in text
    m = Metrics.create()
    m.dns_query_seconds.labels(type="A").observe(8.0)
    families = {f.name: f for f in text_string_to_metric_families(m.exposition().decode())}
    bounds = [float(s.labels["le"]) for s in families["smtpguard_dns_query_seconds"].samples
              if s.name.endswith("_bucket") and s.labels["le"] != "+Inf"]
    assert max(bounds) >= DnsConfig().lifetime


def _literals(path: str, pattern: str) -> set[str]:
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "smtpguard"
    return {m for f in root.rglob(path) for m in re.findall(pattern, f.read_text())}


def test_every_known_label_set_starts_at_zero() -> None:
    """Issue 17: each labelled counter whose label values are finite and
    known exports them at 0 before the first event; the sets are the ones
    the code really uses (read from its source), not a copy that drifts."""
    from smtpguard import metrics
    from smtpguard.verdict import Outcome

    assert set(metrics.CHECK_OUTCOMES) == {o.value for o in Outcome}
    assert set(metrics.UPSTREAM_STAGES) == _literals("machine.py", r'_upstream_failed\([a-z_]+, "([A-Z-]+)"\)')
    assert set(metrics.STORE_OPERATIONS) == _literals("*.py", r'store_errors\.labels\(operation="([a-z_]+)"\)')
    assert set(metrics.POLICY_PROBLEMS) == _literals("policy/server.py", r'policy_errors\.labels\(problem="(\w+)"\)')
    kinds = _literals("policy/*.py", r'Answer\([^\n]*?, "([a-z_]+)"')
    kinds |= {"defer_if_permit", "defer", "reject"}  # greylist_action's; a reply's, by its code (engine._answer)
    kinds |= _literals("policy/server.py", r'count\(req\.state, "([a-z]+)"')
    assert kinds == set(metrics.POLICY_ACTIONS)
    # The fixed refusals are the data scanner's replies and the busy listener's.
    scanner = {str(REPLIES[k].code) for k in ("bare_newline", "nul_in_data", "too_big", "data_line_too_long")}
    assert {c for s, c in metrics.FIXED_REJECTS if s == "END-OF-MESSAGE"} == scanner
    assert ("CONNECT", str(REPLIES["busy"].code)) in metrics.FIXED_REJECTS

    m = Metrics.create()
    m.init_checks(["pregreet"])
    m.init_checks(["greylist"], mode="policy")
    m.init_dns()
    m.init_policy(["RCPT"])
    families = {f.name: f for f in text_string_to_metric_families(m.exposition().decode())}

    def series(name: str) -> dict[frozenset[tuple[str, str]], float]:
        return {frozenset(s.labels.items()): s.value for s in families[name].samples if s.name == f"{name}_total"}

    expected = {
        "smtpguard_rejects": [{"stage": s, "code": c} for s, c in metrics.FIXED_REJECTS],
        "smtpguard_connections_rejected": [{"reason": "busy"}],
        "smtpguard_upstream_errors": [{"stage": s} for s in metrics.UPSTREAM_STAGES],
        "smtpguard_store_errors": [{"operation": o} for o in metrics.STORE_OPERATIONS],
        "smtpguard_check_results": [{"mode": mode, "check": check, "outcome": o} for o in metrics.CHECK_OUTCOMES
                                    for mode, check in (("frontend", "pregreet"), ("policy", "greylist"))],
        "smtpguard_screening_verdicts": [{"check": "pregreet", "action": a} for a in metrics.SCREENING_ACTIONS],
        "smtpguard_dns_errors": [{"type": t, "error": e} for t in metrics.DNS_TYPES for e in metrics.DNS_ERRORS],
        "smtpguard_policy_requests": [{"state": "RCPT", "action": a} for a in metrics.POLICY_ACTIONS],
    }
    for name, label_sets in expected.items():
        got = series(name)
        assert got == {frozenset(d.items()): 0.0 for d in label_sets}, name
    counts = {s.labels["type"] for s in families["smtpguard_dns_query_seconds"].samples
              if s.name == "smtpguard_dns_query_seconds_count"}
    assert counts == set(metrics.DNS_TYPES)
