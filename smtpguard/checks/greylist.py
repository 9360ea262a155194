"""Greylisting at RCPT TO, with postgrey's semantics.

The reference is postgrey 1.37 (``postgrey`` in github.com/schweikert/postgrey,
``smtpd_access_policy``, ``do_sender_substitutions``,
``do_client_substitutions``, ``read_clients_whitelists``,
``read_recipients_whitelists``); each piece below names the routine it
follows and says where smtpguard deliberately differs.

How it works
------------
1. **Allowlists** (pure): a client whose verified reverse name or IP is in
   the client allowlist files (plus the shipped
   ``greylist_clients.default``), or a recipient in the recipient allowlist
   (``postmaster@`` and ``abuse@`` always), is not greylisted.
2. **Operator and auto-allowlist**: a network an operator allowlisted
   (``smtpguard greylist allow``, any prefix length, stored in the state
   store) skips greylisting; so does (postgrey's ``--auto-whitelist-clients``)
   a client network that passed greylisting ``auto_allowlist_clients``
   times, counted at most once an hour, while its record lives (``max_age``
   after the last count).
3. **Triplet** (pure :func:`decide` on the stored :class:`Triplet` and the
   time): key ``network/sender/recipient`` (:func:`triplet_key`); a new
   triplet, or a retry sooner than ``delay``, is deferred with ``450 4.2.0``;
   the first retry after ``delay`` and within ``retry_window`` passes and the
   triplet is then known for ``max_age`` after its last use.
4. :func:`check_greylist` is the only part that does I/O: it reads and
   writes the store around the pure parts and turns a
   :class:`~smtpguard.store.StoreError` into ``on_store_error``.

Timing (postgrey's, seconds from the first attempt ``first``)::

    new     early-retry      passed (first retry >= delay)     too late
    |-------- delay --------|--------- ... --------------------|------->
    0                     delay                         retry_window
    deferred (450)                    accepted                 restarts as new

A passed triplet stays known while used at least once every ``max_age``.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..metrics import METRICS
from ..net import IPAddress, IPNetwork, client_network, valid_hostname
from ..options import ConfigError, one_of, opt, parse_bool, parse_duration, parse_int, parse_str, warn
from ..store import ClientNet, Store, StoreError, Triplet
from ..verdict import CONTINUE, Outcome, Reply, Result, verdict_for

CHECK = "greylist"

#: postgrey counts at most one pass per client and hour for the auto-allowlist
AWL_INTERVAL = 3600.0
#: a known triplet's last_seen is rewritten at most this often (see decide())
REFRESH_INTERVAL = 3600.0

#: postgrey's default --greylist-text; %s = seconds left, %r = recipient domain
DEFAULT_TEXT = "Greylisted, see http://postgrey.schweikert.ch/help/%r.html"


# ------------------------------------------------------------------ keys


_SRS0 = re.compile(r"srs0[=+-][^=]*=[^=]*=([^=]+)=(.+)")
_SRS1 = re.compile(r"srs1[=+-][^=]*=[^=]+=[=+-][^=]*=[^=]*=([^=]+)=(.+)")
_BTV1 = re.compile(r"btv1==[^=]+==(.+)")
_BATV_TAG = re.compile(r"[0-9a-z]{10}")
_VERP_NUMBER = re.compile(r"\b\d+\b", re.ASCII)


def normalize_sender(sender: str) -> str:
    """The sender part of the key, following postgrey's ``do_sender_substitutions``.

    Lower-cased, then, on the local part:

    * SRS (smtpguard addition, not in postgrey): ``SRS0=hash=tt=dom=local@fwd``
      and ``SRS1=hash=fwd1==hash=tt=dom=local@fwd`` become ``local@dom``, so a
      forwarded sender keeps one key although the forwarder re-signs daily;
    * BATV, as postgrey: ``prvs=tag=local`` (or the swapped ``prvs=local=tag``)
      becomes ``local``: of the two fields the one that does *not* start with
      10 of ``[0-9a-z]`` is the local part; if both or neither do, the third;
    * Barracuda's ``btv1==tag==local`` (smtpguard addition) becomes ``local``;
    * as postgrey: ``+extension`` is stripped (``s/\\+.*//``) and every number
      standing alone between word boundaries becomes ``#`` (``s/\\b\\d+\\b/#/g``:
      ``bounce-123-456`` -> ``bounce-#-#``, but ``user42`` stays).

    postgrey lower-cases the whole key *after* substituting, so its BATV test
    misses an upper-case ``PRVS=``; lower-casing first catches it.  An address
    without ``@`` (the null sender ``<>`` is ``""``) is only lower-cased.
    """
    user, at, domain = sender.lower().partition("@")
    if not at:
        return user
    srs = _SRS0.fullmatch(user) or _SRS1.fullmatch(user)
    if srs:
        domain, user = srs.group(1), srs.group(2)
    if user.startswith("prvs="):
        fields = user.split("=")
        while fields and not fields[-1]:  # Perl's split drops trailing empty fields
            fields.pop()
        if len(fields) == 3:
            tag1, tag2 = bool(_BATV_TAG.match(fields[1])), bool(_BATV_TAG.match(fields[2]))
            user = fields[1] if tag2 and not tag1 else fields[2]
    elif btv := _BTV1.fullmatch(user):
        user = btv.group(1)
    user = _VERP_NUMBER.sub("#", user.split("+", 1)[0])
    return f"{user}@{domain}"


def triplet_key(network: str, sender: str, recipient: str) -> str:
    """``network/sender/recipient``, lower-cased, as postgrey's key (without
    ``--privacy``'s hashing)."""
    return f"{network}/{normalize_sender(sender)}/{recipient}".lower()


# ------------------------------------------------------------ allowlists


def _entries(text: str, source: str) -> Iterator[tuple[str, str]]:
    """(``source:line``, entry) for each non-empty line; as postgrey, ``#``
    starts a comment anywhere on a line."""
    for number, line in enumerate(text.splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if entry:
            yield f"{source}:{number}", entry


def _regexp(entry: str, where: str) -> re.Pattern[str] | None:
    """A ``/regexp/`` entry, case-insensitive as postgrey's ``qr{$1}i``."""
    if not (len(entry) > 2 and entry.startswith("/") and entry.endswith("/")):
        return None
    try:
        return re.compile(entry[1:-1], re.IGNORECASE)
    except re.error as exc:
        raise ValueError(f"{where}: bad regular expression {entry}: {exc}") from None


_PARTIAL_IPV4 = re.compile(r"\d{1,3}(\.\d{1,3}){0,2}\.?")  # postgrey's 192.0.2 and 192.0.2. (/24)


def _suffixes(name: str) -> Iterator[str]:
    """``a.b.c`` -> ``a.b.c``, ``b.c``, ``c``."""
    labels = name.split(".")
    return (".".join(labels[i:]) for i in range(len(labels)))


@dataclass(frozen=True)
class ClientAllowlist:
    """postgrey's client whitelist (``read_clients_whitelists``).

    Entries: ``/regexp/`` (searched in the reverse name, case-insensitive);
    an IPv4 or IPv6 address or network (``192.0.2.1``, ``192.0.2.0/24``,
    ``2001:db8::/32``); a partial IPv4 address (``192.0.2`` = /24,
    ``192.0`` = /16, ``192`` = /8); otherwise a domain name matching itself
    and every name below it.  Names and regexps are matched against the
    client's *verified* reverse name only; an unverified client
    (``"unknown"`` or ``""``) can match by address alone.  A line that is
    none of these is an error (postgrey only warns).
    """

    sources: tuple[str, ...] = ()
    names: frozenset[str] = frozenset()
    patterns: tuple[re.Pattern[str], ...] = ()
    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, text: str, source: str) -> ClientAllowlist:
        names: set[str] = set()
        patterns: list[re.Pattern[str]] = []
        networks: list[IPNetwork] = []
        for where, entry in _entries(text, source):
            pattern = _regexp(entry, where)
            if pattern is not None:
                patterns.append(pattern)
            elif _PARTIAL_IPV4.fullmatch(entry):
                octets = entry.rstrip(".").split(".")
                networks.append(_network(".".join(octets + ["0"] * (4 - len(octets))) + f"/{8 * len(octets)}", where))
            elif re.fullmatch(r"[\d./]+", entry) or ":" in entry:
                networks.append(_network(entry, where))
            elif valid_hostname(entry.lower().strip("."), lengths=False, numeric=True):
                names.add(entry.lower().strip("."))
            else:
                raise ValueError(f"{where}: not a host name, IP address, network or /regexp/: {entry}")
        return cls((source,), frozenset(names), tuple(patterns), tuple(networks))

    def __add__(self, other: ClientAllowlist) -> ClientAllowlist:
        return ClientAllowlist(
            self.sources + other.sources,
            self.names | other.names,
            self.patterns + other.patterns,
            self.networks + other.networks,
        )

    def match(self, ip: IPAddress, name: str) -> bool:
        if any(ip in net for net in self.networks):
            return True
        name = name.lower().rstrip(".")
        if name in ("", "unknown"):
            return False
        return any(s in self.names for s in _suffixes(name)) or any(p.search(name) for p in self.patterns)


def _network(text: str, where: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError as exc:
        raise ValueError(f"{where}: bad IP address or network: {exc}") from None


@dataclass(frozen=True)
class RecipientAllowlist:
    """postgrey's recipient whitelist (``read_recipients_whitelists``).

    Entries, with postfix access(5) syntax: ``domain`` (the domain and every
    domain below it), ``user@`` (that user in any domain), ``user@domain``;
    ``user`` also matches ``user+extension``; ``/regexp/`` is searched in the
    whole address, case-insensitive.  ``postmaster@`` and ``abuse@`` are
    always in (postgrey ships them in its default file).
    """

    sources: tuple[str, ...] = ()
    domains: frozenset[str] = frozenset()
    users: frozenset[str] = frozenset({"postmaster", "abuse"})
    addresses: frozenset[str] = frozenset()
    patterns: tuple[re.Pattern[str], ...] = ()

    @classmethod
    def parse(cls, text: str, source: str) -> RecipientAllowlist:
        domains: set[str] = set()
        users: set[str] = set()
        addresses: set[str] = set()
        patterns: list[re.Pattern[str]] = []
        for where, entry in _entries(text, source):
            pattern = _regexp(entry, where)
            entry = entry.lower()
            user, at, domain = entry.partition("@")
            if pattern is not None:
                patterns.append(pattern)
            elif re.search(r"\s", entry) or (at and not user):
                raise ValueError(f"{where}: not a domain, user@, user@domain or /regexp/: {entry}")
            elif at and domain:
                addresses.add(entry)
            elif at:
                users.add(user)
            else:
                domains.add(entry.strip("."))
        return cls((source,), frozenset(domains), frozenset(users), frozenset(addresses), tuple(patterns))

    def __add__(self, other: RecipientAllowlist) -> RecipientAllowlist:
        return RecipientAllowlist(
            self.sources + other.sources,
            self.domains | other.domains,
            self.users | other.users,
            self.addresses | other.addresses,
            self.patterns + other.patterns,
        )

    def match(self, recipient: str) -> bool:
        local, at, domain = recipient.lower().rpartition("@")
        if not at:  # RCPT TO:<postmaster> has no domain
            local, domain = domain, ""
        # "user" matches "user" and "user+anything" (postgrey: user(?:\+[^@]+)?)
        bases = {local} | {local[:i] for i, c in enumerate(local) if c == "+"}
        return (
            any(s in self.domains for s in _suffixes(domain))
            or not bases.isdisjoint(self.users)
            or any(f"{b}@{domain}" in self.addresses for b in bases)
            or any(p.search(recipient) for p in self.patterns)
        )


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None


def _paths(value: Any) -> tuple[str, ...]:
    if value == "":
        return ()
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
        raise ValueError(f"expected a list of file names, got {value!r}")
    return tuple(value)


def parse_client_allowlist(value: Any) -> ClientAllowlist:
    """Config parser: file name(s) -> the loaded :class:`ClientAllowlist`;
    an error names the file and line."""
    lists = [ClientAllowlist.parse(_read(p), p) for p in _paths(value)]
    return sum(lists, ClientAllowlist())


def parse_recipient_allowlist(value: Any) -> RecipientAllowlist:
    """Config parser: file name(s) -> the loaded :class:`RecipientAllowlist`
    (always including ``postmaster@`` and ``abuse@``)."""
    lists = [RecipientAllowlist.parse(_read(p), p) for p in _paths(value)]
    return sum(lists, RecipientAllowlist())


@functools.cache
def default_client_allowlist() -> ClientAllowlist:
    """The shipped ``greylist_clients.default`` (package data)."""
    text = resources.files(__name__.rpartition(".")[0]).joinpath("greylist_clients.default").read_text(encoding="utf-8")
    return ClientAllowlist.parse(text, "greylist_clients.default")


# ---------------------------------------------------------------- config


def _mask(bits: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        mask = parse_int(value)
        if not 0 < mask <= bits:
            raise ValueError(f"expected a prefix length 1-{bits}, got {mask}")
        return mask

    return parse


def parse_postgrey_days(value: Any) -> float:
    """A duration; a bare number up to 365 warns: postgrey counts
    ``--retry-window`` and ``--max-age`` in days, smtpguard in seconds."""
    seconds = parse_duration(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 365:
        warn(f'{value:g} is {value:g} seconds; postgrey counts this option in days: '
             f'write "{value:g}d" for {value:g} days')
    return seconds


def _text(value: Any) -> str:
    text = parse_str(value)
    if not text.strip() or "\r" in text or "\n" in text:
        raise ValueError("expected one non-empty line of text")
    return text


@dataclass(frozen=True)
class GreylistConfig:
    """``[greylist]``; each key's metadata names its postgrey option."""

    # Off by default, as postgrey is until check_policy_service names it:
    # turning it on delays every new sender by `delay`.
    enabled: bool = field(
        default=False,
        metadata=opt(parse_bool, "check_policy_service inet:127.0.0.1:10023 in smtpd_recipient_restrictions"),
    )
    action: str = field(
        default="tempfail",
        metadata=opt(one_of("tempfail", "ignore"), "--greylist-action=DEFER_IF_PERMIT; ignore = log only"),
    )
    delay: float = field(default=300.0, metadata=opt(parse_duration, "--delay=300"))
    retry_window: float = field(default=2 * 86400.0, metadata=opt(parse_postgrey_days, "--retry-window=2"))
    max_age: float = field(default=35 * 86400.0, metadata=opt(parse_postgrey_days, "--max-age=35"))
    ipv4_mask: int = field(default=24, metadata=opt(_mask(32), "--ipv4cidr=24 (32 = --lookup-by-host)"))
    ipv6_mask: int = field(default=64, metadata=opt(_mask(128), "--ipv6cidr=64 (128 = --lookup-by-host)"))
    auto_allowlist_clients: int = field(default=5, metadata=opt(parse_int, "--auto-whitelist-clients=5 (0 = off)"))
    text: str = field(
        default=DEFAULT_TEXT, metadata=opt(_text, "--greylist-text (%s = seconds left, %r = recipient domain)")
    )
    client_allowlist: ClientAllowlist = field(
        default=ClientAllowlist(), metadata=opt(parse_client_allowlist, "--whitelist-clients=FILE")
    )
    recipient_allowlist: RecipientAllowlist = field(
        default=RecipientAllowlist(), metadata=opt(parse_recipient_allowlist, "--whitelist-recipients=FILE")
    )
    use_default_client_allowlist: bool = field(
        default=True, metadata=opt(parse_bool, "the whitelist_clients file shipped with postgrey")
    )
    spf_key: bool = field(
        default=False,
        metadata=opt(
            parse_bool,
            "none (postgrey keys by client network only)",
            "on an SPF pass the triplet's client part is the sender's domain, not the client network",
        ),
    )
    on_store_error: str = field(
        default="accept",
        metadata=opt(
            one_of("accept", "tempfail"),
            "smtpd_policy_service_default_action (Postfix's answer when postgrey is unreachable: 451 4.3.5)",
        ),
    )

    def validate(self) -> None:
        if self.retry_window <= self.delay:
            raise ConfigError("retry_window", f"must be longer than delay ({self.delay:g}s)")
        if self.max_age < self.retry_window:
            raise ConfigError("max_age", "must not be shorter than retry_window")


# -------------------------------------------------------------- decision


class State(enum.Enum):
    NEW = "new"  # never seen (or forgotten): deferred
    EARLY = "early-retry"  # retried before delay: deferred
    TOO_LATE = "too-late"  # first retry after retry_window: restarted, deferred
    EXPIRED = "expired"  # passed once but unused for max_age: restarted, deferred
    PASSED = "passed"  # first retry after delay: accepted
    KNOWN = "known"  # passed before: accepted

    @property
    def deferred(self) -> bool:
        return self not in (State.PASSED, State.KNOWN)


@dataclass(frozen=True)
class Decision:
    state: State
    entry: Triplet | None  # what to store; None = leave the stored entry as is
    wait: float  # seconds still to wait (deferred states)
    delayed: float  # seconds since the first attempt

    @property
    def reason(self) -> str:
        if self.state is State.EARLY:
            return f"early retry ({math.ceil(self.wait)}s missing)"
        if self.state is State.PASSED:
            return f"triplet passed, delayed {self.delayed:.0f}s"
        return _REASONS[self.state]


_REASONS = {
    State.NEW: "new triplet",
    State.TOO_LATE: "first retry after retry_window: greylisted again",
    State.EXPIRED: "triplet unused for max_age: greylisted again",
    State.KNOWN: "triplet known",
}


def decide(entry: Triplet | None, now: float, cfg: GreylistConfig) -> Decision:
    """postgrey's ``smtpd_access_policy`` triplet logic, without I/O.

    *entry* is the stored triplet or None.  The entry to store expires
    ``retry_window`` after the last attempt while not yet passed and
    ``max_age`` after the last use once passed (postgrey's nightly
    ``do_maintenance`` rules).  A first-seen time in the future (clock
    skew between nodes, postgrey 1.34) is taken as now.

    Unlike postgrey, a known triplet's ``last_seen`` is rewritten only when
    it is more than :data:`REFRESH_INTERVAL` old (``entry`` None otherwise):
    it then expires at most an hour early, and a busy sender's repeat mail
    costs a read instead of a write.
    """
    if entry is not None and entry.passed_at is not None:
        if now - entry.last_seen > cfg.max_age:
            return _restart(State.EXPIRED, now, cfg)
        stale = now - entry.last_seen >= REFRESH_INTERVAL or entry.last_seen > now
        keep = Triplet(entry.first_seen, now, entry.passed_at, now + cfg.max_age) if stale else None
        return Decision(State.KNOWN, keep, 0.0, now - entry.first_seen)
    if entry is None:
        return _restart(State.NEW, now, cfg)
    first = min(entry.first_seen, now)
    if now - first > cfg.retry_window:
        return _restart(State.TOO_LATE, now, cfg)
    waited = now - first
    if waited < cfg.delay:
        return Decision(State.EARLY, Triplet(first, now, None, now + cfg.retry_window), cfg.delay - waited, waited)
    return Decision(State.PASSED, Triplet(first, now, now, now + cfg.max_age), 0.0, waited)


def _restart(state: State, now: float, cfg: GreylistConfig) -> Decision:
    return Decision(state, Triplet(now, now, None, now + cfg.retry_window), cfg.delay, 0.0)


def count_client(entry: ClientNet | None, now: float, cfg: GreylistConfig) -> ClientNet | None:
    """Count one greylist pass (or one use of the auto-allowlist) for a
    client network, at most one per :data:`AWL_INTERVAL`, as postgrey does
    for ``--auto-whitelist-clients``; None when this one is not counted.
    The record then lives ``max_age`` after this count."""
    if entry is not None and entry.last_counted <= now < entry.last_counted + AWL_INTERVAL:
        return None
    count = 1 if entry is None else entry.count + 1
    return ClientNet(count, now, now + cfg.max_age)


def auto_allowlisted(entry: ClientNet | None, cfg: GreylistConfig) -> bool:
    return cfg.auto_allowlist_clients > 0 and entry is not None and entry.count >= cfg.auto_allowlist_clients


def client_exempt(cfg: GreylistConfig, ip: IPAddress, client_name: str) -> bool:
    """The client is on a client allowlist (with ``client_name`` "" or
    "unknown": by its address alone)."""
    return cfg.client_allowlist.match(ip, client_name) or (
        cfg.use_default_client_allowlist and default_client_allowlist().match(ip, client_name)
    )


def allowlisted(cfg: GreylistConfig, ip: IPAddress, client_name: str, recipient: str) -> str | None:
    """Why this client or recipient is not greylisted, or None."""
    if client_exempt(cfg, ip, client_name):
        return "client allowlist"
    if cfg.recipient_allowlist.match(recipient):
        return "recipient allowlist"
    return None


def greylist_text(cfg: GreylistConfig, recipient: str, wait: float) -> str:
    """``text`` with postgrey's ``%s`` (seconds left) and ``%r`` (recipient domain)."""
    return cfg.text.replace("%s", str(math.ceil(wait))).replace("%r", recipient.rpartition("@")[2])


def greylist_reply(cfg: GreylistConfig, recipient: str, wait: float) -> Reply:
    """Postfix's form of postgrey's DEFER_IF_PERMIT:
    ``450 4.2.0 <rcpt>: Recipient address rejected: Greylisted, see ...``."""
    return Reply(450, "4.2.0", f"<{recipient}>: Recipient address rejected: {greylist_text(cfg, recipient, wait)}")


# ------------------------------------------------------------------ check


async def check_greylist(
    store: Store,
    cfg: GreylistConfig,
    ip: IPAddress,
    client_name: str,
    sender: str,
    recipient: str,
    now: float,
    mode: str = "frontend",
    client_part: str | None = None,
) -> tuple[Result, Decision | None]:
    """Greylist one recipient: its Result, and the triplet's
    :class:`Decision` (None when no triplet was decided: allowlisted,
    skipped, store failure), for the policy service's ``%s`` and
    ``X-Greylist`` header.

    *client_name* is the client's verified (forward-confirmed) reverse name,
    or ``"unknown"``/``""``; *sender* is ``""`` for the null sender; *mode*
    labels the metric (``frontend`` or ``policy``).  *client_part* replaces
    the client network in the triplet's key (the SPF-validated sender
    domain, ``spf_key``); the auto-allowlist still counts the client network.
    """
    if not cfg.enabled:
        return Result(CHECK, Outcome.SKIP, "disabled"), None
    why = allowlisted(cfg, ip, client_name, recipient)
    if why:
        METRICS.greylist.labels(mode=mode, outcome="allowlisted").inc()
        return Result(CHECK, Outcome.PASS, why), None
    network = client_network(ip, cfg.ipv4_mask, cfg.ipv6_mask)
    key = triplet_key(client_part or network, sender, recipient)
    try:
        entry, client, allowed = await store.get_greylist_allowed(key, network, ip)
        if allowed is not None:
            METRICS.greylist.labels(mode=mode, outcome="allowlisted").inc()
            return Result(CHECK, Outcome.PASS, f"client allowlisted by operator ({allowed})"), None
        if not cfg.auto_allowlist_clients:
            client = None
        if auto_allowlisted(client, cfg):
            if counted := count_client(client, now, cfg):
                await store.put_client(network, counted)
            METRICS.greylist.labels(mode=mode, outcome="allowlisted").inc()
            return Result(CHECK, Outcome.PASS, "client auto-allowlisted"), None
        decision = decide(entry, now, cfg)
        if decision.entry is not None:
            await store.put_triplet(key, decision.entry)
        passed = decision.state is State.PASSED and cfg.auto_allowlist_clients
        if passed and (counted := count_client(client, now, cfg)):
            await store.put_client(network, counted)
    except StoreError as exc:
        METRICS.store_errors.labels(operation="greylist").inc()
        return _store_failed(cfg, recipient, exc), None
    METRICS.greylist.labels(mode=mode, outcome=_METRIC_OUTCOME[decision.state]).inc()
    if decision.state.deferred:
        reply = greylist_reply(cfg, recipient, decision.wait)
        return Result(CHECK, Outcome.FAIL, decision.reason, verdict_for(cfg.action, reply)), decision
    return Result(CHECK, Outcome.PASS, decision.reason), decision


# smtpguard_greylist_total{mode,outcome}: a triplet greylisted (again) is
# "new", its first pass "passed", a pass of a triplet that passed before
# "known", so passed / new is the pass rate (smtpguard report's figure).
_METRIC_OUTCOME = {State.NEW: "new", State.TOO_LATE: "new", State.EXPIRED: "new", State.EARLY: "early_retry",
                   State.PASSED: "passed", State.KNOWN: "known"}


def _store_failed(cfg: GreylistConfig, recipient: str, exc: StoreError) -> Result:
    """``on_store_error``: accept the recipient, or defer it like Postfix
    does on a failed table lookup (``451 4.3.0 ... Temporary lookup failure``)."""
    verdict = CONTINUE
    if cfg.on_store_error == "tempfail":
        failure = Reply(451, "4.3.0", f"<{recipient}>: Temporary lookup failure")
        verdict = verdict_for(cfg.action, failure, as_given=True)
    return Result(CHECK, Outcome.SKIP, f"state store failed ({exc}): {cfg.on_store_error}", verdict)
