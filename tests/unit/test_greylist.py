"""Greylisting: key building and sender normalisation (postgrey's cases),
the delay / retry-window / max-age timing on a fake clock, the auto-allowlist
and the allowlist files."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest

from smtpguard.checks.greylist import (
    AWL_INTERVAL,
    DEFAULT_TEXT,
    REFRESH_INTERVAL,
    ClientAllowlist,
    GreylistConfig,
    RecipientAllowlist,
    State,
    check_greylist,
    client_network,
    count_client,
    decide,
    default_client_allowlist,
    greylist_reply,
    normalize_sender,
    triplet_key,
)
from smtpguard.config import ConfigError, load_section
from smtpguard.metrics import GREYLIST_OUTCOMES, METRICS
from smtpguard.net import parse_ip
from smtpguard.policy.protocol import PolicyRequest
from smtpguard.store import ClientNet, Store, StoreError, Triplet, open_store
from smtpguard.store.base import Kind, Row
from smtpguard.store.memory import MemoryStore
from smtpguard.verdict import Action, Outcome, Reply, Result

T0 = 1_700_000_000.0
CFG = GreylistConfig(enabled=True)
DELAY, WINDOW, MAX_AGE = CFG.delay, CFG.retry_window, CFG.max_age


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


# ------------------------------------------------------------------- keys


@pytest.mark.parametrize(
    ("sender", "expected"),
    [
        ("Alice@Example.ORG", "alice@example.org"),
        ("", ""),  # the null sender <>
        ("MAILER-DAEMON", "mailer-daemon"),  # no domain: only lower-cased
        # postgrey: strip +extension (s/\+.*//)
        ("alice+list-foo@example.org", "alice@example.org"),
        ("a+b+c@example.org", "a@example.org"),
        # postgrey: numbers between word boundaries -> # (s/\b\d+\b/#/g)
        ("bounce-123-456@lists.example.org", "bounce-#-#@lists.example.org"),
        ("123@example.org", "#@example.org"),
        ("news.2024.07@example.org", "news.#.#@example.org"),
        ("user42@example.org", "user42@example.org"),  # no word boundary
        ("user_42@example.org", "user_42@example.org"),  # _ is a word character
        ("bounces+1234-abc@example.org", "bounces@example.org"),
        # postgrey: BATV prvs=tag-val=loc-core and the swapped form
        ("prvs=0123456789=alice@example.org", "alice@example.org"),
        ("prvs=alice=0123456789@example.org", "alice@example.org"),
        ("prvs=1234567890=bob-99@example.org", "bob-#@example.org"),
        ("prvs=0123456789=longlocalpart@example.org", "longlocalpart@example.org"),  # both tag-like: third
        ("prvs=a=b=c@example.org", "prvs=a=b=c@example.org"),  # not three fields: unchanged
        ("PRVS=0123456789=Alice@Example.org", "alice@example.org"),  # smtpguard: case-insensitive
        # smtpguard additions: Barracuda btv1 and SRS
        ("btv1==0a8e9b1c3b6==alice@example.org", "alice@example.org"),
        ("SRS0=HHH=TT=orig.example=alice@forwarder.example", "alice@orig.example"),
        ("SRS0+x/y+=AB=orig.example=a=b@forwarder.example", "a=b@orig.example"),
        ("SRS1=HHH=first.example==HHH=TT=orig.example=alice@second.example", "alice@orig.example"),
        ("SRS0=1v/+=PN=epam.com=prvs=0932af52eb=oleksandr@srs.example", "oleksandr@epam.com"),
        ("srs0=notenough@example.org", "srs0=notenough@example.org"),
    ],
)
def test_normalize_sender(sender: str, expected: str) -> None:
    assert normalize_sender(sender) == expected


@pytest.mark.parametrize(
    ("client", "v4", "v6", "expected"),
    [
        ("192.0.2.77", 24, 64, "192.0.2.0"),
        ("192.0.2.77", 32, 64, "192.0.2.77"),  # --lookup-by-host
        ("192.0.2.77", 16, 64, "192.0.0.0"),
        ("2001:db8:1:2:3:4:5:6", 24, 64, "2001:db8:1:2::"),
        ("2001:db8:1:2:3:4:5:6", 24, 48, "2001:db8:1::"),
        ("2001:db8:1:2:3:4:5:6", 24, 128, "2001:db8:1:2:3:4:5:6"),
        ("::ffff:192.0.2.77", 24, 64, "192.0.2.0"),  # IPv4-mapped counts as IPv4
    ],
)
def test_client_network(client: str, v4: int, v6: int, expected: str) -> None:
    assert client_network(ip(client), v4, v6) == expected


def test_triplet_key_is_lower_case_network_sender_recipient() -> None:
    assert (
        triplet_key("192.0.2.0", "Bounce-17+x@Lists.Example.ORG", "Bob@Example.NET")
        == "192.0.2.0/bounce-#@lists.example.org/bob@example.net"
    )
    assert triplet_key("192.0.2.0", "", "bob@example.net") == "192.0.2.0//bob@example.net"


# --------------------------------------------------------------- decide()


def test_first_attempt_is_new_and_deferred() -> None:
    d = decide(None, T0, CFG)
    assert (d.state, d.wait, d.state.deferred) == (State.NEW, DELAY, True)
    assert d.entry == Triplet(T0, T0, None, T0 + WINDOW)


def test_early_retry_is_deferred_for_the_rest_of_the_delay() -> None:
    d = decide(Triplet(T0, T0, None, T0 + WINDOW), T0 + 100, CFG)
    assert (d.state, d.wait) == (State.EARLY, DELAY - 100)
    assert d.reason == "early retry (200s missing)"
    assert d.entry == Triplet(T0, T0 + 100, None, T0 + 100 + WINDOW)


def test_retry_after_the_delay_passes() -> None:
    d = decide(Triplet(T0, T0 + 100, None, T0 + 100 + WINDOW), T0 + DELAY, CFG)
    assert (d.state, d.state.deferred, d.reason) == (State.PASSED, False, "triplet passed, delayed 300s")
    assert d.entry == Triplet(T0, T0 + DELAY, T0 + DELAY, T0 + DELAY + MAX_AGE)


def test_known_triplet_passes_and_is_refreshed_at_most_hourly() -> None:
    known = Triplet(T0, T0 + DELAY, T0 + DELAY, T0 + DELAY + MAX_AGE)
    soon = decide(known, T0 + DELAY + 60, CFG)
    assert (soon.state, soon.entry) == (State.KNOWN, None)  # nothing to write
    later = T0 + DELAY + REFRESH_INTERVAL
    d = decide(known, later, CFG)
    assert (d.state, d.entry) == (State.KNOWN, Triplet(T0, later, T0 + DELAY, later + MAX_AGE))


def test_retry_after_the_retry_window_starts_over() -> None:
    pending = Triplet(T0, T0 + 60, None, T0 + 60 + WINDOW)
    assert decide(pending, T0 + WINDOW, CFG).state is State.PASSED  # last second of the window
    d = decide(pending, T0 + WINDOW + 1, CFG)
    assert (d.state, d.wait) == (State.TOO_LATE, DELAY)
    assert d.entry == Triplet(T0 + WINDOW + 1, T0 + WINDOW + 1, None, T0 + WINDOW + 1 + WINDOW)


def test_known_triplet_unused_for_max_age_starts_over() -> None:
    known = Triplet(T0, T0 + DELAY, T0 + DELAY, T0 + DELAY + MAX_AGE)
    assert decide(known, T0 + DELAY + MAX_AGE, CFG).state is State.KNOWN
    d = decide(known, T0 + DELAY + MAX_AGE + 1, CFG)
    assert (d.state, d.state.deferred) == (State.EXPIRED, True)


def test_first_seen_in_the_future_is_taken_as_now() -> None:
    d = decide(Triplet(T0 + 1000, T0 + 1000, None, T0 + WINDOW), T0, CFG)
    assert (d.state, d.wait) == (State.EARLY, DELAY)


# ------------------------------------------------------------- auto-allowlist


def test_count_client_counts_at_most_once_an_hour() -> None:
    first = count_client(None, T0, CFG)
    assert first == ClientNet(1, T0, T0 + MAX_AGE)
    assert count_client(first, T0 + AWL_INTERVAL - 1, CFG) is None
    assert count_client(first, T0 + AWL_INTERVAL, CFG) == ClientNet(2, T0 + AWL_INTERVAL, T0 + AWL_INTERVAL + MAX_AGE)
    assert count_client(ClientNet(3, T0 + 5000, T0 + MAX_AGE), T0, CFG) == ClientNet(4, T0, T0 + MAX_AGE)  # skew


# ------------------------------------------------------------ check_greylist


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


async def greylist(store: Store, clock: Clock, sender: str = "alice@example.org", rcpt: str = "Bob@Example.net",
                   client: str = "192.0.2.10", name: str = "unknown", cfg: GreylistConfig = CFG) -> Result:  # fmt: skip
    found, _ = await check_greylist(store, cfg, parse_ip(client), name, sender, rcpt, clock.now)
    return found


async def deliver_after_delay(store: Store, clock: Clock, sender: str, client: str = "192.0.2.10") -> None:
    """One message: greylisted, then passed when retried after the delay."""
    assert (await greylist(store, clock, sender=sender, client=client)).reason == "new triplet"
    clock.now += DELAY
    assert (await greylist(store, clock, sender=sender, client=client)).reason.startswith("triplet passed")


@pytest.mark.asyncio
async def test_check_greylist_sequence_and_reply() -> None:
    clock = Clock()
    store = await open_store("memory://", clock)
    new = await greylist(store, clock)
    assert (new.check, new.outcome, new.reason) == ("greylist", Outcome.FAIL, "new triplet")
    assert new.verdict.action is Action.DEFER
    assert new.verdict.reply == Reply(
        450,
        "4.2.0",
        "<Bob@Example.net>: Recipient address rejected: "
        "Greylisted, see http://postgrey.schweikert.ch/help/Example.net.html",
    )
    clock.now += 120
    assert (await greylist(store, clock)).reason == "early retry (180s missing)"
    clock.now += 180
    passed = await greylist(store, clock, client="192.0.2.99")  # same /24
    assert (passed.outcome, passed.reason) == (Outcome.PASS, "triplet passed, delayed 300s")
    assert not passed.verdict.final
    clock.now += 10
    assert (await greylist(store, clock, sender="alice+other@EXAMPLE.org")).reason == "triplet known"
    assert (await greylist(store, clock, client="192.0.3.10")).reason == "new triplet"  # other network
    assert await store.get_client("192.0.2.0") == ClientNet(1, T0 + DELAY, T0 + DELAY + MAX_AGE)


def outcomes() -> dict[str, float]:
    return {o: METRICS.registry.get_sample_value("smtpguard_greylist_total", {"mode": "frontend", "outcome": o}) or 0.0
            for o in GREYLIST_OUTCOMES}


@pytest.mark.asyncio
async def test_metric_outcomes_count_a_first_pass_apart_from_a_known_triplet() -> None:
    """passed / new is the pass rate: a known triplet must not count as passed."""
    clock = Clock()
    store = await open_store("memory://", clock)
    before = outcomes()
    await greylist(store, clock)  # new
    clock.now += 100
    await greylist(store, clock)  # early retry
    clock.now += DELAY
    await greylist(store, clock)  # passed (first pass)
    await greylist(store, clock)  # known
    await greylist(store, clock)  # known
    await greylist(store, clock, rcpt="postmaster@example.net")  # allowlisted
    after = outcomes()
    assert {o: after[o] - before[o] for o in after} == {
        "new": 1, "early_retry": 1, "passed": 1, "known": 2, "allowlisted": 1}


@pytest.mark.asyncio
async def test_text_substitutions_and_dry_run() -> None:
    clock = Clock()
    cfg = GreylistConfig(enabled=True, text="Try again in %s seconds (%r)", action="ignore")
    result = await greylist(await open_store("memory://", clock), clock, cfg=cfg)
    assert (result.outcome, result.verdict.final) == (Outcome.FAIL, False)  # logged, not enforced
    reply = greylist_reply(cfg, "Bob@Example.net", 299.5)
    assert reply.text == "<Bob@Example.net>: Recipient address rejected: Try again in 300 seconds (Example.net)"


@pytest.mark.asyncio
async def test_auto_allowlist_after_five_passes_counted_hourly() -> None:
    clock = Clock()
    store = await open_store("memory://", clock)
    for i in range(5):  # five messages passed within one hour count once
        await deliver_after_delay(store, clock, f"s{i}@example.org")
        clock.now += 60
    assert await store.get_client("192.0.2.0") == ClientNet(1, T0 + DELAY, T0 + DELAY + MAX_AGE)
    assert (await greylist(store, clock, sender="fresh@example.org")).outcome is Outcome.FAIL
    for i in range(4):  # four more passes, an hour apart
        clock.now += AWL_INTERVAL
        await deliver_after_delay(store, clock, f"hourly{i}@example.org", client="192.0.2.200")
    awl = await store.get_client("192.0.2.0")
    assert awl is not None and awl.count == 5
    allowed = await greylist(store, clock, sender="never-seen@example.org", client="192.0.2.3")
    assert (allowed.outcome, allowed.reason) == (Outcome.PASS, "client auto-allowlisted")
    assert await store.get_triplet(triplet_key("192.0.2.0", "never-seen@example.org", "bob@example.net")) is None
    clock.now += MAX_AGE - 1  # the record lives max_age after its last count
    assert (await greylist(store, clock, sender="n2@example.org")).reason == "client auto-allowlisted"
    clock.now += MAX_AGE + 1
    assert (await greylist(store, clock, sender="n3@example.org")).outcome is Outcome.FAIL


@pytest.mark.asyncio
async def test_auto_allowlist_off() -> None:
    clock = Clock()
    store = await open_store("memory://", clock)
    cfg = GreylistConfig(enabled=True, auto_allowlist_clients=0)
    await check_greylist(store, cfg, parse_ip("192.0.2.1"), "unknown", "a@x.org", "b@y.org", clock.now)
    clock.now += DELAY
    result, _ = await check_greylist(store, cfg, parse_ip("192.0.2.1"), "unknown", "a@x.org", "b@y.org", clock.now)
    assert result.outcome is Outcome.PASS
    assert await store.get_client("192.0.2.0") is None


@pytest.mark.asyncio
async def test_allowlisted_clients_and_recipients_skip_greylisting(tmp_path: Path) -> None:
    clock = Clock()
    store = await open_store("memory://", clock)
    google = await greylist(store, clock, client="209.85.208.41", name="mail-ej1-f41.google.com")
    assert (google.outcome, google.reason) == (Outcome.PASS, "client allowlist")
    fake = await greylist(store, clock, client="192.0.2.5", name="google.com.attacker.example")
    assert fake.outcome is Outcome.FAIL
    no_default = GreylistConfig(enabled=True, use_default_client_allowlist=False)
    assert (await greylist(store, clock, name="mail-ej1-f41.google.com", cfg=no_default)).outcome is Outcome.FAIL
    postmaster = await greylist(store, clock, rcpt="PostMaster+x@example.net")
    assert (postmaster.outcome, postmaster.reason) == (Outcome.PASS, "recipient allowlist")
    assert (await greylist(store, clock, rcpt="postmaster")).reason == "recipient allowlist"


class BrokenStore(MemoryStore):
    async def _get_rows(self, requests: list[tuple[Kind[Any], str]], now: float) -> list[Row | None]:
        raise StoreError("redis: Connection refused")


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("on_error", "action", "expected"),
    [
        ("accept", "tempfail", None),
        ("tempfail", "tempfail", Reply(451, "4.3.0", "<Bob@Example.net>: Temporary lookup failure")),
        ("tempfail", "ignore", None),
    ],
)
async def test_store_error(on_error: str, action: str, expected: Reply | None) -> None:
    cfg = GreylistConfig(enabled=True, on_store_error=on_error, action=action)
    result = await greylist(BrokenStore(Clock()), Clock(), cfg=cfg)
    assert result.outcome is Outcome.SKIP
    assert "Connection refused" in result.reason
    assert result.verdict.reply == expected


@pytest.mark.asyncio
async def test_disabled_and_unparsable_client() -> None:
    clock = Clock()
    store = await open_store("memory://", clock)
    assert (await greylist(store, clock, cfg=GreylistConfig(enabled=False))).outcome is Outcome.SKIP
    # The address is parsed where it comes in (listener, policy request): one
    # that is not an IP address never reaches the check (see test_policy_engine).
    assert PolicyRequest({"client_address": "unix:socket"}).client_ip is None


# --------------------------------------------------------------- allowlists

CLIENTS = """\
# comment line
example.com            # trailing comment
.Dotted.Example.NET
192.0.2.1
198.51.100             # partial: /24
203.0                  # partial: /16
10.1.2.0/23
2001:db8:5::/48
2001:db8:7::1
/^mta\\d+\\.pool\\.example\\.org$/
"""


def test_client_allowlist_matching() -> None:
    a = ClientAllowlist.parse(CLIENTS, "clients.txt")
    assert a.match(ip("192.0.2.200"), "mx.example.com")
    assert a.match(ip("192.0.2.200"), "EXAMPLE.COM.")
    assert a.match(ip("192.0.2.200"), "a.b.dotted.example.net")
    assert not a.match(ip("192.0.2.200"), "notexample.com")
    assert not a.match(ip("192.0.2.200"), "example.com.evil.org")
    assert a.match(ip("192.0.2.1"), "unknown")
    assert a.match(ip("198.51.100.77"), "")
    assert a.match(ip("203.0.255.1"), "")
    assert a.match(ip("10.1.3.255"), "")
    assert not a.match(ip("10.1.4.0"), "")
    assert a.match(ip("2001:db8:5:ffff::1"), "")
    assert a.match(ip("2001:db8:7::1"), "")
    assert not a.match(ip("2001:db8:7::2"), "")
    assert a.match(ip("192.0.2.200"), "MTA12.pool.example.org")
    assert not a.match(ip("192.0.2.200"), "unknown")  # an unverified name matches nothing


RECIPIENTS = """\
lists.example.org
spamtrap@
info@example.com
/^noreply-\\d+@/
"""


def test_recipient_allowlist_matching() -> None:
    a = RecipientAllowlist.parse(RECIPIENTS, "recipients.txt")
    assert a.match("anyone@lists.example.org")
    assert a.match("anyone@sub.lists.example.org")
    assert not a.match("anyone@otherlists.example.org")
    assert a.match("SpamTrap@anywhere.example")
    assert a.match("spamtrap+tag@anywhere.example")
    assert a.match("info@example.com")
    assert a.match("Info+sales@Example.COM")
    assert not a.match("info@sub.example.com")
    assert not a.match("infos@example.com")
    assert a.match("NoReply-42@x.example")
    assert not a.match("postmaster@x.example")  # only the defaults carry postmaster@ / abuse@
    defaults = RecipientAllowlist() + a
    assert defaults.match("postmaster@x.example") and defaults.match("abuse+x@y.example")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("ok.example\n/unclosed(/\n", "clients.txt:2: bad regular expression"),
        ("192.0.2.1/33\n", "clients.txt:1: bad IP address or network"),
        ("300.1.2.3\n", "clients.txt:1: bad IP address or network"),
        ("\n\n2001:db8::g\n", "clients.txt:3: bad IP address or network"),
        ("user@example.com\n", "clients.txt:1: not a host name"),
        ("two words\n", "clients.txt:1: not a host name"),
    ],
)
def test_client_allowlist_errors_name_file_and_line(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem.replace("(", r"\(")):
        ClientAllowlist.parse(text, "clients.txt")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("@example.com\n", "recipients.txt:1: not a domain"),
        ("# c\nuser @example.com\n", "recipients.txt:2: not a domain"),
        ("/[/\n", "recipients.txt:1: bad regular expression"),
    ],
)
def test_recipient_allowlist_errors_name_file_and_line(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem.replace("[", r"\[")):
        RecipientAllowlist.parse(text, "recipients.txt")


def test_default_client_allowlist_ships_with_the_package() -> None:
    default = default_client_allowlist()
    assert {"google.com", "outbound.protection.outlook.com", "amazonses.com"} <= default.names
    assert default.match(ip("40.107.1.1"), "mail-db8eur05on2041.outbound.protection.outlook.com")


# ------------------------------------------------------------------- config


def test_config_loads_allowlist_files(tmp_path: Path) -> None:
    (tmp_path / "clients").write_text("example.com\n")
    (tmp_path / "clients.local").write_text("192.0.2.0/24\n")
    (tmp_path / "recipients").write_text("lists.example.org\n")
    cfg = load_section(
        GreylistConfig,
        {
            "delay": "5m",
            "retry_window": "6h",
            "ipv4_mask": 32,
            "client_allowlist": [str(tmp_path / "clients"), str(tmp_path / "clients.local")],
            "recipient_allowlist": str(tmp_path / "recipients"),
        },
        "greylist",
    )
    assert (cfg.delay, cfg.retry_window, cfg.ipv4_mask) == (300, 6 * 3600, 32)
    assert cfg.client_allowlist.match(ip("192.0.2.9"), "mx.example.com")
    assert cfg.client_allowlist.sources == (str(tmp_path / "clients"), str(tmp_path / "clients.local"))
    assert cfg.recipient_allowlist.match("a@lists.example.org")
    assert cfg.recipient_allowlist.match("abuse@example.net")  # defaults kept
    assert (cfg.text, cfg.on_store_error, cfg.action) == (DEFAULT_TEXT, "accept", "tempfail")


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"client_allowlist": ["{dir}/bad"]}, "greylist.client_allowlist: {dir}/bad:2: bad IP address"),
        ({"client_allowlist": ["{dir}/missing"]}, "greylist.client_allowlist: cannot read {dir}/missing"),
        ({"ipv6_mask": 129}, "greylist.ipv6_mask: expected a prefix length 1-128"),
        ({"action": "enforce"}, "greylist.action: expected one of tempfail, ignore"),
        ({"on_store_error": "drop"}, "greylist.on_store_error: expected one of accept, tempfail"),
        ({"delay": "3d"}, "greylist.retry_window: must be longer than delay"),
        ({"max_age": "1d"}, "greylist.max_age: must not be shorter than retry_window"),
        ({"text": "two\nlines"}, "greylist.text: expected one non-empty line"),
    ],
)
def test_config_errors(tmp_path: Path, table: dict[str, object], message: str) -> None:
    (tmp_path / "bad").write_text("ok.example\n1.2.3.4/40\n")
    table = {k: [v.format(dir=tmp_path) for v in val] if isinstance(val, list) else val for k, val in table.items()}
    with pytest.raises(ConfigError) as info:
        load_section(GreylistConfig, table, "greylist")
    assert str(info.value).startswith(message.format(dir=tmp_path)), str(info.value)


def test_postgrey_partial_addresses_with_a_trailing_dot() -> None:
    allow = ClientAllowlist.parse("192.0.2.\n10.\n198.51.100\n", "whitelist_clients.local")
    assert allow.match(ip("192.0.2.9"), "") and allow.match(ip("10.200.1.1"), "")
    assert allow.match(ip("198.51.100.1"), "") and not allow.match(ip("192.0.3.1"), "")
