"""Do the sender's domain and the HELO name exist in the DNS?

``reject_unknown_sender_domain`` (:func:`check_sender_domain`), as Postfix's
reject_unknown_mailhost: the domain of the MAIL FROM address is asked for
MX first; an MX answer passes, unless it is RFC 7505's null MX (``0 .``:
"this domain sends/accepts no mail"), which is rejected with Postfix's fixed
``550 5.7.27 <a@b>: Sender address rejected: Domain b does not accept mail
(nullMX)``, or an MX set that has a root host among others (``Malformed DNS
server reply``).  Without MX records the domain needs an A or AAAA record
(asked in parallel).  A domain that does not exist (NXDOMAIN) is not asked
again for addresses.  No usable record: ``<a@b>: Sender address rejected:
Domain not found`` with ``reject_code`` (Postfix's
``unknown_address_reject_code``, **450** by default) and status x.1.8.  The
null sender, address literals and addresses without a domain are skipped.
Off by default, as in Postfix.

``reject_unknown_helo_hostname`` (:func:`check_helo_hostname`), as Postfix's
reject_unknown_hostname: the HELO name needs an A, AAAA or MX record (null
MX allowed: MTAs that send but do not receive use it); otherwise ``<name>:
Helo command rejected: Host not found`` with ``reject_code``
(``unknown_hostname_reject_code``, 450) and status x.7.1.  Off by default;
address literals are skipped.

Whenever the answer is not definite (a timeout or SERVFAIL and nothing that
passes), the check never rejects for good: ``on_dns_error = "tempfail"``
answers ``450`` with the same text (Postfix's defer_if_permit), ``"skip"``
lets the client go on.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from ..dns import Resolver, Status, is_null_mx
from ..options import opt, parse_bool
from ..verdict import Outcome, Reply, Result, verdict_for
from .rdns import DnsCheckConfig, dns_error_result, parse_reply_code, reply


@dataclass(frozen=True)
class SenderDomainConfig(DnsCheckConfig):
    """``[sender_domain]``: reject_unknown_sender_domain."""

    # Off by default, as in Postfix (only on when listed in smtpd_sender_restrictions):
    # the Postfix behind smtpguard may well do it itself.
    enabled: bool = field(default=False, metadata=opt(parse_bool, "reject_unknown_sender_domain"))
    reject_code: int = field(default=450, metadata=opt(parse_reply_code, "unknown_address_reject_code"))


@dataclass(frozen=True)
class HeloHostnameConfig(DnsCheckConfig):
    """``[helo_hostname]``: reject_unknown_helo_hostname."""

    enabled: bool = field(default=False, metadata=opt(parse_bool, "reject_unknown_helo_hostname"))
    reject_code: int = field(default=450, metadata=opt(parse_reply_code, "unknown_hostname_reject_code"))


def _best(*statuses: Status) -> Status:
    """One status for a name asked several types: any record wins, then a
    failure (the record might exist), then NXDOMAIN, then NODATA."""
    for status in (Status.OK, Status.TEMPFAIL, Status.NXDOMAIN):
        if status in statuses:
            return status
    return Status.NODATA


async def _address_status(resolver: Resolver, name: str) -> Status:
    a, aaaa = await asyncio.gather(resolver.a(name), resolver.aaaa(name))
    return _best(a.status, aaaa.status)


def _verdict(check: str, config: DnsCheckConfig, status: Status, failure: Reply, reason: str) -> Result:
    """FAIL with *failure* for a definite "not found", else the DNS-error policy."""
    if status is Status.TEMPFAIL:
        temporary = reply(450, failure.status, failure.text)
        return dns_error_result(check, config.action, config.on_dns_error, temporary, f"{reason}: DNS lookup failed")
    return Result(check, Outcome.FAIL, f"{reason}: {status.value}", verdict_for(config.action, failure))


async def check_sender_domain(resolver: Resolver, config: SenderDomainConfig, sender: str) -> Result:
    """reject_unknown_sender_domain for the MAIL FROM address *sender*."""
    check = "sender_domain"
    _, at, domain = sender.rpartition("@")
    domain = domain.rstrip(".")
    if not at or not domain or domain.startswith("["):
        return Result(check, Outcome.SKIP, f"no domain to look up in <{sender}>")
    prefix = f"<{sender}>: Sender address rejected"
    mx = await resolver.mx(domain)
    if mx.ok:
        if is_null_mx(mx.answers):
            nullmx = reply(550, "5.7.27", f"{prefix}: Domain {domain} does not accept mail (nullMX)")
            return Result(check, Outcome.FAIL, f"{domain}: null MX", verdict_for(config.action, nullmx))
        if any(r.host == "." for r in mx.answers):
            malformed = reply(config.reject_code, "4.1.8", f"{prefix}: Malformed DNS server reply")
            return Result(check, Outcome.FAIL, f"{domain}: MX to the root", verdict_for(config.action, malformed))
        return Result(check, Outcome.PASS, f"{domain} has MX")
    status = mx.status if mx.status is Status.NXDOMAIN else _best(mx.status, await _address_status(resolver, domain))
    if status is Status.OK:
        return Result(check, Outcome.PASS, f"{domain} has an address")
    failure = reply(config.reject_code, "4.1.8", f"{prefix}: Domain not found")
    return _verdict(check, config, status, failure, domain)


async def check_helo_hostname(resolver: Resolver, config: HeloHostnameConfig, helo: str) -> Result:
    """reject_unknown_helo_hostname for the HELO/EHLO argument *helo*."""
    check = "helo_hostname"
    name = helo.rstrip(".")
    if not name or name.startswith("["):
        return Result(check, Outcome.SKIP, f"no host name in HELO {helo}")
    status = await _address_status(resolver, name)
    if status not in (Status.OK, Status.NXDOMAIN):
        status = _best(status, (await resolver.mx(name)).status)
    if status is Status.OK:
        return Result(check, Outcome.PASS, f"{name} found")
    failure = reply(config.reject_code, "4.7.1", f"<{helo}>: Helo command rejected: Host not found")
    return _verdict(check, config, status, failure, name)
