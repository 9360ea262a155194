"""Prometheus metrics: one registry, the names written once.

Metric objects live in :data:`METRICS`; the rest of the code increments
them and never builds names.  Labels are bounded sets (check names, stages,
reasons) — never a client address.  :func:`serve` starts the HTTP endpoint
on ``[metrics] listen``.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from .config import HostPort

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


@dataclass(frozen=True)
class Metrics:
    registry: CollectorRegistry
    connections: Counter
    connections_rejected: Counter
    sessions_active: Gauge
    messages_relayed: Counter
    bytes_relayed: Counter
    upstream_errors: Counter
    upstream_connect_seconds: Histogram
    upstream_data_seconds: Histogram
    check_results: Counter
    dns_failures: Counter

    @classmethod
    def create(cls) -> Metrics:
        r = CollectorRegistry()
        return cls(
            registry=r,
            connections=Counter("smtpguard_connections", "Client connections accepted by the listener", registry=r),
            connections_rejected=Counter(
                "smtpguard_connections_rejected", "Client connections refused before the banner, by reason",
                ["reason"], registry=r,
            ),
            sessions_active=Gauge("smtpguard_sessions_active", "Client sessions in progress", registry=r),
            messages_relayed=Counter("smtpguard_messages_relayed", "Messages accepted by Postfix", registry=r),
            bytes_relayed=Counter("smtpguard_relayed_bytes", "Message bytes accepted by Postfix", registry=r),
            upstream_errors=Counter(
                "smtpguard_upstream_errors", "Upstream (Postfix) connection failures, by stage", ["stage"], registry=r,
            ),
            upstream_connect_seconds=Histogram(
                "smtpguard_upstream_connect_seconds", "Time to connect, XCLIENT and EHLO to Postfix",
                buckets=_LATENCY_BUCKETS, registry=r,
            ),
            upstream_data_seconds=Histogram(
                "smtpguard_upstream_data_seconds", "Time from DATA to Postfix's end-of-data reply",
                buckets=_LATENCY_BUCKETS, registry=r,
            ),
            check_results=Counter(
                "smtpguard_check_results", "Screening check results, by check and outcome (pass/fail/skip)",
                ["check", "outcome"], registry=r,
            ),
            dns_failures=Counter(
                "smtpguard_dns_failures", "DNS questions that got no answer (timeout, SERVFAIL, REFUSED), by type",
                ["type"], registry=r,
            ),
        )


METRICS = Metrics.create()


def serve(listen: HostPort) -> None:
    """Start the /metrics HTTP endpoint in a background thread."""
    start_http_server(listen.port, addr=listen.host, registry=METRICS.registry)
