"""Envelope address checks with Postfix smtpd semantics.

How it works: the session has already parsed ``MAIL FROM:<...>`` /
``RCPT TO:<...>`` (see :mod:`smtpguard.envelope`; source routes are gone,
the null sender is ``""``).  Each check here is a pure function of that
address and a :class:`Role` -- :data:`SENDER` or :data:`RECIPIENT`, which
supplies the check names, Postfix's reply class (``Sender address`` /
``Recipient address``) and the syntax-error reply -- returning a
:class:`~smtpguard.verdict.Result`.  :func:`check_address` runs the enabled
ones in this order and returns the first failure:

1. ``strict_syntax`` -- the RFC 5321 Mailbox grammar (dot-atom or quoted
   local part, ``@``, a domain of letter-digit-hyphen labels or an
   ``[IPv4]``/``[IPv6:...]`` literal; with SMTPUTF8 also RFC 6531 UTF-8):
   ``501 5.1.7 Bad sender address syntax`` / ``501 5.1.3 Bad recipient
   address syntax``.  Off by default, like Postfix (whose own
   strict_rfc821_envelopes is looser than this).
2. the role's access table -- check_sender_access / check_recipient_access
   via :func:`smtpguard.tables.lookup_address`; ``OK`` exempts the address
   from the check below.
3. ``reject_non_fqdn_sender`` / ``reject_non_fqdn_recipient`` -- the domain
   is not a valid host name with a dot: ``504 5.5.2 <a>: Sender address
   rejected: need fully-qualified address``.  Address literals pass, as in
   smtpd.

The null sender ``<>`` and the recipient ``<postmaster>`` (which RFC 5321
4.5.1 says must be accepted without a domain) pass the syntax and non-FQDN
checks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .. import tables
from ..net import valid_hostname
from ..options import one_of, opt, parse_bool, parse_str
from ..tables import Table, access_check, check_access_spec, lookup_address
from ..verdict import ACTIONS, REPLIES, Outcome, Reply, Result, Warn, verdict_for
from .helo import NON_FQDN_CODE, literal_address, strip_trailing_dot


@dataclass(frozen=True)
class AddressConfig:
    """``[addresses]``: smtpd_sender_restrictions / smtpd_recipient_restrictions."""

    enabled: bool = field(default=True, metadata=opt(parse_bool, ""))
    action: str = field(default="enforce", metadata=opt(one_of(*ACTIONS), "warn_if_reject when ignore"))
    strict_syntax: bool = field(
        default=False, metadata=opt(parse_bool, "strict_rfc821_envelopes (stricter: RFC 5321 grammar)")
    )
    reject_non_fqdn_sender: bool = field(default=False, metadata=opt(parse_bool, "reject_non_fqdn_sender"))
    reject_non_fqdn_recipient: bool = field(default=False, metadata=opt(parse_bool, "reject_non_fqdn_recipient"))
    sender_access_table: str = field(default="", metadata=opt(parse_str, "check_sender_access"))
    recipient_access_table: str = field(default="", metadata=opt(parse_str, "check_recipient_access"))
    recipient_delimiter: str = field(default="", metadata=opt(parse_str, "recipient_delimiter"))

    def validate(self) -> None:
        check_access_spec("sender_access_table", self.sender_access_table)
        check_access_spec("recipient_access_table", self.recipient_access_table)


@dataclass(frozen=True)
class Role:
    """Which envelope address is checked."""

    name: str  # prefix of the check names
    kind: str  # Postfix's reply class
    bad_syntax: Reply
    exempt: str  # the one address without a domain RFC 5321 allows, lower case


SENDER = Role("sender", tables.SENDER, REPLIES["bad_sender"], "")
RECIPIENT = Role("recipient", tables.RECIPIENT, REPLIES["bad_recipient"], "postmaster")


def _local_part(utf8: bool) -> re.Pattern[str]:
    extra = "\u0080-\U0010ffff" if utf8 else ""
    atom = f"[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~{extra}-]+"
    quoted = f'"(?:[\\x20\\x21\\x23-\\x5b\\x5d-\\x7e{extra}]|\\\\[\\x20-\\x7e])*"'
    return re.compile(f"{atom}(?:\\.{atom})*|{quoted}")


def _label(utf8: bool) -> re.Pattern[str]:
    letdig = "A-Za-z0-9" + ("\u0080-\U0010ffff" if utf8 else "")
    return re.compile(f"[{letdig}](?:[{letdig}-]{{0,61}}[{letdig}])?")


_LOCAL = {utf8: _local_part(utf8) for utf8 in (False, True)}
_LABEL = {utf8: _label(utf8) for utf8 in (False, True)}


def valid_address(address: str, utf8: bool = False) -> bool:
    """RFC 5321 ``Mailbox`` (RFC 6531 with *utf8*); general address
    literals (``[tag:text]``) are not accepted."""
    local, at, domain = address.rpartition("@")
    if not at or not _LOCAL[utf8].fullmatch(local):
        return False
    if domain.startswith("["):
        return literal_address(domain) is not None
    return len(domain) <= 255 and all(_LABEL[utf8].fullmatch(label) for label in domain.split("."))


def _fail(check: str, action: str, reply: Reply) -> Result:
    return Result(check, Outcome.FAIL, str(reply), verdict_for(action, reply))


def check_address_syntax(address: str, role: Role, action: str = "enforce", utf8: bool = False) -> Result:
    """``501 5.1.7 Bad sender address syntax`` / ``501 5.1.3 Bad recipient
    address syntax`` unless *address* is an RFC 5321 Mailbox."""
    check = f"{role.name}_syntax"
    if address.lower() == role.exempt or valid_address(address, utf8):
        return Result(check, Outcome.PASS, f"<{address}>: valid syntax")
    return _fail(check, action, role.bad_syntax)


def _fqdn(domain: str, utf8: bool) -> bool:
    """smtpd's test: a valid host name (U-labels allowed with SMTPUTF8) with a dot."""
    name = strip_trailing_dot(domain)
    if utf8 and not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            return False
    return valid_hostname(name) and "." in name


