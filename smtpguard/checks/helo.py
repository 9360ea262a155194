"""HELO/EHLO checks with Postfix smtpd semantics.

How it works: each check is a pure function of the HELO name (None when the
client sent none) and facts about the session, returning a
:class:`~smtpguard.verdict.Result`; a check that does not apply returns
``SKIP``.  :func:`check_helo` runs the enabled ones in a fixed order and
returns the first failure -- the order of a typical
``smtpd_helo_restrictions``:

1. ``required`` -- smtpd_helo_required: ``503 5.5.1 Error: send HELO/EHLO first``.
2. ``access_table`` -- check_helo_access (:func:`smtpguard.tables.lookup_helo`);
   ``OK`` exempts the name from the checks below, ``DUNNO`` and ``WARN``
   go on, ``REJECT``/``DEFER``/``NNN text`` decide.  A helo_access file
   such as ``friend REJECT``, ``localhost REJECT``, ``example.com REJECT
   You are not me`` or ``[192.0.2.1] REJECT`` works unchanged.
3. ``reject_impersonation`` -- the name is ours: ``$myhostname``, one of
   ``our_domains``, ``localhost``, ``localhost.localdomain``, or (bare or
   as a literal) one of our or a loopback address.  The reply is what the
   usual helo_access entry ``REJECT You are not me`` gives.  A client
   connecting from a loopback address or one of ours is never an
   impersonator.
4. ``reject_invalid`` -- reject_invalid_helo_hostname.  As in Postfix, a
   bare IP address (``1.2.3.4``) is *valid* here (valid_hostaddr); a
   ``[...]`` literal must hold an IPv4 or ``IPv6:`` address.
5. ``reject_bare_ip`` -- a bare IP address, which RFC 5321 4.1.3 forbids
   (it must be ``[1.2.3.4]``).  Postfix has no switch of its own for this;
   its reject_non_fqdn_helo_hostname rejects a bare IP with ``need
   fully-qualified hostname`` and so do we.
6. ``reject_literal_mismatch`` -- a valid ``[address]`` literal that is not
   the client's address (IPv4-mapped IPv6 compares as IPv4).
7. ``reject_non_fqdn`` -- reject_non_fqdn_helo_hostname: not a valid host
   name with a dot; literals are checked like reject_invalid.

Host names are checked with :func:`smtpguard.net.valid_hostname` (Postfix's
valid_hostname; one trailing dot is ignored, as smtpd does).
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ..net import IPAddress, parse_ip_or_none, valid_hostname
from ..options import list_of, one_of, opt, parse_bool, parse_hostname, parse_str
from ..tables import HELO, Table, access_check, check_access_spec, lookup_helo
from ..verdict import ACTIONS, REPLIES, Outcome, Reply, Result, Warn, verdict_for

INVALID_HOSTNAME_CODE = 501  # invalid_hostname_reject_code
NON_FQDN_CODE = 504  # non_fqdn_reject_code
LOCAL_NAMES = ("localhost", "localhost.localdomain")


@dataclass(frozen=True)
class HeloConfig:
    """``[helo]``: smtpd_helo_restrictions."""

    enabled: bool = field(default=True, metadata=opt(parse_bool, ""))
    action: str = field(default="enforce", metadata=opt(one_of(*ACTIONS), "warn_if_reject when ignore"))
    required: bool = field(default=False, metadata=opt(parse_bool, "smtpd_helo_required"))
    reject_invalid: bool = field(default=True, metadata=opt(parse_bool, "reject_invalid_helo_hostname"))
    reject_non_fqdn: bool = field(default=False, metadata=opt(parse_bool, "reject_non_fqdn_helo_hostname"))
    reject_bare_ip: bool = field(
        default=True, metadata=opt(parse_bool, "reject_non_fqdn_helo_hostname (bare IP addresses only)")
    )
    # Off by default: MTAs behind NAT legitimately send their inside address.
    reject_literal_mismatch: bool = field(default=False, metadata=opt(parse_bool, ""))
    reject_impersonation: bool = field(
        default=True, metadata=opt(parse_bool, "check_helo_access with $myhostname etc. REJECT You are not me")
    )
    our_domains: tuple[str, ...] = field(
        default=(), metadata=opt(list_of(parse_hostname), "$mydestination in a helo_access table")
    )
    access_table: str = field(default="", metadata=opt(parse_str, "check_helo_access"))

    def validate(self) -> None:
        check_access_spec("access_table", self.access_table)


def _skip(check: str, why: str) -> Result:
    return Result(check, Outcome.SKIP, why)


def _fail(check: str, action: str, reply: Reply) -> Result:
    return Result(check, Outcome.FAIL, str(reply), verdict_for(action, reply))


def _rejected(code: int, status: str, helo: str, text: str) -> Reply:
    return Reply(code, status, f"<{helo}>: Helo command rejected: {text}")


def strip_trailing_dot(name: str) -> str:
    """smtpd's dup_if_truncate: drop one trailing dot, but not from ``..``."""
    return name[:-1] if len(name) > 1 and name.endswith(".") and not name.endswith("..") else name


