"""What the policy service answers: smtpguard's checks on one Postfix policy
request, and their results turned into an access(5) action.

The checks are the front end's own (:mod:`smtpguard.checks`), on the
:class:`~smtpguard.pipeline.Pipeline`'s tables, state store, clock and DNS
resolver; only where their facts come from differs: Postfix's request
attributes instead of an SMTP session.  ``[policy] checks`` names which run
and at which ``protocol_state`` (default: greylisting at ``RCPT``, as
postgrey); each uses its own section's settings (``[greylist]``,
``[rhsbl]``...), whether or not that section's ``enabled`` turns it on for
the front end.

Order and precedence (:data:`~smtpguard.policy.settings.CHECKS`): client,
HELO, sender, recipient checks, then greylisting, as a Postfix restriction
list would have them.  The first result that decides answers:

==========================================  =============================================
result                                       action
==========================================  =============================================
greylisted (new, early retry, too late)      ``DEFER_IF_PERMIT 4.2.0 <[greylist] text>``
                                             (``greylist_action``; ``%s``/``%r`` expanded)
a check rejects / defers                     ``550 5.7.1 text`` / ``450 4.7.1 text`` (the
                                             front end's reply; Postfix adds the
                                             ``<rcpt>: Recipient address rejected:`` part)
a check would drop the client (521, 421)     the same code: Postfix disconnects after it
an allowlist (access OK, DNSWL)              ``DUNNO``: our remaining checks are skipped,
                                             Postfix's own restrictions still apply
triplet passed now (first retry)             ``PREPEND X-Greylist: delayed N seconds by ...``
                                             (once per message, as postgrey)
a check in ``action = "ignore"`` failed      ``WARN <reason>`` (warn_if_reject)
nothing decided                              ``DUNNO``
==========================================  =============================================

The policy service never answers ``OK``: an allowlisted client goes on
through the rest of Postfix's restrictions (``reject_unauth_destination``
among them), so a policy service misplaced before it cannot open a relay.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING, Any, TypeVar

from ..checks.access import check_client_access
from ..checks.addresses import RECIPIENT, SENDER, check_address
from ..checks.dnsbl import RhsblTarget, check_rhsbl, dnsbl_result, lookup_dnsbl
from ..checks.domains import check_helo_hostname, check_sender_domain
from ..checks.greylist import CHECK, State, check_greylist, greylist_text
from ..checks.helo import check_helo
from ..checks.limits import check_connection_rate, check_sender_rate, client_key, exempt
from ..checks.rdns import ClientNames, NameStatus, check_client_names
from ..config import Config, ConfigError
from ..dns import Resolver
from ..metrics import METRICS
from ..pipeline import Pipeline
from ..store import start_deadline
from ..verdict import Action, Outcome, Reply, Result
from .protocol import PolicyRequest
from .settings import CHECKS

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

Section = TypeVar("Section", bound="DataclassInstance")

log = logging.getLogger("smtpguard")

try:
    VERSION = metadata.version("smtpguard")
except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
    VERSION = "0"

#: How many recent message instances remember their X-Greylist header (postgrey: 20),
#: and their sender-rate result (one count per message, whatever its recipients).
_INSTANCES = 1000

# Checks that ask the DNS, and the section keys they need.
_DNS_CHECKS = {"dnsbl", "rhsbl_reverse_client", "helo_hostname", "rhsbl_helo", "sender_domain", "rhsbl_sender"}
_RHSBL = {"rhsbl_reverse_client": RhsblTarget.REVERSE_CLIENT, "rhsbl_helo": RhsblTarget.HELO,
          "rhsbl_sender": RhsblTarget.SENDER}

#: Postfix's own prefix, which it adds to a policy answer's text itself.
_POSTFIX_PREFIX = re.compile(r"^<[^>]*>: (?:[A-Za-z ]+ rejected: )?")


@dataclass(frozen=True)
class Answer:
    """The action for Postfix, and what the log and metrics say about it."""

    action: str
    kind: str  # metric label: dunno, prepend, warn, defer_if_permit, defer, reject, default
    found: Result | None = None  # the result that decided (or warned)


DUNNO = Answer("DUNNO", "dunno")


def wants_dns(cfg: Config) -> bool:
    """Does ``[policy] checks`` name a check that asks the DNS?"""
    return bool(cfg.policy.listen) and any(c.name in _DNS_CHECKS for c in cfg.policy.checks)


def validate(cfg: Config) -> None:
    """Settings a listed check cannot run without (its section's own
    ``validate`` only runs when the front end enables it)."""
    for c in cfg.policy.checks:
        target = _RHSBL.get(c.name)
        if target is not None and not cfg.rhsbl.sites_for(target):
            key = {"rhsbl_reverse_client": "reverse_client_sites", "rhsbl_helo": "helo_sites"}.get(c.name,
                                                                                                  "sender_sites")
            raise ConfigError("policy.checks", f"{c.name} needs [rhsbl] {key}")
        if c.name == "dnsbl" and not cfg.dnsbl.sites:
            raise ConfigError("policy.checks", "dnsbl needs [dnsbl] sites")
        if c.name == "connection_rate" and cfg.limits.connection_rate_limit <= 0:
            raise ConfigError("policy.checks", "connection_rate needs [limits] connection_rate_limit")
        if c.name == "sender_rate" and cfg.limits.sender_rate_limit <= 0:
            raise ConfigError("policy.checks", "sender_rate needs [limits] sender_rate_limit")


class PolicyEngine:
    """Answers requests; built from the front end's pipeline (its tables,
    store, clock and resolver), and again on every reload."""

    def __init__(self, pipeline: Pipeline, previous: PolicyEngine | None = None) -> None:
        p = pipeline
        self.pipeline = p
        self.cfg: Config = p.cfg
        validate(self.cfg)
        self.store = p.store
        self.clock: Callable[[], float] = p.clock
        self.tables = p.tables
        self.client_access = p.client_access
        self.resolver = p.dns.resolver
        cfg = self.cfg
        if self.resolver is None and any(c.name in _DNS_CHECKS for c in cfg.policy.checks):
            raise ConfigError("policy.checks", "checks that ask the DNS need a resolver")
        # Each listed check runs with its section's settings, switched on.
        self.sections: dict[str, Any] = {name: _enabled(getattr(cfg, CHECKS[name])) for name in CHECKS}
        self.at: dict[str, tuple[str, ...]] = {}
        for state in ("CONNECT", "EHLO", "HELO", "MAIL", "RCPT", "DATA", "END-OF-MESSAGE", "VRFY", "ETRN"):
            self.at[state] = tuple(c.name for c in cfg.policy.checks if state in c.states)
        # Message instances that got their X-Greylist header (kept across reloads).
        self.instances: collections.OrderedDict[str, None] = (
            previous.instances if previous is not None else collections.OrderedDict())
        self._our_addresses = tuple(hp.host for hp in cfg.server.listen)
        # Message instances and their sender-rate result (one count per message).
        self.sender_rates: collections.OrderedDict[str, Result] = (
            previous.sender_rates if previous is not None else collections.OrderedDict())
        self._runners: dict[str, Callable[[PolicyRequest], Awaitable[Result | None]]] = {
            "connection_rate": self._connection_rate, "sender_rate": self._sender_rate,
            "client_access": self._client_access, "dnsbl": self._dnsbl, "client_name": self._client_name,
            "rhsbl_reverse_client": self._rhsbl_reverse_client, "helo": self._helo,
            "helo_hostname": self._helo_hostname, "rhsbl_helo": self._rhsbl_helo, "sender": self._sender,
            "sender_domain": self._sender_domain, "rhsbl_sender": self._rhsbl_sender, "recipient": self._recipient,
        }
        self._counters: dict[tuple[str, Outcome], Any] = {}

    # ------------------------------------------------------------ deciding

    async def decide(self, req: PolicyRequest) -> Answer:
        """The answer to one well-formed request (see the module docstring)."""
        warned: Answer | None = None
        prepend: Answer | None = None
        for name in self.at.get(req.state, ()):
            if name == "greylist":
                grey = await self._greylist(req)
                if grey is not None and grey.kind != "prepend":
                    return grey
                prepend = grey
                continue
            found = await self._runners[name](req)
            if found is None:  # not applicable (no HELO name yet, ...)
                continue
            self._count(found)
            answer = _answer(found)
            if answer is not None and answer.kind == "warn":
                warned = warned or answer
                self._log("warn", found, req)
                continue
            if found.verdict.action is Action.PASS or (found.outcome is Outcome.PASS and name == "client_access"):
                break  # allowlisted: no more of our checks
            if answer is not None:
                self._log(answer.kind, found, req)
                return answer
        return prepend or warned or DUNNO

    def _dns(self) -> Resolver:
        """The resolver, for the checks that ask the DNS (__init__ refused a
        configuration that has such checks and no resolver)."""
        assert self.resolver is not None
        return self.resolver

    def _count(self, found: Result) -> None:
        key = (found.check, found.outcome)
        counter = self._counters.get(key)
        if counter is None:  # labels() is slow: keep the children
            counter = self._counters[key] = METRICS.check_results.labels(
                mode="policy", check=found.check, outcome=found.outcome.value)
        counter.inc()

    def _log(self, word: str, found: Result, req: PolicyRequest) -> None:
        log.info("policy: %s, reason=%s, client=%s, helo=<%s>, sender=<%s>, recipient=<%s>, state=%s, check=%s",
                 word, found.reason, who(req), req.get("helo_name"), req.get("sender"), req.get("recipient"),
                 req.state, found.check)

    # ------------------------------------------------------------ the checks

    async def _connection_rate(self, req: PolicyRequest) -> Result | None:
        """anvil's smtpd_client_connection_rate_limit on the front end's own
        counter (``conn:ADDR``): at CONNECT only, so once per SMTP session."""
        ip = req.client_ip
        if ip is None:
            return None
        cfg = self.sections["connection_rate"]
        if exempt(cfg, ip):
            return check_connection_rate(cfg, ip, 0, "")
        start_deadline(self.cfg.state.deadline)
        rate = await self.pipeline.hit_rate(f"conn:{client_key(ip)}", cfg.rate_time_unit)
        return check_connection_rate(cfg, ip, rate, who(req))

    async def _sender_rate(self, req: PolicyRequest) -> Result | None:
        """Messages per sender address and ``rate_time_unit``: counted at the
        first MAIL or RCPT request of a message (``instance``); its other
        requests get the same result.  The null sender is not counted."""
        sender = req.get("sender")
        ip = req.client_ip
        if not sender or ip is None:
            return None
        instance = req.get("instance")
        known = self.sender_rates.get(instance) if instance else None
        if known is not None:
            return known
        cfg = self.sections["sender_rate"]
        if exempt(cfg, ip):
            return check_sender_rate(cfg, ip, sender, 0, "")
        start_deadline(self.cfg.state.deadline)
        rate = await self.pipeline.hit_rate(f"sender:{sender.lower()}", cfg.rate_time_unit)
        found = check_sender_rate(cfg, ip, sender, rate, who(req))
        if instance:
            self.sender_rates[instance] = found
            while len(self.sender_rates) > _INSTANCES:
                self.sender_rates.popitem(last=False)
        return found

    async def _client_access(self, req: PolicyRequest) -> Result | None:
        ip = req.client_ip
        if ip is None:
            return None
        return check_client_access(self.sections["client_access"], self.client_access,
                                   ip, req.get("client_name", "unknown") or "unknown")

    async def _dnsbl(self, req: PolicyRequest) -> Result | None:
        ip = req.client_ip
        if ip is None:
            return None
        cfg = self.sections["dnsbl"]
        if await self.pipeline.cached_pass(str(ip), "dnsbl"):  # postscreen's temporary allowlist
            return Result("dnsbl", Outcome.SKIP, "allowlist cache: PASS OLD")
        return dnsbl_result(await lookup_dnsbl(self._dns(), cfg, ip), cfg, f"[{ip}]")

    async def _client_name(self, req: PolicyRequest) -> Result | None:
        """Postfix has looked the names up: ``unknown`` is all it says
        (no temporary/permanent distinction), taken as no usable name."""
        ip = req.client_ip
        if ip is None:
            return None
        reverse, name = req.get("reverse_client_name") or "unknown", req.get("client_name") or "unknown"
        reverse_status = NameStatus.PERM if reverse == "unknown" else NameStatus.OK
        if name != "unknown":
            name_status = NameStatus.OK
        else:  # a reverse name that does not resolve back: forged (or a DNS failure Postfix does not tell)
            name_status = NameStatus.FORGED if reverse_status is NameStatus.OK else NameStatus.PERM
        names = ClientNames(str(ip), reverse, reverse_status, name, name_status)
        return check_client_names(names, self.sections["client_name"])

    async def _rhsbl_reverse_client(self, req: PolicyRequest) -> Result | None:
        return await self._rhsbl(RhsblTarget.REVERSE_CLIENT, req.get("reverse_client_name", "unknown"))

    async def _helo(self, req: PolicyRequest) -> Result | None:
        helo = req.get("helo_name")
        if not helo:
            return None
        return check_helo(self.sections["helo"], helo, req.client_ip, hostname=self.cfg.server.hostname,
                          our_addresses=(req.get("server_address"), *self._our_addresses), table=self.tables["helo"])

    async def _helo_hostname(self, req: PolicyRequest) -> Result | None:
        helo = req.get("helo_name")
        return await check_helo_hostname(self._dns(), self.sections["helo_hostname"], helo) if helo else None

    async def _rhsbl_helo(self, req: PolicyRequest) -> Result | None:
        helo = req.get("helo_name")
        return await self._rhsbl(RhsblTarget.HELO, helo) if helo else None

    async def _sender(self, req: PolicyRequest) -> Result | None:
        if "sender" not in req.attrs or req.state in ("CONNECT", "EHLO", "HELO"):
            return None
        return check_address(self.sections["sender"], req.get("sender"), SENDER, self.tables["sender"], _utf8(req))

    async def _sender_domain(self, req: PolicyRequest) -> Result | None:
        sender = req.get("sender")
        return await check_sender_domain(self._dns(), self.sections["sender_domain"], sender) if sender else None

    async def _rhsbl_sender(self, req: PolicyRequest) -> Result | None:
        sender = req.get("sender")
        return await self._rhsbl(RhsblTarget.SENDER, sender) if sender else None

    async def _recipient(self, req: PolicyRequest) -> Result | None:
        rcpt = req.get("recipient")
        if not rcpt:
            return None
        return check_address(self.sections["recipient"], rcpt, RECIPIENT, self.tables["recipient"], _utf8(req))

    async def _rhsbl(self, target: RhsblTarget, what: str) -> Result:
        return await check_rhsbl(self._dns(), self.sections[f"rhsbl_{target.name.lower()}"], target, what,
                                 self.tables["rhsbl"])

    async def _greylist(self, req: PolicyRequest) -> Answer | None:
        """postgrey's ``smtpd_access_policy`` on the shared store: None when
        it has nothing to say (no recipient to key on, at DATA with several
        recipients; a pass without a header), else its answer."""
        rcpt = req.get("recipient")
        if not rcpt:
            return None
        cfg = self.sections["greylist"]
        ip = req.client_ip
        if ip is None:
            found, decision = Result(CHECK, Outcome.SKIP, f"no client IP address ({req.get('client_address')!r})"), None
        else:
            start_deadline(self.cfg.state.deadline)  # this request's store calls together
            found, decision = await check_greylist(self.store, cfg, ip, req.get("client_name"),
                                                   req.get("sender"), rcpt, self.clock(), mode="policy")
        self._count(found)
        word = "greylist" if found.outcome is Outcome.FAIL else found.outcome.value
        log.info("policy: %s, reason=%s, client=%s, sender=<%s>, recipient=<%s>",
                 word, found.reason, who(req), req.get("sender"), rcpt)
        pol = self.cfg.policy
        if found.outcome is Outcome.FAIL and decision is not None and found.verdict.action is not Action.CONTINUE:
            text = greylist_text(cfg, rcpt, decision.wait)
            dsn = "" if text[:1].isdigit() else "4.2.0 "  # postgrey: 4.2.0 unless the text has a code
            kind = "defer" if pol.greylist_action[0].isdigit() else pol.greylist_action.lower()
            return Answer(f"{pol.greylist_action} {dsn}{_text(text)}", kind, found)
        answer = _answer(found, "greylist: ")  # action = ignore; the store failed (on_store_error = tempfail)
        if answer is not None:
            return answer
        passed = decision is not None and decision.state is State.PASSED
        if passed and pol.greylist_header and self._first_for_instance(req.get("instance")):
            return Answer(f"PREPEND {self._header(decision.delayed if decision else 0.0)}", "prepend", found)
        return None

    def _first_for_instance(self, instance: str) -> bool:
        """postgrey's ``is_new_instance``: one X-Greylist header per message."""
        if not instance:
            return True
        if instance in self.instances:
            return False
        self.instances[instance] = None
        while len(self.instances) > _INSTANCES:
            self.instances.popitem(last=False)
        return True

    def _header(self, delayed: float) -> str:
        date = time.strftime("%a, %d %b %Y %H:%M:%S %Z", time.localtime(self.clock()))
        return (self.cfg.policy.greylist_header.replace("%t", str(int(delayed))).replace("%v", VERSION)
                .replace("%h", self.cfg.server.hostname).replace("%d", date))


