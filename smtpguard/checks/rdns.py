"""The client's DNS names, and Postfix's two checks on them.

:func:`lookup_client_names` does what Postfix's smtpd does at connect time
(smtpd_peer.c): a PTR lookup for the client address gives the *reverse*
name; the *verified* name is a PTR name whose forward lookup (A for an IPv4
client, AAAA for IPv6, as Postfix asks only the client's address family)
lists the client address again (FCrDNS).  Either is the literal
``"unknown"`` when it cannot be had, and a status says why: ``TEMP`` when
DNS failed (timeout, SERVFAIL), ``PERM`` when there is no usable PTR name
(none, or only malformed or numeric ones, which Postfix also refuses), and
``FORGED`` when no PTR name resolves back to the address.  IPv4-mapped IPv6
clients are treated as IPv4.  Unlike Postfix, which only sees the first PTR
name, up to :data:`MAX_PTR_NAMES` names are tried in parallel and the first
(in answer order) that resolves back wins; the reverse name is the first.

The verified name (:attr:`ClientNames.name`) is what the session sends as
XCLIENT ``NAME=`` and what host-name allowlists must match, like Postfix's
``$client_name``; the reverse name is only for
``reject_unknown_reverse_client_hostname`` and logging.

:func:`check_client_names` is the check, with ``require``:

* ``"reverse"`` - ``reject_unknown_reverse_client_hostname``:
  ``450 4.7.1 Client host rejected: cannot find your reverse hostname, [ip]``
* ``"fcrdns"`` - ``reject_unknown_client_hostname``:
  ``450 4.7.25 Client host rejected: cannot find your hostname, [ip]``

The code for a definite failure is ``reject_code``, Postfix's
``unknown_client_reject_code``, whose default is 450, not 5xx (set 550 to
reject for good; the enhanced status follows the code's class).  A DNS
failure never rejects for good: with ``on_dns_error = "tempfail"`` (Postfix)
it gets 450, with ``"skip"`` the check is skipped.

:class:`DnsCheckConfig` (action, reject_code, on_dns_error), :func:`reply`,
:func:`dns_error_result` and :func:`parse_reply_code`
are shared with the other DNS-based checks (:mod:`smtpguard.checks.domains`).
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
from dataclasses import dataclass, field
from typing import Any

from ..dns import Resolver, Status
from ..net import IPAddress, valid_hostname
from ..options import ConfigError, one_of, opt, parse_bool
from ..verdict import ACTIONS, Outcome, Reply, Result, verdict_for

MAX_PTR_NAMES = 4  # PTR names tried for FCrDNS; more is an attack, not a setup

ON_DNS_ERROR = ("tempfail", "skip")


def parse_reply_code(value: Any) -> int:
    """An SMTP reject code: 4xx (try again) or 5xx (permanent)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 400 <= value <= 599:
        raise ValueError(f"expected a reply code 400-599 like 450 or 550, got {value!r}")
    return value


def reply(code: int, status: str, text: str) -> Reply:
    """A reply whose enhanced status class follows *code* (``4.7.1`` with
    550 becomes ``5.7.1``), as Postfix's smtpd_check_reject does."""
    return Reply(code, f"{code // 100}{status[1:]}", text)


def dns_error_result(check: str, action: str, on_dns_error: str, failure: Reply, reason: str) -> Result:
    """The result when DNS failed: skipped, or deferred with *failure* (a 450)."""
    if on_dns_error == "skip":
        return Result(check, Outcome.SKIP, reason)
    return Result(check, Outcome.SKIP, reason, verdict_for(action, failure, as_given=True))


class NameStatus(enum.Enum):
    """Postfix's SMTPD_PEER_CODE_*: how a client name lookup ended."""

    OK = "ok"
    TEMP = "temp"  # DNS failed; try again later
    PERM = "perm"  # no (usable) PTR name
    FORGED = "forged"  # PTR name(s) do not resolve back to the address


@dataclass(frozen=True)
class ClientNames:
    """What :func:`lookup_client_names` found; ``name`` is Postfix's
    ``$client_name`` (XCLIENT NAME=), ``reverse_name`` its
    ``$reverse_client_name``."""

    ip: str  # normalised: IPv4-mapped IPv6 as IPv4
    reverse_name: str  # PTR name, or "unknown"
    reverse_status: NameStatus  # OK, TEMP or PERM
    name: str  # verified (forward-confirmed) name, or "unknown"
    name_status: NameStatus  # OK, TEMP, PERM or FORGED


