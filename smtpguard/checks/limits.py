"""Connection count and rate per client address (anvil's limits).

How it works: the listener counts this process's open connections per
client address (like anvil, per process) and the pipeline asks the state
store for the client's connections in the last ``rate_time_unit``
(``hit_rate``; on Redis shared by all nodes).  These pure checks compare
the figures with the limits; over a limit the client gets ``421 4.7.0
Error: too many connections from ADDR`` before the banner and is
disconnected, logged as smtpd does (``warning: Connection concurrency
limit exceeded: 51 from [a]:p for service smtp``).  ``exceptions`` lists
networks exempt from both (smtpd_client_event_limit_exceptions).  The
global cap (``server.max_connections``, ``421 4.3.2 All server ports are
busy``) is applied before these.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from ..net import IPAddress, client_network
from ..options import list_of, one_of, opt, parse_bool, parse_duration, parse_int, parse_network
from ..verdict import Outcome, Reply, Result, verdict_for
from ._common import passed, skip


@dataclass(frozen=True)
class LimitsConfig:
    """``[limits]``: smtpd_client_connection_*_limit, anvil_rate_time_unit."""

    enabled: bool = field(default=True, metadata=opt(parse_bool, ""))
    action: str = field(default="drop", metadata=opt(one_of("ignore", "drop"), ""))
    connection_count_limit: int = field(
        default=50,
        metadata=opt(parse_int, "smtpd_client_connection_count_limit (postscreen_client_connection_count_limit)"),
    )
    connection_rate_limit: int = field(default=0, metadata=opt(parse_int, "smtpd_client_connection_rate_limit"))
    sender_rate_limit: int = field(
        default=0,
        metadata=opt(parse_int, "policyd (cbpolicyd) quota: Track Sender:user@domain, MessageCount per Period; "
                                "policy service only"),
    )
    rate_time_unit: float = field(default=60.0, metadata=opt(parse_duration, "anvil_rate_time_unit"))
    exceptions: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = field(
        default=(), metadata=opt(list_of(parse_network), "smtpd_client_event_limit_exceptions")
    )


def too_many(ip: IPAddress) -> Reply:
    return Reply(421, "4.7.0", f"Error: too many connections from {ip}")


def exempt(cfg: LimitsConfig, ip: IPAddress) -> bool:
    return any(ip in net for net in cfg.exceptions)


def too_much_mail(sender: str) -> Reply:
    """smtpd's reply over smtpd_client_message_rate_limit, for a sender."""
    return Reply(450, "4.7.1", f"Error: too much mail from <{sender}>")


def _limit(check: str, cfg: LimitsConfig, ip: IPAddress, value: int, limit: int, counted: str, exceeded: str,
           reply: Reply | None = None) -> Result:
    """The shape the anvil limits share: off, exempt, within, or over
    (*reply*, default ``421 4.7.0 too many connections``, as given: a 421
    hangs up, a 450 defers)."""
    if not cfg.enabled or not limit:
        return skip(check, "disabled")
    if exempt(cfg, ip):
        return skip(check, "exempt")
    if value <= limit:
        return passed(check, counted)
    return Result(check, Outcome.FAIL, exceeded, verdict_for(cfg.action, reply or too_many(ip), as_given=True))


def check_connection_count(cfg: LimitsConfig, ip: IPAddress, count: int, who: str) -> Result:
    """*count*: this process's connections from *ip*, this one included."""
    return _limit("connection_count", cfg, ip, count, cfg.connection_count_limit, f"{count} connections",
                  f"Connection concurrency limit exceeded: {count} from {who} for service smtp")


def check_connection_rate(cfg: LimitsConfig, ip: IPAddress, rate: int, who: str) -> Result:
    """*rate*: connections from *ip* in the last ``rate_time_unit``, this one included."""
    return _limit("connection_rate", cfg, ip, rate, cfg.connection_rate_limit,
                  f"{rate} connections per {cfg.rate_time_unit:g}s",
                  f"Connection rate limit exceeded: {rate} from {who} for service smtp")


def check_sender_rate(cfg: LimitsConfig, ip: IPAddress, sender: str, rate: int, who: str) -> Result:
    """*rate*: messages from *sender* in the last ``rate_time_unit``, this
    one included (the policy service's per-sender message rate); over the
    limit ``450 4.7.1 Error: too much mail from <sender>``."""
    return _limit("sender_rate", cfg, ip, rate, cfg.sender_rate_limit,
                  f"{rate} messages from <{sender}> per {cfg.rate_time_unit:g}s",
                  f"Message rate limit exceeded: {rate} from <{sender}> via {who} for service smtp",
                  too_much_mail(sender))


def rate_enabled(cfg: LimitsConfig, ip: IPAddress) -> bool:
    """Whether the rate counter must be consulted at all (a store round trip)."""
    return cfg.enabled and cfg.connection_rate_limit > 0 and not exempt(cfg, ip)


#: An IPv6 client is counted by its /64: one site's usual allocation, where
#: a single host can use any of 2**64 addresses (as greylisting's ipv6_mask).
IPV6_PREFIX = 64


def client_key(ip: IPAddress) -> str:
    """What connection count and rate are kept under: the IPv4 address, or
    the IPv6 address's /64 network (``2001:db8:1:2::``)."""
    if ip.version == 4:
        return str(ip)
    return client_network(ip, 32, IPV6_PREFIX)