def _answer(found: Result, label: str = "") -> Answer | None:
    """A result's verdict as an access(5) action, or None when it decides
    nothing: a failure under ``action = "ignore"`` (verdict CONTINUE) is
    ``WARN [label]reason`` (warn_if_reject); a REJECT, DEFER or DROP is its
    reply (:func:`_reply_answer`)."""
    v = found.verdict
    if found.outcome is Outcome.FAIL and v.action is Action.CONTINUE:
        return Answer(f"WARN {label}{_text(found.reason)}", "warn", found)
    if v.action in (Action.REJECT, Action.DEFER, Action.DROP) and v.reply is not None:
        return _reply_answer(v.reply, found)
    return None


def _reply_answer(r: Reply, found: Result) -> Answer:
    """``550 5.7.1 text``: the front end's reply as an access(5) action,
    without the ``<rcpt>: Recipient address rejected:`` Postfix adds itself."""
    text = _text(_POSTFIX_PREFIX.sub("", r.text))
    return Answer(" ".join(x for x in (str(r.code), r.status, text) if x), "defer" if r.is_temporary else "reject",
                  found)


def _enabled(section: Section) -> Section:
    return dataclasses.replace(section, enabled=True) if hasattr(section, "enabled") else section


def _utf8(req: PolicyRequest) -> bool:
    return not (req.get("sender") + req.get("recipient")).isascii()


def _text(text: str) -> str:
    """Text for an answer: one line (Postfix reads up to the newline)."""
    return " ".join(text.split())


def who(req: PolicyRequest) -> str:
    """``name[address]`` as Postfix writes the client (``:port`` when given)."""
    port = req.get("client_port")
    return f"{req.get('client_name') or 'unknown'}[{req.get('client_address')}]" + (f":{port}" if port else "")
