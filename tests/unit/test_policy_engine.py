"""The policy engine: Postfix requests in, access(5) actions out, on a fake
clock (no sleeping for the greylist delay) and the memory store.  The DNS
checks get a fake resolver; the real DNS and Postfix are in
tests/integration/test_policy_e2e.py."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from smtpguard.config import ConfigError, from_dict
from smtpguard.dns import DnsResult, Status
from smtpguard.metrics import METRICS
from smtpguard.pipeline import Pipeline
from smtpguard.policy.engine import PolicyEngine
from smtpguard.policy.protocol import PolicyParser, PolicyRequest
from smtpguard.store.memory import MemoryStore

T0 = 1_700_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


class FakeResolver:
    """A resolver with fixed answers: ``{name: [addresses]}``; TXT from ``txt``."""

    def __init__(self, a: dict[str, list[str]] | None = None, txt: dict[str, list[str]] | None = None) -> None:
        self._a, self._txt = a or {}, txt or {}

    async def a(self, name: str) -> DnsResult[str]:
        found = self._a.get(name.lower().rstrip("."))
        return DnsResult(Status.OK, tuple(found), 300) if found else DnsResult(Status.NXDOMAIN, (), 300)

    async def txt(self, name: str) -> DnsResult[str]:
        found = self._txt.get(name.lower().rstrip("."))
        return DnsResult(Status.OK, tuple(found), 300) if found else DnsResult(Status.NXDOMAIN, (), 300)

    async def aaaa(self, name: str) -> DnsResult[str]:
        return DnsResult(Status.NXDOMAIN, (), 300)

    async def mx(self, name: str) -> DnsResult[str]:
        return await self.a(name)

    async def ptr(self, name: str) -> DnsResult[str]:
        return DnsResult(Status.NXDOMAIN, (), 300)


def engine(toml: dict[str, Any], clock: Clock | None = None, resolver: Any = None) -> PolicyEngine:
    cfg = from_dict(toml)
    clock = clock or Clock()
    return PolicyEngine(Pipeline(cfg, MemoryStore(clock), clock=clock, resolver=resolver))


def request(**attrs: str) -> PolicyRequest:
    base = {"request": "smtpd_access_policy", "protocol_state": "RCPT", "protocol_name": "ESMTP",
            "client_address": "192.0.2.7", "client_name": "unknown", "reverse_client_name": "unknown",
            "helo_name": "mx.sender.example", "sender": "alice@sender.example", "recipient": "bob@example.test",
            "instance": "a1.b2.c3.0"}
    base.update(attrs)
    wire = "".join(f"{k}={v}\n" for k, v in base.items()) + "\n"
    [req] = PolicyParser().feed(wire.encode())
    return req


GREY = {"greylist": {"use_default_client_allowlist": False}, "server": {"hostname": "mx.test"}}


async def test_postgrey_sequence_on_a_fake_clock() -> None:
    clock = Clock()
    e = engine(GREY, clock)
    first = await e.decide(request())
    assert first.action == "DEFER_IF_PERMIT 4.2.0 Greylisted, see http://postgrey.schweikert.ch/help/example.test.html"
    assert first.kind == "defer_if_permit"
    clock.now += 100
    assert (await e.decide(request(instance="x.1"))).action.startswith("DEFER_IF_PERMIT 4.2.0 Greylisted")
    clock.now += 201  # 301s after the first attempt
    passed = await e.decide(request(instance="m.1"))
    assert passed.kind == "prepend"
    assert passed.action.startswith("PREPEND X-Greylist: delayed 301 seconds by smtpguard-")
    assert " at mx.test; " in passed.action
    # A second recipient of the same message, also passing now: no second header (postgrey's instance).
    clock.now += 400
    other = request(instance="m.1", recipient="carol@example.test")
    assert (await e.decide(other)).action.startswith("DEFER_IF_PERMIT")  # new triplet for carol
    # Known triplet: DUNNO.
    assert (await e.decide(request(instance="m.2"))).action == "DUNNO"


async def test_header_once_per_message_instance() -> None:
    clock = Clock()
    e = engine(GREY, clock)
    await e.decide(request(recipient="a@example.test"))
    await e.decide(request(recipient="b@example.test"))
    clock.now += 301
    assert (await e.decide(request(recipient="a@example.test", instance="same"))).kind == "prepend"
    assert (await e.decide(request(recipient="b@example.test", instance="same"))).action == "DUNNO"


async def test_greylist_text_options_and_action() -> None:
    e = engine({"greylist": {"text": "Come back in %s seconds (%r)", "use_default_client_allowlist": False},
                "policy": {"greylist_action": "451"}})
    assert (await e.decide(request())).action == "451 4.2.0 Come back in 300 seconds (example.test)"


async def test_greylist_ignore_mode_warns() -> None:
    e = engine({"greylist": {"action": "ignore", "use_default_client_allowlist": False}})
    found = await e.decide(request())
    assert found.action == "WARN greylist: new triplet" and found.kind == "warn"


async def test_no_header_when_configured_off() -> None:
    clock = Clock()
    e = engine({**GREY, "policy": {"greylist_header": ""}}, clock)
    await e.decide(request())
    clock.now += 301
    assert (await e.decide(request())).action == "DUNNO"


async def test_postmaster_and_other_states_are_dunno() -> None:
    e = engine(GREY)
    assert (await e.decide(request(recipient="postmaster@example.test"))).action == "DUNNO"
    assert (await e.decide(request(protocol_state="MAIL", recipient=""))).action == "DUNNO"
    assert (await e.decide(request(protocol_state="DATA", recipient=""))).action == "DUNNO"


async def test_policy_greylists_when_the_front_end_does_not() -> None:
    """[greylist] enabled is the front end's switch; [policy] checks is the policy service's."""
    e = engine({"greylist": {"enabled": False, "use_default_client_allowlist": False}})
    assert (await e.decide(request())).action.startswith("DEFER_IF_PERMIT")


async def test_metrics_labelled_policy() -> None:
    def new() -> float:
        labels = {"mode": "policy", "outcome": "new"}
        return METRICS.registry.get_sample_value("smtpguard_greylist_total", labels) or 0.0

    before = new()
    await engine(GREY).decide(request(client_address="192.0.2.99", recipient="m@example.test"))
    assert new() == before + 1


async def test_greylist_skips_a_client_address_that_is_no_ip_address(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="smtpguard"):
        answer = await engine(GREY).decide(request(client_address="unix:socket"))
    assert answer.action == "DUNNO"
    assert "policy: skip, reason=no client IP address ('unix:socket'), client=unknown[unix:socket]" in caplog.text


async def test_greylist_log_line(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="smtpguard"):
        await engine(GREY).decide(request(client_name="mx.sender.example", client_port="40123"))
    assert ("policy: greylist, reason=new triplet, client=mx.sender.example[192.0.2.7]:40123, "
            "sender=<alice@sender.example>, recipient=<bob@example.test>") in caplog.text


RHSBL = {"rhsbl": {"sender_sites": ["dbl.test"]}, "policy": {"checks": ["rhsbl_sender", "greylist"]}}


async def test_rhsbl_sender_rejects_with_the_list_name() -> None:
    resolver = FakeResolver({"spam.example.dbl.test": ["127.0.1.2"]}, {"spam.example.dbl.test": ["listed"]})
    e = engine({**RHSBL, **GREY}, resolver=resolver)
    found = await e.decide(request(sender="x@spam.example"))
    assert found.kind == "reject"
    assert found.action == ("554 5.7.1 Service unavailable; Sender address [x@spam.example] blocked using "
                            "dbl.test; listed")
    # Not listed: on to greylisting.
    assert (await e.decide(request())).action.startswith("DEFER_IF_PERMIT")


async def test_rhsbl_ignore_mode_warns_and_greylisting_still_answers() -> None:
    resolver = FakeResolver({"spam.example.dbl.test": ["127.0.1.2"]})
    e = engine({"rhsbl": {"sender_sites": ["dbl.test"], "action": "ignore"},
                "policy": {"checks": ["rhsbl_sender"]}}, resolver=resolver)
    found = await e.decide(request(sender="x@spam.example"))
    assert found.kind == "warn" and found.action.startswith("WARN spam.example.dbl.test listed")


def test_rhsbl_check_without_sites_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="policy.checks: rhsbl_helo needs \\[rhsbl\\] helo_sites"):
        engine({"policy": {"checks": ["rhsbl_helo"]}}, resolver=FakeResolver())


async def test_client_access_table(tmp_path: Path) -> None:
    table = tmp_path / "clients.cidr"
    table.write_text("192.0.2.66/32 REJECT go away\n192.0.2.8/32 OK\n")
    e = engine({"access": {"client_table": f"cidr:{table}"}, **GREY,
                "policy": {"checks": ["client_access", "greylist"]}})
    assert (await e.decide(request(client_address="192.0.2.66"))).action == "554 5.7.1 go away"
    assert (await e.decide(request(client_address="192.0.2.8"))).action == "DUNNO"  # allowlisted: no greylisting
    assert (await e.decide(request())).action.startswith("DEFER_IF_PERMIT")


async def test_client_access_list_with_permit_mynetworks(tmp_path: Path) -> None:
    """The policy service's client_access runs the whole list on the parsed
    client_address: permit_mynetworks (IPv6 and IPv4-mapped too), then the table."""
    table = tmp_path / "clients.cidr"
    table.write_text("10.0.0.0/8 REJECT go away\n")
    e = engine({"access": {"client_table": ["permit_mynetworks", f"cidr:{table}"],
                           "mynetworks": ["10.1.0.0/16", "2001:db8::/32"]}, **GREY,
                "policy": {"checks": ["client_access", "greylist"]}})
    assert (await e.decide(request(client_address="10.1.2.3"))).action == "DUNNO"
    assert (await e.decide(request(client_address="::ffff:10.1.2.3"))).action == "DUNNO"
    assert (await e.decide(request(client_address="2001:db8::7"))).action == "DUNNO"
    assert (await e.decide(request(client_address="10.2.0.1"))).action == "554 5.7.1 go away"
    assert (await e.decide(request())).action.startswith("DEFER_IF_PERMIT")


async def test_checks_at_their_states() -> None:
    resolver = FakeResolver({"bad.example.dbl.test": ["127.0.1.2"]})
    e = engine({"rhsbl": {"helo_sites": ["dbl.test"]}, "policy": {"checks": ["rhsbl_helo@HELO,EHLO"]}},
               resolver=resolver)
    assert (await e.decide(request(protocol_state="EHLO", helo_name="bad.example"))).kind == "reject"
    assert (await e.decide(request(protocol_state="RCPT", helo_name="bad.example"))).action == "DUNNO"


async def test_dnsbl_score(tmp_path: Path) -> None:
    resolver = FakeResolver({"7.2.0.192.zen.test": ["127.0.0.2"]})
    e = engine({"dnsbl": {"sites": ["zen.test"]}, "policy": {"checks": ["dnsbl@CONNECT,RCPT"]}}, resolver=resolver)
    found = await e.decide(request(protocol_state="CONNECT"))
    assert found.kind == "reject" and "zen.test" in found.action and found.action.startswith("550 5.7.1 ")
    assert (await e.decide(request(client_address="192.0.2.8"))).action == "DUNNO"


async def test_store_failure_follows_on_store_error() -> None:
    class Broken(MemoryStore):
        async def _get_rows(self, requests: Any, now: float) -> Any:
            raise OSError("down")

        backend_errors = (OSError,)

    clock = Clock()
    cfg = from_dict({"greylist": {"on_store_error": "tempfail", "use_default_client_allowlist": False}})
    e = PolicyEngine(Pipeline(cfg, Broken(clock), clock=clock))
    assert (await e.decide(request())).action == "451 4.3.0 Temporary lookup failure"
    cfg = from_dict({"greylist": {"use_default_client_allowlist": False}})
    e = PolicyEngine(Pipeline(cfg, Broken(clock), clock=clock))
    assert (await e.decide(request())).action == "DUNNO"


async def test_client_name_from_postfix_attributes() -> None:
    e = engine({"client_name": {"require": "fcrdns"}, "policy": {"checks": ["client_name"]}})
    ok = request(client_name="mx.sender.example", reverse_client_name="mx.sender.example")
    assert (await e.decide(ok)).action == "DUNNO"
    forged = await e.decide(request(client_name="unknown", reverse_client_name="mx.sender.example"))
    assert forged.action == "450 4.7.25 Client host rejected: cannot find your hostname, [192.0.2.7]"
    none = await e.decide(request(client_name="unknown", reverse_client_name="unknown"))
    assert none.kind == "defer"


# ---------------------------------------------------------------- rate limits (fake clock, memory store)

RATES = {"limits": {"connection_rate_limit": 2, "sender_rate_limit": 2, "rate_time_unit": "60s"},
         "policy": {"checks": ["connection_rate", "sender_rate"]}}


async def test_connection_rate_at_connect_only_once_per_session() -> None:
    clock = Clock()
    e = engine(RATES, clock)
    for n in range(2):
        assert (await e.decide(request(protocol_state="CONNECT"))).action == "DUNNO"
        # the session's later requests do not count
        assert (await e.decide(request(protocol_state="RCPT", instance=f"m{n}"))).action == "DUNNO"
    over = await e.decide(request(protocol_state="CONNECT"))
    assert over.action == "421 4.7.0 Error: too many connections from 192.0.2.7" and over.kind == "defer"
    assert (await e.decide(request(protocol_state="CONNECT", client_address="192.0.2.8"))).action == "DUNNO"
    clock.now += 61  # anvil's fixed window restarts
    assert (await e.decide(request(protocol_state="CONNECT"))).action == "DUNNO"


async def test_connection_rate_shares_the_front_ends_counter() -> None:
    clock = Clock()
    cfg = from_dict(RATES)
    pipeline = Pipeline(cfg, MemoryStore(clock), clock=clock)
    e = PolicyEngine(pipeline)
    from smtpguard.net import parse_ip
    from smtpguard.session import Session

    await pipeline.on_connect(Session(parse_ip("192.0.2.7"), 40123, "198.51.100.1", 25), 1, 1)
    assert (await e.decide(request(protocol_state="CONNECT"))).action == "DUNNO"
    assert (await e.decide(request(protocol_state="CONNECT"))).kind == "defer"
    v = await pipeline.on_connect(Session(parse_ip("192.0.2.7"), 40124, "198.51.100.1", 25), 1, 1)
    assert v.reply is not None and v.reply.code == 421


async def test_sender_rate_counts_messages_not_recipients(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    e = engine(RATES, clock)
    for n in range(2):
        for rcpt in ("a@example.test", "b@example.test", "c@example.test"):
            assert (await e.decide(request(instance=f"m{n}", recipient=rcpt))).action == "DUNNO"
    caplog.set_level(logging.INFO, logger="smtpguard")
    over = await e.decide(request(instance="m2", sender="Alice@Sender.example"))  # the same address
    assert over.action == "450 4.7.1 Error: too much mail from <Alice@Sender.example>" and over.kind == "defer"
    assert "Message rate limit exceeded: 3 from <Alice@Sender.example>" in caplog.text
    assert "check=sender_rate" in caplog.text
    # every recipient of that message gets the same answer, without another count
    assert (await e.decide(request(instance="m2", recipient="z@example.test"))).kind == "defer"
    assert (await e.decide(request(instance="m3", sender="other@sender.example"))).action == "DUNNO"
    assert (await e.decide(request(instance="m4", sender=""))).action == "DUNNO"  # bounces are not counted
    clock.now += 61
    assert (await e.decide(request(instance="m5"))).action == "DUNNO"


async def test_sender_rate_at_mail_and_rcpt_counts_a_message_once() -> None:
    e = engine({**RATES, "policy": {"checks": ["sender_rate@MAIL,RCPT"]}})
    for n in range(2):
        assert (await e.decide(request(protocol_state="MAIL", instance=f"m{n}", recipient=""))).action == "DUNNO"
        assert (await e.decide(request(instance=f"m{n}"))).action == "DUNNO"
    assert (await e.decide(request(protocol_state="MAIL", instance="m2", recipient=""))).kind == "defer"


async def test_rate_limits_ignore_mode_and_exceptions() -> None:
    limits = {"connection_rate_limit": 1, "sender_rate_limit": 1, "action": "ignore",
              "exceptions": ["198.51.100.0/24"]}
    e = engine({"limits": limits, "policy": {"checks": ["connection_rate", "sender_rate"]}})
    for _ in range(2):
        assert (await e.decide(request(protocol_state="CONNECT", client_address="198.51.100.9"))).action == "DUNNO"
    await e.decide(request(protocol_state="CONNECT"))
    warned = await e.decide(request(protocol_state="CONNECT"))
    assert warned.kind == "warn" and warned.action.startswith("WARN Connection rate limit exceeded: 2 from")
    await e.decide(request(instance="m1"))
    assert (await e.decide(request(instance="m2"))).kind == "warn"


def test_rate_checks_need_their_limit_and_their_states() -> None:
    with pytest.raises(ConfigError, match="connection_rate needs \\[limits\\] connection_rate_limit"):
        engine({"policy": {"checks": ["connection_rate"]}})
    with pytest.raises(ConfigError, match="sender_rate needs \\[limits\\] sender_rate_limit"):
        engine({"policy": {"checks": ["sender_rate"]}})
    with pytest.raises(ConfigError, match="connection_rate runs only at CONNECT"):
        from_dict({"limits": {"connection_rate_limit": 5}, "policy": {"checks": ["connection_rate@RCPT"]}})
    with pytest.raises(ConfigError, match="sender_rate runs only at MAIL or RCPT"):
        from_dict({"limits": {"sender_rate_limit": 5}, "policy": {"checks": ["sender_rate@DATA"]}})


# ---------------------------------------------------------------- the allowlist cache

async def test_pass_old_client_skips_the_dnsbl() -> None:
    clock = Clock()
    resolver = FakeResolver({"7.2.0.192.zen.test": ["127.0.0.2"]})
    e = engine({"dnsbl": {"sites": ["zen.test"]}, "policy": {"checks": ["dnsbl"]}}, clock, resolver)
    assert (await e.decide(request())).kind == "reject"  # listed, not in the cache
    # the front end cached a pass of every enabled test for this client: PASS OLD
    enabled = e.pipeline._cacheable
    assert enabled
    await e.store.put_cache("192.0.2.7", {t: T0 + 3600 for t in enabled})
    assert (await e.decide(request())).action == "DUNNO"
    assert e.pipeline.hot.passed("192.0.2.7", clock.now)  # remembered in the hot set
    clock.now += 3601  # the cache entries expired: tested again
    assert (await e.decide(request())).kind == "reject"


async def test_cached_dnsbl_pass_alone_skips_the_dnsbl() -> None:
    clock = Clock()
    resolver = FakeResolver({"7.2.0.192.zen.test": ["127.0.0.2"]})
    e = engine({"dnsbl": {"sites": ["zen.test"]}, "policy": {"checks": ["dnsbl"]}}, clock, resolver)
    await e.store.put_cache("192.0.2.7", {"dnsbl": T0 + 60, "pregreet": T0 - 1})
    assert (await e.decide(request())).action == "DUNNO"
    assert not e.pipeline.hot.passed("192.0.2.7", clock.now)  # not PASS OLD: not remembered
