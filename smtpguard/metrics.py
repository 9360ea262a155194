"""Prometheus metrics: one registry, the names written once.

Metric objects live in :data:`METRICS`; the rest of the code increments
them and never builds names.  Naming follows Prometheus conventions:
counters end in ``_total``, durations are ``_seconds`` histograms, sizes are
``_bytes``.  Labels are small bounded sets (check names, actions, stages,
reply codes, configured DNSBL domains) — never a client address, a sender
or a recipient.

Who increments what:

==========================================  =====================================
metric                                      incremented by
==========================================  =====================================
connections, connections_rejected           listener (core)
sessions_active                             listener (core)
rejects                                     machine (core)
messages_relayed, bytes_relayed             machine (core)
upstream_errors, upstream_*_seconds         machine (core)
check_results, screening_verdicts           pipeline (screening checks)
allowlist_cache                             pipeline (PASS OLD / PASS NEW)
handoffs                                    pipeline (connections passed to smtpd)
greylist, spf_results                       greylisting, front end and policy service (spf_results: [greylist] spf_key)
policy_*                                    policy service (smtpguard.policy)
dnsbl_hits, dns_query_seconds, dns_errors   DNSBL / DNS resolver
store_errors, store_up, store_breaker_*,    state store (smtpguard.store.failfast)
store_writes_dropped
stress_mode, stress_entered                 stress mode (smtpguard.stress)
reloads                                     reload (SIGHUP)
==========================================  =====================================

The HTTP endpoint (``/metrics``, ``/healthz``, ``/readyz``) is served from
the asyncio loop by :mod:`smtpguard.health`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# Up to the default [dns] lifetime (10s): a query that takes it all lands in a bucket of its own.
_DNS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 7.5, 10)

#: Label values known in advance, exported at 0 from the start so dashboards
#: and ``rate()`` see the series before the first event.
SCREENING_ACTIONS = ("continue", "pass", "defer", "reject", "drop")
ALLOWLIST_RESULTS = ("pass_old", "pass_new")
HANDOFF_RESULTS = ("passed", "failed")
GREYLIST_OUTCOMES = ("new", "early_retry", "passed", "known", "allowlisted")
SPF_RESULTS = ("pass", "fail", "softfail", "neutral", "none", "permerror", "temperror")
RELOAD_RESULTS = ("success", "failure")
#: where a decision was made: the SMTP front end or the Postfix policy service
MODES = ("frontend", "policy")
POLICY_PROBLEMS = ("malformed", "timeout", "overload", "internal")
#: a check's outcome (:class:`smtpguard.verdict.Outcome`'s values)
CHECK_OUTCOMES = ("pass", "fail", "skip")
#: smtpguard's own refusals whose stage and code no setting changes: 421 at CONNECT (all server
#: ports busy, connection limits), 550 and 552 at END-OF-MESSAGE (bare newline or NUL; size or
#: line length).  Other codes come from configured replies and appear with their first event.
FIXED_REJECTS = (("CONNECT", "421"), ("END-OF-MESSAGE", "550"), ("END-OF-MESSAGE", "552"))
#: connections refused at the banner for a fixed reason (:func:`reject_reason`)
CONNECTION_REFUSALS = ("busy",)
#: where the upstream (Postfix) connection can fail (smtpguard.machine's _upstream_failed)
UPSTREAM_STAGES = ("RCPT", "DATA", "END-OF-MESSAGE", "RSET")
#: the state store's operations that count their failures
STORE_OPERATIONS = ("greylist", "cache_get", "cache_put", "rate")
#: the record types the resolver asks, and how a query can fail
DNS_TYPES = ("A", "AAAA", "TXT", "PTR", "MX")
DNS_ERRORS = ("timeout", "servfail")
#: the policy service's answers (``default``: a request it could not evaluate;
#: ``defer_if_permit``: [policy] greylist_action's default)
POLICY_ACTIONS = ("dunno", "prepend", "warn", "defer_if_permit", "defer", "reject", "default")


@dataclass(frozen=True)
class Metrics:
    registry: CollectorRegistry
    # ---- core: connections and sessions
    connections: Counter
    connections_rejected: Counter  # labels: reason
    sessions_active: Gauge
    rejects: Counter  # labels: stage, code
    # ---- core: relay
    messages_relayed: Counter
    bytes_relayed: Counter
    upstream_errors: Counter  # labels: stage
    upstream_connect_seconds: Histogram
    upstream_data_seconds: Histogram
    # ---- screening (pipeline / checks)
    check_results: Counter  # labels: mode (frontend, policy), check, outcome (pass, fail, skip)
    screening_verdicts: Counter  # labels: check, action
    allowlist_cache: Counter  # labels: result (pass_old, pass_new)
    handoffs: Counter  # labels: result (passed, failed)
    # ---- greylisting
    greylist: Counter  # labels: mode (frontend, policy), outcome (new, early_retry, passed, known, allowlisted)
    spf_results: Counter  # labels: result (pass, fail, softfail, neutral, none, permerror, temperror)
    # ---- DNS
    dnsbl_hits: Counter  # labels: list (the configured DNSBL/DNSWL domain)
    dns_query_seconds: Histogram  # labels: type (A, AAAA, TXT, PTR, MX)
    dns_errors: Counter  # labels: type, error (timeout, servfail, ...)
    # ---- policy service (smtpguard.policy)
    policy_requests: Counter  # labels: state (protocol_state), action (dunno, prepend, warn, defer, reject, ...)
    policy_request_seconds: Histogram
    policy_errors: Counter  # labels: problem (malformed, timeout, overload, internal)
    policy_connections: Gauge
    # ---- state store
    store_errors: Counter  # labels: operation
    store_up: Gauge  # 0 while the breaker skips the store or readiness found it failing
    store_breaker_opened: Counter
    store_writes_dropped: Counter
    # ---- stress mode (smtpguard.stress)
    stress_mode: Gauge
    stress_entered: Counter
    # ---- operations
    reloads: Counter  # labels: result (success, failure)
    config_last_reload_success: Gauge
    config_last_reload_timestamp: Gauge

    @classmethod
    def create(cls) -> Metrics:
        r = CollectorRegistry()
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes, open fds...
        m = cls(
            registry=r,
            connections=Counter(
                "smtpguard_connections", "Client connections accepted by the listener", registry=r,
            ),
            connections_rejected=Counter(
                "smtpguard_connections_rejected",
                "Client connections refused before or at the banner, by reason", ["reason"], registry=r,
            ),
            sessions_active=Gauge("smtpguard_sessions_active", "Client sessions in progress", registry=r),
            rejects=Counter(
                "smtpguard_rejects",
                "Commands refused by smtpguard itself (NOQUEUE: reject lines), by SMTP stage and reply code",
                ["stage", "code"], registry=r,
            ),
            messages_relayed=Counter(
                "smtpguard_relayed_messages", "Messages relayed and accepted (250) by Postfix", registry=r,
            ),
            bytes_relayed=Counter(
                "smtpguard_relayed_bytes", "Message bytes relayed and accepted by Postfix", registry=r,
            ),
            upstream_errors=Counter(
                "smtpguard_upstream_errors", "Upstream (Postfix) connection failures, by stage",
                ["stage"], registry=r,
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
                "smtpguard_check_results",
                "Check results, by mode (frontend, policy), check and outcome (pass/fail/skip)",
                ["mode", "check", "outcome"], registry=r,
            ),
            screening_verdicts=Counter(
                "smtpguard_screening_verdicts",
                "Screening check results that decided something, by check and action", ["check", "action"],
                registry=r,
            ),
            allowlist_cache=Counter(
                "smtpguard_allowlist_cache",
                "Temporary allowlist: pass_old = cache hit (PASS OLD), pass_new = passed all tests (PASS NEW)",
                ["result"], registry=r,
            ),
            handoffs=Counter(
                "smtpguard_handoffs",
                "Client connections handed to Postfix's smtpd pass service ([handoff]): passed, or failed "
                "(relayed instead)", ["result"], registry=r,
            ),
            greylist=Counter(
                "smtpguard_greylist",
                "Greylisting decisions, by mode (frontend, policy) and outcome: new (greylisted, first time or "
                "again), early_retry, passed (a triplet's first pass), known (passed before), allowlisted",
                ["mode", "outcome"], registry=r,
            ),
            spf_results=Counter(
                "smtpguard_greylist_spf", "SPF evaluations for SPF-aware greylisting ([greylist] spf_key), by result",
                ["result"], registry=r,
            ),
            dnsbl_hits=Counter(
                "smtpguard_dnsbl_hits", "DNSBL/DNSWL listings found, by configured list domain", ["list"],
                registry=r,
            ),
            dns_query_seconds=Histogram(
                "smtpguard_dns_query_seconds", "DNS query latency (cache misses), by record type", ["type"],
                buckets=_DNS_BUCKETS, registry=r,
            ),
            dns_errors=Counter(
                "smtpguard_dns_errors", "DNS queries that failed, by record type and error", ["type", "error"],
                registry=r,
            ),
            policy_requests=Counter(
                "smtpguard_policy_requests",
                "Policy service requests answered, by protocol_state and action (dunno, prepend, warn, "
                "defer_if_permit, defer, reject, default)", ["state", "action"], registry=r,
            ),
            policy_request_seconds=Histogram(
                "smtpguard_policy_request_seconds", "Policy service: time from a request's end to its answer",
                buckets=_LATENCY_BUCKETS, registry=r,
            ),
            policy_errors=Counter(
                "smtpguard_policy_errors",
                "Policy service: requests and connections it could not serve normally, by problem "
                "(malformed, timeout, overload, internal)", ["problem"], registry=r,
            ),
            policy_connections=Gauge(
                "smtpguard_policy_connections", "Policy service: Postfix connections open", registry=r,
            ),
            store_errors=Counter(
                "smtpguard_store_errors", "State store operations that failed, by operation", ["operation"],
                registry=r,
            ),
            store_up=Gauge(
                "smtpguard_store_up",
                "1 while the state store answers; 0 while it is skipped after consecutive failures or its "
                "reads or writes fail (on_store_error decides the answers)", registry=r,
            ),
            store_breaker_opened=Counter(
                "smtpguard_store_breaker_opened",
                "Times the state store was skipped after breaker_failures consecutive failures", registry=r,
            ),
            store_writes_dropped=Counter(
                "smtpguard_store_writes_dropped",
                "Allowlist-cache writes dropped because the background write queue was full", registry=r,
            ),
            stress_mode=Gauge(
                "smtpguard_stress_mode", "1 while smtpguard is under stress (connections in use above "
                "[stress] threshold): the shorter [stress] timeouts and limits apply to new sessions", registry=r,
            ),
            stress_entered=Counter(
                "smtpguard_stress_entered", "Times smtpguard entered stress mode", registry=r,
            ),
            reloads=Counter(
                "smtpguard_config_reloads", "Configuration reloads (SIGHUP), by result", ["result"], registry=r,
            ),
            config_last_reload_success=Gauge(
                "smtpguard_config_last_reload_successful", "1 if the last configuration reload succeeded",
                registry=r,
            ),
            config_last_reload_timestamp=Gauge(
                "smtpguard_config_last_reload_success_timestamp_seconds",
                "Unix time of the last successful configuration load", registry=r,
            ),
        )
        _init_labels(m.allowlist_cache, "result", ALLOWLIST_RESULTS)
        _init_labels(m.handoffs, "result", HANDOFF_RESULTS)
        for mode in MODES:
            for outcome in GREYLIST_OUTCOMES:
                m.greylist.labels(mode=mode, outcome=outcome)
        _init_labels(m.spf_results, "result", SPF_RESULTS)
        _init_labels(m.reloads, "result", RELOAD_RESULTS)
        _init_labels(m.policy_errors, "problem", POLICY_PROBLEMS)
        for stage, code in FIXED_REJECTS:
            m.rejects.labels(stage=stage, code=code)
        _init_labels(m.connections_rejected, "reason", CONNECTION_REFUSALS)
        _init_labels(m.upstream_errors, "stage", UPSTREAM_STAGES)
        _init_labels(m.store_errors, "operation", STORE_OPERATIONS)
        m.config_last_reload_success.set(1)
        m.store_up.set(1)
        m.config_last_reload_timestamp.set_to_current_time()
        return m

    def init_checks(self, checks: Iterable[str], mode: str = "frontend") -> None:
        """Export ``check_results`` (every outcome) and, for the front end,
        ``screening_verdicts`` (every action) at 0 for *checks*."""
        for check in checks:
            for outcome in CHECK_OUTCOMES:
                self.check_results.labels(mode=mode, check=check, outcome=outcome)
            if mode == "frontend":
                for action in SCREENING_ACTIONS:
                    self.screening_verdicts.labels(check=check, action=action)

    def init_dns(self) -> None:
        """Export the resolver's latency and error series at 0 (each record type)."""
        for rdtype in DNS_TYPES:
            self.dns_query_seconds.labels(type=rdtype)
            for error in DNS_ERRORS:
                self.dns_errors.labels(type=rdtype, error=error)

    def init_policy(self, states: Iterable[str]) -> None:
        """Export ``policy_requests`` at 0 for each protocol_state the
        configured checks run at and every answer."""
        for state in states:
            for action in POLICY_ACTIONS:
                self.policy_requests.labels(state=state, action=action)

    def init_dnsbl_lists(self, lists: Iterable[str]) -> None:
        """Export ``dnsbl_hits`` at 0 for each configured list domain."""
        for name in lists:
            self.dnsbl_hits.labels(list=name)

    def exposition(self) -> bytes:
        """The text exposition format (what ``/metrics`` serves)."""
        return generate_latest(self.registry)


def _init_labels(counter: Counter, label: str, values: Iterable[str]) -> None:
    for v in values:
        counter.labels(**{label: v})


METRICS = Metrics.create()


def reject_reason(reply: object) -> str:
    """A bounded ``reason`` label for a refused connection: the name of the
    fixed reply in :data:`~smtpguard.verdict.REPLIES` (``busy``), else the
    reply code (``521``).  Never derived from client data.  O(1): safe to
    call on every refusal of a bot flood."""
    global _REPLY_NAMES
    if _REPLY_NAMES is None:
        from .verdict import REPLIES

        _REPLY_NAMES = {reply: name for name, reply in REPLIES.items()}
    code = getattr(reply, "code", None)
    if code is None:
        return "unknown"
    try:
        return _REPLY_NAMES.get(reply, str(code))
    except TypeError:  # not hashable
        return str(code)


_REPLY_NAMES: dict[object, str] | None = None