@functools.lru_cache(maxsize=64)
def _our_ips(addresses: tuple[str, ...]) -> frozenset[IPAddress]:
    """The addresses we listen on and are reached at, parsed once (they
    are the same few for every session); unspecified ones left out."""
    return frozenset(a for a in map(parse_ip_or_none, addresses) if a is not None and not a.is_unspecified)


# What can go to Postfix as the client's HELO (XCLIENT HELO= and our EHLO):
# one token of printable ASCII, at most 255 octets (Postfix refuses a longer
# XCLIENT HELO= value).
_FORWARDABLE = re.compile(r"[\x21-\x7e]{1,255}")


def unforwardable_helo(helo: str) -> Reply | None:
    """The ``501 5.5.2 <helo>: Helo command rejected: Invalid name`` reply
    for a HELO name that cannot be forwarded to Postfix as it is (space,
    TAB, NUL, control or non-ASCII characters, over 255 octets); None when
    it can.  Not a configurable check: the session refuses such a name
    whatever ``[helo]`` says, so Postfix always sees the client's own HELO."""
    if _FORWARDABLE.fullmatch(helo):
        return None
    return _rejected(INVALID_HOSTNAME_CODE, "5.5.2", helo, "Invalid name")


def literal_address(helo: str) -> IPAddress | None:
    """The address in ``[1.2.3.4]`` or ``[IPv6:2001:db8::1]``, else None
    (smtpd's valid_mailhost_addr; an IPv4-mapped address comes back as IPv4)."""
    if not (len(helo) > 2 and helo.startswith("[") and helo.endswith("]")) or "%" in helo:
        return None
    inner = helo[1:-1]
    if inner[:5].lower() == "ipv6:":
        addr = parse_ip_or_none(inner[5:])
        return addr if addr is not None and ":" in inner[5:] else None
    try:
        return ipaddress.IPv4Address(inner)
    except ValueError:
        return None


def bare_address(helo: str) -> IPAddress | None:
    """The address when *helo* is an unbracketed IP address, else None."""
    return parse_ip_or_none(strip_trailing_dot(helo)) if "%" not in helo else None


def _literal_check(check: str, helo: str, action: str) -> Result:
    """reject_invalid_hostaddr, which smtpd applies to ``[...]`` names."""
    if literal_address(helo) is None:
        return _fail(check, action, _rejected(INVALID_HOSTNAME_CODE, "5.5.2", helo, "invalid ip address"))
    return Result(check, Outcome.PASS, "valid address literal")


def require_helo(helo: str | None, action: str = "enforce") -> Result:
    """smtpd_helo_required."""
    if helo is None:
        return _fail("helo_required", action, REPLIES["need_helo"])
    return Result("helo_required", Outcome.PASS, "HELO given")


def reject_invalid_helo_hostname(helo: str | None, action: str = "enforce") -> Result:
    """``501 5.5.2 <helo>: Helo command rejected: Invalid name``."""
    check = "helo_invalid"
    if helo is None:
        return _skip(check, "no HELO")
    if helo.startswith("["):
        return _literal_check(check, helo, action)
    if not valid_hostname(strip_trailing_dot(helo)) and bare_address(helo) is None:
        return _fail(check, action, _rejected(INVALID_HOSTNAME_CODE, "5.5.2", helo, "Invalid name"))
    return Result(check, Outcome.PASS, "valid name")


def reject_non_fqdn_helo_hostname(helo: str | None, action: str = "enforce") -> Result:
    """``504 5.5.2 <helo>: Helo command rejected: need fully-qualified hostname``."""
    check = "helo_non_fqdn"
    if helo is None:
        return _skip(check, "no HELO")
    if helo.startswith("["):
        return _literal_check(check, helo, action)
    name = strip_trailing_dot(helo)
    if not valid_hostname(name) or "." not in name:
        return _fail(check, action, _rejected(NON_FQDN_CODE, "5.5.2", helo, "need fully-qualified hostname"))
    return Result(check, Outcome.PASS, "fully-qualified")