def reject_non_fqdn_address(address: str, role: Role, action: str = "enforce", utf8: bool = False) -> Result:
    """``504 5.5.2 <a>: Sender address rejected: need fully-qualified
    address`` (or ``Recipient address``) for a domain that is not a FQDN."""
    check = f"{role.name}_non_fqdn"
    if address.lower() == role.exempt:
        return Result(check, Outcome.SKIP, f"<{address}> has no domain by definition")
    domain = address.rpartition("@")[2] if "@" in address else ""
    if domain.startswith("[") and domain.endswith("]") or _fqdn(domain, utf8):
        return Result(check, Outcome.PASS, f"<{address}>: fully-qualified")
    text = f"<{address}>: {role.kind} rejected: need fully-qualified address"
    return _fail(check, action, Reply(NON_FQDN_CODE, "5.5.2", text))


def reject_non_fqdn_sender(sender: str, action: str = "enforce", utf8: bool = False) -> Result:
    """smtpd's reject_non_fqdn_sender (the null sender passes)."""
    return reject_non_fqdn_address(sender, SENDER, action, utf8)


def reject_non_fqdn_recipient(recipient: str, action: str = "enforce", utf8: bool = False) -> Result:
    """smtpd's reject_non_fqdn_recipient (``<postmaster>`` passes)."""
    return reject_non_fqdn_address(recipient, RECIPIENT, action, utf8)


def check_address_access(
    address: str, role: Role, table: Table, action: str = "enforce", delimiter: str = ""
) -> Result:
    """check_sender_access / check_recipient_access on *table*."""
    value = lookup_address(table, address, delimiter)
    return access_check(f"{role.name}_access", action, value, role.kind, address)


def check_address(
    config: AddressConfig, address: str, role: Role, table: Table | None = None, utf8: bool = False
) -> Result:
    """Run the enabled checks for *role* in order (see the module
    docstring); *table* is the role's opened access table and *utf8* whether
    the client asked for SMTPUTF8."""
    check = role.name
    if not config.enabled:
        return Result(check, Outcome.SKIP, "disabled")
    action = config.action
    if config.strict_syntax and (found := check_address_syntax(address, role, action, utf8)).outcome is Outcome.FAIL:
        return found
    notes: list[str] = []
    warnings: tuple[Warn, ...] = ()
    if table is not None:
        found = check_address_access(address, role, table, action, config.recipient_delimiter)
        if found.outcome is not Outcome.SKIP:
            return found
        notes.append(found.reason)
        warnings = found.warnings
    non_fqdn = config.reject_non_fqdn_sender if role is SENDER else config.reject_non_fqdn_recipient
    if non_fqdn and (found := reject_non_fqdn_address(address, role, action, utf8)).outcome is Outcome.FAIL:
        return found
    return Result(check, Outcome.PASS, "; ".join([f"<{address}> passed", *notes]), warnings=warnings)
