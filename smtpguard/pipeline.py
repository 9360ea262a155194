"""Where the checks run, and in which order: written once, here.

The session machine (:mod:`smtpguard.machine`) asks, through the
listener's ``Screen`` requests, :meth:`Pipeline.on_connect` before the
banner, :meth:`on_greet` after the pregreet wait, :meth:`on_banner` before
the final 220, :meth:`on_command` for every command line, then
:meth:`on_helo`, :meth:`on_mail`, :meth:`on_rcpt`, :meth:`on_greylist`
(once Postfix accepted the recipient) and :meth:`on_data` as the commands
arrive; the listener calls :meth:`on_disconnect` at the end.  Each returns
one :class:`~smtpguard.verdict.Verdict`.  The checks
themselves are pure functions in :mod:`smtpguard.checks`; this module is
the I/O edge around them (tables, the state store, the clock, the log).

Connect-time precedence (postscreen's ``psc_endpt_lookup_done``):

1. global connection cap (``server.max_connections``) -> ``421 4.3.2``;
2. per-client concurrency (``limits.connection_count_limit``) -> ``421 4.7.0``;
3. connection rate (``limits.connection_rate_limit``, state store) -> ``421 4.7.0``;
4. permanent access list (``access.client_table``, postscreen_access_list):
   its entries in order, ``permit_mynetworks`` (``access.mynetworks``) and
   tables; the first with an answer decides: PERMIT allowlists the client
   (no screening tests), REJECT/DEFER decide, DUNNO ends the list; no
   answer goes on;
5. temporary allowlist cache (state store): the tests whose pass is still
   valid are skipped; all valid -> ``PASS OLD`` and no greet wait;
   with ``[handoff] socket`` (and a pass service that refuses bare
   newlines, ``handoff_allowed``), an allowlisted (4) or PASS OLD client that
   greylisting would not look at (greylisting off, or the client on its
   client allowlist by address), IPv6 only with ``handoff.ipv6``, is handed
   to Postfix's smtpd as it is (:mod:`smtpguard.handoff`; ``Action.PASS``),
   as postscreen does;
6. DNS lookups start (:mod:`smtpguard.dnsscreen`): the DNSBL score unless
   its pass is cached, the client's names; they run during
7. the pregreet wait (the listener); then, before the final 220
   (:meth:`Pipeline.on_banner`), the DNSBL verdict (DNSWL: ``s.dnswl``, the
   other tests count as passed, greylisting included), the verified client
   name (``s.client_name``) and the client-name / reverse-client RHSBL
   verdicts, kept for RCPT; then per command: error and command
   limits, non-SMTP command, bare newline, unauthorized pipelining; then
   the HELO, sender and recipient checks at their commands (the DNS ones
   after the others: HELO name and RHSBL at HELO, sender domain and RHSBL
   at MAIL).  Unauthorized
   pipelining is checked for every client that is not allowlisted, also
   after it passed (Postfix's reject_unauth_pipelining: a client that sends
   the message before the 354 must not get it through); its cache entry
   only counts towards PASS OLD.

Verdict delivery (Postfix's smtpd_delay_reject): a REJECT/DEFER decided
before RCPT is kept in ``session.delayed`` and answered to every RCPT (and
DATA), so the log line holds helo, from and to.  Protocol tests
(pregreet, pipelining, non-SMTP, bare newline), the DNSBL and the client
name checks always work that way (postscreen's ``enforce``; smtpd's client
restrictions at RCPT); HELO/sender verdicts do when ``screen.delay_reject``
is on (default).  Syntax errors (``501``) and ``503`` (MAIL before HELO with
``helo.required``) are answered at once.  DROP always acts at once.

Allowlist cache (postscreen's temporary allowlist): per client IP, one expiry
per cacheable test (pregreet, dnsbl, pipelining, non_smtp, bare_newline).  Pregreet
passes when the wait ends quietly, dnsbl when the score is below the
threshold (for the answers' clamped TTL); the in-session tests pass when the first
recipient passes screening (and goes to Postfix) without a failure.  When the last test still to do
passes, ``PASS NEW [a]:p`` is logged.  The cache lives in the
:class:`~smtpguard.store.Store` (``[state] url``): with SQLite it survives
restarts, with Redis it is shared by every node, as are the rate counters.

Greylisting (:meth:`Pipeline.on_greylist`) runs last, per recipient, after
every other check passed *and Postfix accepted the recipient* (postgrey sits
at the end of ``smtpd_recipient_restrictions``, after
``reject_unauth_destination`` and recipient validation): a relay attempt or
an unknown user gets Postfix's reject at once and leaves no triplet.  A
client the access table allowlisted, or a DNSWL client (score at or below
``dnsbl.allowlist_threshold``), is not greylisted.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

from . import logs, spf
from .checks.access import check_client_access, open_client_access
from .checks.addresses import RECIPIENT, SENDER, check_address
from .checks.barenewline import check_bare_newline
from .checks.dnsbl import DnsblScore, dnsbl_result
from .checks.errors import check_command_count, check_error_limit
from .checks.greylist import allowlisted, check_greylist, client_exempt
from .checks.helo import check_helo, require_helo
from .checks.limits import check_connection_count, check_connection_rate, client_key, rate_enabled
from .checks.nonsmtp import check_non_smtp
from .checks.pipelining import check_pipelining
from .checks.pregreet import check_pregreet
from .checks.rdns import check_client_names
from .config import Config
from .dns import Resolver
from .dnsscreen import ConnectFindings, DnsScreen
from .hotset import HotSet
from .metrics import METRICS
from .session import Session
from .spf import SpfResult
from .store import MemoryStore, Store, StoreError, start_deadline
from .stress import STRESS, connection_count_limit, greet_wait
from .tables import Table, open_access_table
from .text import ascii_upper
from .verdict import CONTINUE, REPLIES, Action, Outcome, Result, ScreenTest, Verdict

log = logging.getLogger("smtpguard")

# Tests kept in the allowlist cache, each with its section's enabled (and
# ttl, except dnsbl, whose TTL comes from the DNS answers).
CACHEABLE = tuple(ScreenTest)
# The ones that pass when the first recipient passes screening.
_IN_SESSION = (ScreenTest.PIPELINING, ScreenTest.NON_SMTP, ScreenTest.BARE_NEWLINE)
# Checks whose reason is their own log line (postscreen/anvil style).
_OWN_LINE = frozenset({*CACHEABLE, "errors", "command_count"})
_WARNING_LINE = frozenset({"connection_count", "connection_rate"})
# Replies that are answered at once even with delay_reject.
_IMMEDIATE = frozenset({"helo_required", "sender_syntax", "recipient_syntax"})
_PHASES = ("connect", "helo", "mail")
# on_connect's "hand this client to Postfix's smtpd" (smtpguard.handoff).
_HANDOFF = Verdict(Action.PASS)


class Pipeline:
    def __init__(self, cfg: Config, store: Store | None = None, clock: Callable[[], float] = time.time,
                 resolver: Resolver | None = None, handoff_allowed: bool = False) -> None:
        self.cfg = cfg
        # [handoff]: the pass service was found safe (smtpguard.handoff.handoff_allowed)
        self.handoff_allowed = handoff_allowed
        self.clock = clock
        self.store: Store = store if store is not None else MemoryStore(clock)
        self.client_access = open_client_access(cfg.access)
        specs = {
            "helo": cfg.helo.access_table,
            "sender": cfg.addresses.sender_access_table,
            "recipient": cfg.addresses.recipient_access_table,
            "rhsbl": cfg.rhsbl.override,
        }
        self.tables: dict[str, Table | None] = {k: open_access_table(v) if v else None for k, v in specs.items()}
        self.dns = DnsScreen(cfg, resolver, self.tables["rhsbl"])
        # Dashboards see the postscreen tests and each configured list at 0 from the start.
        METRICS.init_checks(CACHEABLE)
        METRICS.init_dnsbl_lists(site.domain for site in cfg.dnsbl.sites)
        self._our_addresses = tuple(hp.host for hp in cfg.server.listen)
        self._stress_limits = dataclasses.replace(
            cfg.limits, connection_count_limit=connection_count_limit(cfg.limits.connection_count_limit, cfg.stress))
        self._counters: dict[tuple[str, Outcome], Any] = {}
        self._pass_old = METRICS.allowlist_cache.labels(result="pass_old")
        self._handoffs = {True: METRICS.handoffs.labels(result="passed"),
                          False: METRICS.handoffs.labels(result="failed")}
        self._cacheable = tuple(t for t in CACHEABLE if getattr(cfg, t).enabled)
        # PASS OLD clients in memory; a reload (other tests enabled?) starts afresh.
        self.hot = HotSet()

    # ------------------------------------------------------------ connect

    async def on_connect(self, s: Session, active: int, concurrent: int = 1) -> Verdict:
        """Before the banner; *active* counts all sessions and *concurrent*
        this client's, both including this one."""
        cfg = self.cfg
        start_deadline(cfg.state.deadline)  # for all of this session's store calls
        if active > cfg.server.max_connections:
            return Verdict(Action.DROP, REPLIES["busy"])
        peer = s.peer
        s.stress = STRESS.update(active, cfg.server.max_connections, cfg.stress)
        limits = self._stress_limits if s.stress else cfg.limits
        v = self._decide(s, check_connection_count(limits, s.client_ip, concurrent, peer), "connect")
        if v.action is Action.DROP:
            return v
        if rate_enabled(cfg.limits, s.client_ip):
            rate = await self.hit_rate(f"conn:{client_key(s.client_ip)}", cfg.limits.rate_time_unit)
            v = self._decide(s, check_connection_rate(cfg.limits, s.client_ip, rate, peer), "connect")
            if v.action is Action.DROP:
                return v
        found = check_client_access(cfg.access, self.client_access, s.client_ip, s.client_name)
        if found.outcome is Outcome.PASS:
            s.allowlisted = True
            log.info("ALLOWLISTED %s", peer)
            self._count(found)
            if self._hands_off(s):
                return _HANDOFF
            self._start_lookups(s)
            return CONTINUE
        v = self._decide(s, found, "connect")
        if v.action is Action.DROP:
            return v
        enabled = self._cacheable
        if enabled:
            if await self._hot_pass(s.client_addr):  # PASS OLD from memory (smtpguard.hotset)
                s.todo = frozenset()
            else:
                cache = await self._get_cache(s.client_addr)
                now = self.clock()
                s.todo = frozenset(t for t in enabled if cache.get(t, 0.0) <= now)
                if not s.todo:
                    self.hot.remember(s.client_addr, min(cache[t] for t in enabled), now)
            if not s.todo:
                log.info("PASS OLD %s", peer)
                self._pass_old.inc()
                if self._hands_off(s):
                    return _HANDOFF
        self._start_lookups(s)  # runs during the greet wait
        return CONTINUE

    def _start_lookups(self, s: Session) -> None:
        """Step 6: the connect-time DNS lookups, kept in ``s.lookups``."""
        s.lookups = self.dns.start(s.client_ip, s.allowlisted, ScreenTest.DNSBL in s.todo)

    def _hands_off(self, s: Session) -> bool:
        """Step 5 with ``[handoff] socket``: may this allowlisted or PASS OLD
        client go to Postfix's smtpd as it is?  Not when greylisting would
        still have to see its recipients, nor an IPv6 client unless
        ``handoff.ipv6`` says Postfix takes them."""
        handoff = self.cfg.handoff
        if not (handoff.socket and self.handoff_allowed) or (s.client_ip.version == 6 and not handoff.ipv6):
            return False
        grey = self.cfg.greylist
        return s.allowlisted or not grey.enabled or client_exempt(grey, s.client_ip, "")

    def on_handoff(self, s: Session, passed: bool) -> None:
        """The listener passed the connection to Postfix; or it could not,
        and the session goes on here (with its DNS lookups, as any other)."""
        self._handoffs[passed].inc()
        if not passed:
            self._start_lookups(s)

    async def on_greet(self, s: Session, received: bytes, after: float) -> Verdict:
        """After the greet wait: what the client sent during it."""
        found = check_pregreet(self.cfg.pregreet, received, after, s.peer)
        return await self._protocol_test(s, found, self.cfg.pregreet.ttl)

    async def on_banner(self, s: Session) -> Verdict:
        """Before the final ``220`` (after the greet wait, if any): collect
        the DNS lookups on_connect started.  The DNSBL score counts the
        lists that answered within ``greet_wait`` of the connect, whether or
        not the client had a wait, and is judged as postscreen does.  The
        client's verified name becomes ``s.client_name`` (XCLIENT NAME=,
        ``name[ip]`` in the log); the client-name and reverse-client RHSBL
        verdicts are kept for RCPT.  Only DROP acts now."""
        pending, s.lookups = s.lookups, None
        # The DNSBL lists have the session's greet wait (a shorter one under stress, smtpguard.stress).
        deadline = s.started + greet_wait(self.cfg.pregreet.greet_wait, self.cfg.stress, s.stress)
        found = await self.dns.collect(pending, s.client_ip, ScreenTest.DNSBL in s.todo, deadline)
        if found.names is not None:
            s.client_name = found.names.name
        if found.dnsbl is not None:
            v = await self._dnsbl(s, found.dnsbl)
            if v.action is Action.DROP:
                return v
        if s.allowlisted:
            return CONTINUE
        for result in _client_results(self.cfg, found):
            v = self._keep(s, result)
            if v.action is Action.DROP:
                return v
        return CONTINUE

    def on_disconnect(self, s: Session) -> None:
        """The session is over (also when it ends in the greet wait)."""
        pending, s.lookups = s.lookups, None
        if pending is not None:
            pending.cancel()  # stop waiting for its lookups

    # ------------------------------------------------------------ commands

    async def on_command(self, s: Session, line: bytes, command: str, pending: bytes, previous: str) -> Verdict:
        """Each command line as received (*line* with its line ending,
        *command* its verb, *pending* the input already received after it,
        *previous* the last command before it), before it is answered."""
        cfg = self.cfg
        hostname = cfg.server.hostname
        # Limits: only a failure is recorded (and counted), not every command.
        if s.errors >= cfg.errors.hard_limit:
            found = check_error_limit(cfg.errors, s.errors, hostname, previous, s.who)
            if found.outcome is Outcome.FAIL:
                return self._decide(s, found, "connect")
        if s.allowlisted or s.dnswl:
            return CONTINUE
        if not s.screened:
            found = check_command_count(cfg.errors, s.commands, hostname, s.peer)
            if found.outcome is Outcome.FAIL:
                return self._decide(s, found, "connect")
        todo = s.todo - s.failed  # a failed test is logged and acted on once
        peer = s.peer
        if ScreenTest.NON_SMTP in todo:
            v = await self._protocol_test(s, check_non_smtp(cfg.non_smtp, line, previous or "CONNECT", peer))
            if v.action is Action.DROP:
                return v
        if ScreenTest.BARE_NEWLINE in todo:
            v = await self._protocol_test(s, check_bare_newline(cfg.bare_newline, line, command, peer))
            if v.action is Action.DROP:
                return v
        # Always, as reject_unauth_pipelining (see the module docstring).
        if cfg.pipelining.enabled and ScreenTest.PIPELINING not in s.failed:
            v = await self._protocol_test(s, check_pipelining(cfg.pipelining, command, s.advertised, pending, peer))
            if v.action is Action.DROP:
                return v
        return CONTINUE

    async def on_helo(self, s: Session) -> Verdict:
        s.delayed.pop("helo", None)  # a new HELO is judged afresh
        if s.allowlisted:
            return CONTINUE
        found = check_helo(self.cfg.helo, s.helo, s.client_ip, hostname=self.cfg.server.hostname,
                           our_addresses=(s.server_ip, *self._our_addresses), table=self.tables["helo"])
        v = self._decide(s, found, "helo")
        if v.final or "helo" in s.delayed:
            return v
        return self._decide_all(s, await self.dns.helo_checks(s.helo), "helo")

    async def on_mail(self, s: Session) -> Verdict:
        helo = self.cfg.helo
        if helo.enabled and helo.required and s.helo is None and not s.allowlisted:
            return self._decide(s, require_helo(None, helo.action), "mail")
        found = check_address(self.cfg.addresses, s.sender or "", SENDER, self.tables["sender"], _utf8(s))
        v = self._decide(s, found, "mail")
        if v.final or "mail" in s.delayed or s.allowlisted:
            return v
        return self._decide_all(s, await self.dns.sender_checks(s.sender), "mail")

    async def on_rcpt(self, s: Session, rcpt: str) -> Verdict:
        for phase in _PHASES:
            v = s.delayed.get(phase)
            if v is not None:
                return v
        found = check_address(self.cfg.addresses, rcpt, RECIPIENT, self.tables["recipient"], _utf8(s))
        return self._decide(s, found, "rcpt")

    async def on_greylist(self, s: Session, rcpt: str) -> Verdict:
        """A recipient that passed every other check and that Postfix
        accepted (postgrey's place: after reject_unauth_destination and
        recipient validation in smtpd_recipient_restrictions)."""
        # DNSWL (score at or below dnsbl.allowlist_threshold): greylisting
        # counts as passed, postscreen's answer to the big senders' pools.
        if s.allowlisted or s.dnswl or not self.cfg.greylist.enabled:
            return CONTINUE
        spf = await self._spf(s, rcpt)
        domain = spf.domain if spf is not None and spf.passed else None
        found, _ = await check_greylist(self.store, self.cfg.greylist, s.client_ip, s.client_name,
                                        s.sender or "", rcpt, self.clock(), client_part=domain)
        log.info("greylist: %s, reason=%s, client=%s, sender=<%s>, recipient=<%s>%s",
                 "greylist" if found.outcome is Outcome.FAIL else found.outcome.value, found.reason,
                 s.who, s.sender or "", rcpt, "" if spf is None else f", spf={spf.result}:{spf.domain}")
        return self._decide(s, found, "rcpt")

    async def _spf(self, s: Session, rcpt: str) -> SpfResult | None:
        """``greylist.spf_key``: the SPF result for this client and sender
        (once per transaction's sender and HELO), or None when not asked:
        the option is off, there is no resolver, or the client or recipient
        is on a greylist allowlist (no key is needed)."""
        resolver = self.dns.resolver
        grey = self.cfg.greylist
        if not grey.spf_key or resolver is None:
            return None
        if allowlisted(grey, s.client_ip, s.client_name, rcpt):
            return None
        asked = (s.sender or "", s.helo or "")
        if s.spf is None or s.spf[0] != asked:
            result = await spf.evaluate(resolver, s.client_addr, *asked)
            METRICS.spf_results.labels(result=result.result).inc()
            s.spf = (asked, result)
        return s.spf[1]

    async def on_data(self, s: Session) -> Verdict:
        """DATA: a protocol-test failure decided at the DATA command itself
        (pipelining the message) rejects it."""
        return s.delayed.get("connect", CONTINUE)

    async def on_relayed(self, s: Session) -> None:
        """A recipient passed screening and goes to Postfix: the screening
        phase is over (as when postscreen hands a client to smtpd); the
        in-session tests not failed have passed."""
        if s.screened:
            return
        s.screened = True
        passed = [t for t in s.todo if t in _IN_SESSION and t not in s.failed]
        if not passed:
            return
        now = self.clock()
        for test in passed:
            self._count(Result(test, Outcome.PASS))
            await self._put_cache(s.client_addr, test, now + getattr(self.cfg, test).ttl)
        s.todo = s.todo.difference(passed)
        self._pass_new(s)

    # ------------------------------------------------------------ helpers

    async def _protocol_test(self, s: Session, found: Result, pass_ttl: float | None = None) -> Verdict:
        """A cacheable postscreen test: log, cache, and keep an enforce
        verdict for RCPT whatever delay_reject says.  *pass_ttl*: a test
        decided once per session (pregreet, dnsbl), whose pass is cached
        now for that long; the per-command tests pass in on_relayed."""
        test = ScreenTest(found.check)
        if found.outcome is not Outcome.PASS:
            self._keep(s, found)
        elif pass_ttl is not None:
            self._count(found)
            if test in s.todo:
                await self._put_cache(s.client_addr, test, self.clock() + pass_ttl)
                s.todo = s.todo - {test}
                self._pass_new(s)
        if found.outcome is not Outcome.FAIL:
            return CONTINUE
        if test not in s.failed:
            s.failed.add(test)
            await self._put_cache(s.client_addr, test, 0.0)
        v = found.verdict
        return v if v.action is Action.DROP else CONTINUE

    async def _dnsbl(self, s: Session, score: DnsblScore) -> Verdict:
        """postscreen's DNSBL verdict after the greet wait.  A score at or
        below the allowlist threshold (DNSWL) makes every other screening
        test count as passed for this session (``s.dnswl``); as in
        postscreen that is not cached: the next connection asks again (the
        resolver's cache answers)."""
        for domain in {hit.site.domain for hit in score.hits}:  # which lists matched, counted once each
            METRICS.dnsbl_hits.labels(list=domain).inc()
        found = dnsbl_result(score, self.cfg.dnsbl, s.peer)
        if found.outcome is Outcome.PASS and (score.hits or score.failed):
            log.info("%s", found.reason)  # which lists answered (a failure logs its own line)
        if found.verdict.action is not Action.PASS:
            return await self._protocol_test(s, found, score.ttl)
        self._count(found)
        s.dnswl = True
        s.todo = frozenset()
        self._pass_new(s)
        return CONTINUE

    def _keep(self, s: Session, found: Result) -> Verdict:
        """Record *found* and keep a REJECT/DEFER for RCPT whatever
        delay_reject says (postscreen's enforce; smtpd's client restrictions
        answered at RCPT); DROP acts now."""
        self._record(s, found, "connect")
        v = found.verdict
        if v.action in (Action.REJECT, Action.DEFER):
            s.delayed.setdefault("connect", v)
        return v if v.action is Action.DROP else CONTINUE

    # The state store fails open: an unreachable store must not refuse mail.
    # No cache means every test runs (as for a new client); no rate means no
    # rate limit; a lost cache write means the client is tested again.

    async def _get_cache(self, ip: str) -> dict[str, float]:
        try:
            return await self.store.get_cache(ip)
        except Exception as exc:
            METRICS.store_errors.labels(operation="cache_get").inc()
            log.warning("state store: allowlist cache lookup for %s failed, running all tests: %s", ip, exc)
            return {}

    async def _hot_pass(self, ip: str) -> bool:
        """Is *ip* PASS OLD in the hot set?  Reads the store's invalidation
        tag first when it is due (once a second at most); a store that
        cannot say empties the set, and the store is asked as before."""
        hot, now = self.hot, self.clock()
        if not len(hot):
            return False
        if now >= hot.next_check:
            try:
                hot.version(await self.store.cache_version(), now)
            except Exception:  # the store read that follows logs and counts it
                hot.version(object(), now)
                return False
        return hot.passed(ip, now)

    async def _put_cache(self, ip: str, test: str, expiry: float) -> None:
        """A pass goes off the reply path, to the store's background writer
        (dropped and counted when its queue is full); a failure is written
        now (within the session's store deadline), so that the next
        connection cannot be answered PASS OLD.  The hot set forgets *ip*
        either way (a pass is read back from the store at the next
        connection)."""
        self.hot.forget(ip)
        if expiry > self.clock():
            self.store.put_cache_later(ip, {test: expiry})
            return
        try:
            await self.store.put_cache(ip, {test: expiry})
        except StoreError as exc:
            METRICS.store_errors.labels(operation="cache_put").inc()
            log.warning("state store: allowlist cache update for %s failed: %s", ip, exc)

    async def hit_rate(self, key: str, window: float) -> int:
        """Count a hit of rate counter *key* (``conn:ADDR``, the policy
        service's ``sender:ADDRESS``), 0 when the store cannot say."""
        try:
            return await self.store.hit_rate(key, window)
        except Exception as exc:
            METRICS.store_errors.labels(operation="rate").inc()
            log.warning("state store: rate for %s unknown, not limited: %s", key, exc)
            return 0

    async def cached_pass(self, ip: str, test: str) -> bool:
        """May *ip* skip *test* by the allowlist cache, as postscreen's
        temporary allowlist lets it: PASS OLD (the hot set, or every enabled
        test unexpired in the store; remembered in the hot set), or *test*'s
        own entry unexpired.  For the policy service, which has no session."""
        if await self._hot_pass(ip):
            return True
        cache = await self._get_cache(ip)
        if not cache:
            return False
        now = self.clock()
        enabled = self._cacheable
        if enabled and all(cache.get(t, 0.0) > now for t in enabled):
            self.hot.remember(ip, min(cache[t] for t in enabled), now)
            return True
        return cache.get(test, 0.0) > now

    def _pass_new(self, s: Session) -> None:
        if not s.todo and not s.failed:
            log.info("PASS NEW %s", s.peer)
            METRICS.allowlist_cache.labels(result="pass_new").inc()

    def _decide_all(self, s: Session, results: list[Result], phase: str) -> Verdict:
        """:meth:`_decide` each of *results* (checks run in parallel) in
        order, up to the first that decides."""
        for found in results:
            v = self._decide(s, found, phase)
            if v.final or phase in s.delayed:
                return v
        return CONTINUE

    def _decide(self, s: Session, found: Result, phase: str) -> Verdict:
        """Record *found* and turn its verdict into what happens now."""
        self._record(s, found, phase)
        v = found.verdict
        if (v.action in (Action.REJECT, Action.DEFER) and phase != "rcpt"
                and self.cfg.screen.delay_reject and found.check not in _IMMEDIATE):
            s.delayed.setdefault(phase, v)
            return CONTINUE
        return v

    def _count(self, found: Result) -> None:
        key = (found.check, found.outcome)
        counter = self._counters.get(key)
        if counter is None:  # labels() is slow: keep the children
            counter = self._counters[key] = METRICS.check_results.labels(mode="frontend", check=found.check,
                                                                          outcome=found.outcome.value)
        counter.inc()

    def _record(self, s: Session, found: Result, phase: str) -> None:
        """Count every result; log every failure once, as postscreen/smtpd would."""
        self._count(found)
        if found.outcome is not Outcome.FAIL:
            self._warn(s, found, phase)
            return
        s.results.append(found)
        METRICS.screening_verdicts.labels(check=found.check, action=found.verdict.action.value).inc()
        if found.check in _OWN_LINE:
            log.info("%s", found.reason)
        elif found.check in _WARNING_LINE:
            log.warning("%s", found.reason)
        elif found.verdict.action is Action.CONTINUE:  # action = ignore: warn_if_reject
            log.info("%s", logs.noqueue(found.reason, _stage(s, phase), s.who, s.sender, None, s.proto, s.helo,
                                        "reject_warning"))

    def _warn(self, s: Session, found: Result, phase: str) -> None:
        """An access table's ``WARN text``: smtpd's ``NOQUEUE: warn:`` line."""
        for warning in found.warnings:
            rcpt = warning.name if phase == "rcpt" else None
            log.info("%s", logs.noqueue(warning.text, _stage(s, phase), s.who, s.sender, rcpt, s.proto, s.helo,
                                        "warn"))


def _client_results(cfg: Config, found: ConnectFindings) -> list[Result]:
    """The client checks on the connect-time names: reject_unknown_(reverse_)client_hostname,
    then reject_rhsbl_reverse_client."""
    results = []
    if found.names is not None and cfg.client_name.enabled:
        results.append(check_client_names(found.names, cfg.client_name))
    if found.reverse_rhsbl is not None:
        results.append(found.reverse_rhsbl)
    return results


def _stage(s: Session, phase: str) -> str:
    if phase == "helo":
        return "EHLO" if s.esmtp else "HELO"
    return phase.upper()


def _utf8(s: Session) -> bool:
    return any(ascii_upper(p) == "SMTPUTF8" for p in s.mail_params)