def reject_bare_ip_helo(helo: str | None, action: str = "enforce") -> Result:
    """A bare IP address: ``504 5.5.2 <1.2.3.4>: Helo command rejected:
    need fully-qualified hostname``."""
    check = "helo_bare_ip"
    if helo is None:
        return _skip(check, "no HELO")
    if bare_address(helo) is not None:
        return _fail(check, action, _rejected(NON_FQDN_CODE, "5.5.2", helo, "need fully-qualified hostname"))
    return Result(check, Outcome.PASS, "not a bare IP address")


def reject_literal_mismatch(helo: str | None, client: IPAddress | None, action: str = "enforce") -> Result:
    """``554 5.7.1 <[1.2.3.4]>: Helo command rejected: Address literal does
    not match your IP address``; invalid literals are reject_invalid's.
    *client* is None when the client's address is unknown (a policy request
    without a valid ``client_address``)."""
    check = "helo_literal_mismatch"
    claimed = literal_address(helo) if helo is not None else None
    if helo is None or claimed is None:
        return _skip(check, "no valid address literal")
    if claimed == client:
        return Result(check, Outcome.PASS, "literal matches client address")
    text = "Address literal does not match your IP address"
    return _fail(check, action, _rejected(554, "5.7.1", helo, text))


def reject_impersonation(
    helo: str | None,
    client: IPAddress | None,
    *,
    hostname: str,
    our_domains: Iterable[str] = (),
    our_addresses: Iterable[str] = (),
    action: str = "enforce",
) -> Result:
    """``554 5.7.1 <helo>: Helo command rejected: You are not me`` when the
    client claims to be us (see the module docstring); *our_addresses* are
    the addresses we listen on (unspecified ones are ignored)."""
    check = "helo_impersonation"
    if helo is None:
        return _skip(check, "no HELO")
    ours = _our_ips(tuple(our_addresses))
    if client is not None and (client.is_loopback or client in ours):
        return _skip(check, "client is local")
    claimed = literal_address(helo) or bare_address(helo)
    if claimed is not None:
        impersonating = claimed.is_loopback or claimed in ours
    else:
        names = {hostname, *our_domains, *LOCAL_NAMES}
        impersonating = strip_trailing_dot(helo).lower() in {n.lower() for n in names}
    if impersonating:
        return _fail(check, action, _rejected(554, "5.7.1", helo, "You are not me"))
    return Result(check, Outcome.PASS, "not one of our names or addresses")


def check_helo_access(helo: str | None, table: Table, action: str = "enforce") -> Result:
    """check_helo_access: the result of the HELO name's entry in *table*."""
    if helo is None:
        return _skip("helo_access", "no HELO")
    return access_check("helo_access", action, lookup_helo(table, helo), HELO, helo)


def check_helo(
    config: HeloConfig,
    helo: str | None,
    client: IPAddress | None,
    *,
    hostname: str,
    our_addresses: Iterable[str] = (),
    table: Table | None = None,
) -> Result:
    """Run the enabled HELO checks in order: the first failure, an access
    table's OK, or a PASS whose reason carries the access table's finding
    (no match, DUNNO or WARN text) and the table's WARN in its ``warnings``.  *table* is the opened ``access_table``
    (:func:`smtpguard.tables.open_access_table`)."""
    if not config.enabled:
        return _skip("helo", "disabled")
    action = config.action
    if config.required and helo is None:
        return require_helo(helo, action)
    if helo is None:
        return _skip("helo", "no HELO")
    notes: list[str] = []
    warnings: tuple[Warn, ...] = ()
    if table is not None:
        found = check_helo_access(helo, table, action)
        if found.outcome is not Outcome.SKIP:
            return found
        notes.append(found.reason)
        warnings = found.warnings
    checks: tuple[tuple[bool, Callable[[], Result]], ...] = (
        (config.reject_impersonation, lambda: reject_impersonation(
            helo, client, hostname=hostname, our_domains=config.our_domains,
            our_addresses=our_addresses, action=action)),
        (config.reject_invalid, lambda: reject_invalid_helo_hostname(helo, action)),
        (config.reject_bare_ip, lambda: reject_bare_ip_helo(helo, action)),
        (config.reject_literal_mismatch, lambda: reject_literal_mismatch(helo, client, action)),
        (config.reject_non_fqdn, lambda: reject_non_fqdn_helo_hostname(helo, action)),
    )
    for enabled, run in checks:
        if enabled and (result := run()).outcome is Outcome.FAIL:
            return result
    return Result("helo", Outcome.PASS, "; ".join([f"<{helo}> passed", *notes]), warnings=warnings)