async def lookup_client_names(resolver: Resolver, addr: IPAddress) -> ClientNames:
    """Reverse and verified name of *addr*; see the module docstring."""
    ptr = await resolver.ptr(addr)
    if ptr.status is Status.TEMPFAIL:
        return ClientNames(str(addr), "unknown", NameStatus.TEMP, "unknown", NameStatus.TEMP)
    names = [n for n in ptr.answers if valid_hostname(n)][:MAX_PTR_NAMES]
    if not names:
        return ClientNames(str(addr), "unknown", NameStatus.PERM, "unknown", NameStatus.PERM)
    forward = resolver.a if addr.version == 4 else resolver.aaaa
    results = await asyncio.gather(*(forward(n) for n in names))
    for name, result in zip(names, results, strict=True):
        if any(ipaddress.ip_address(a) == addr for a in result.answers):
            return ClientNames(str(addr), names[0], NameStatus.OK, name, NameStatus.OK)
    temp = any(r.status is Status.TEMPFAIL for r in results)
    status = NameStatus.TEMP if temp else NameStatus.FORGED
    return ClientNames(str(addr), names[0], NameStatus.OK, "unknown", status)


@dataclass(frozen=True)
class DnsCheckConfig:
    """What every DNS-based reject check has: its action, the code for a
    definite failure (Postfix's ``unknown_*_reject_code``, 450 by default)
    and what a DNS failure does (``tempfail``: 450, ``skip``: nothing)."""

    action: str = field(default="enforce", metadata=opt(one_of(*ACTIONS), "warn_if_reject when ignore"))
    reject_code: int = field(default=450, metadata=opt(parse_reply_code, "unknown_*_reject_code"))
    on_dns_error: str = field(default="tempfail", metadata=opt(one_of(*ON_DNS_ERROR), "unknown_*_tempfail_action"))


@dataclass(frozen=True)
class ClientNameConfig(DnsCheckConfig):
    """``[client_name]``: look the client's name up at connect (``lookup``,
    smtpd_peername_lookup) and, when ``enabled``, reject clients without
    (verified) reverse DNS."""

    lookup: bool = field(default=True, metadata=opt(parse_bool, "smtpd_peername_lookup"))
    enabled: bool = field(default=False, metadata=opt(parse_bool, ""))
    require: str = field(
        default="reverse",
        metadata=opt(
            one_of("reverse", "fcrdns"),
            "reject_unknown_reverse_client_hostname / reject_unknown_client_hostname",
        ),
    )
    reject_code: int = field(default=450, metadata=opt(parse_reply_code, "unknown_client_reject_code"))

    def validate(self) -> None:
        if self.enabled and not self.lookup:
            raise ConfigError("lookup", "must be true when the check is enabled")


def check_client_names(names: ClientNames, config: ClientNameConfig) -> Result:
    """The ``require``-d name check on already looked-up *names*."""
    if config.require == "reverse":
        check, status, found = "reverse_client_hostname", names.reverse_status, names.reverse_name
        dsn, text = "4.7.1", f"Client host rejected: cannot find your reverse hostname, [{names.ip}]"
    else:
        check, status, found = "client_hostname", names.name_status, names.name
        dsn, text = "4.7.25", f"Client host rejected: cannot find your hostname, [{names.ip}]"
    if status is NameStatus.OK:
        return Result(check, Outcome.PASS, f"{found}[{names.ip}]")
    if status is NameStatus.TEMP:
        reason = f"temporary DNS failure looking up the name of [{names.ip}]"
        return dns_error_result(check, config.action, config.on_dns_error, reply(450, dsn, text), reason)
    reason = {
        NameStatus.PERM: f"no usable PTR record for [{names.ip}]",
        NameStatus.FORGED: f"{names.reverse_name} does not resolve to address {names.ip}",
    }[status]
    return Result(check, Outcome.FAIL, reason, verdict_for(config.action, reply(config.reject_code, dsn, text)))
