"""IP addresses as smtpguard carries them (parsed once, then typed), and
the one host name validator.

The listener parses the client's address with :func:`parse_ip` when it
accepts the connection (or reads a PROXY header); from there on the
:class:`~smtpguard.session.Session`, the checks, the DNS lookups and the
tables get an :data:`IPAddress`, never the text again.  Text is made where a
line is written (logs, XCLIENT, store keys): ``str(ip)``, the canonical form
Postfix writes too.

:func:`valid_hostname` is the only host name syntax check: PTR names, HELO
names, DNSBL/RHSBL domains, configured host names and allowlist entries all
go through it, each caller saying which of Postfix's rules it waives.

Imports nothing of smtpguard's, so every module can build on it.
"""

from __future__ import annotations

import functools
import ipaddress
import re

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_ip(text: str) -> IPAddress:
    """Parse *text*; an IPv6 zone (``%eth0``) is dropped and an IPv4-mapped
    IPv6 address (``::ffff:1.2.3.4``) becomes the IPv4 address, as Postfix
    does for logging, lookups and access checks.  Raises ValueError for
    something that is not an IP address."""
    addr = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def client_network(ip: IPAddress, ipv4_mask: int, ipv6_mask: int) -> str:
    """The address masked to its network, as text: the client part of a
    greylisting key (postgrey's ``do_client_substitutions`` with
    ``--ipv4cidr``/``--ipv6cidr``: ``192.0.2.77`` -> ``192.0.2.0``), and the
    key an IPv6 client's connections are counted under (its /64).  An
    IPv4-mapped IPv6 address counts as the IPv4 address."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    host_bits = ip.max_prefixlen - (ipv4_mask if ip.version == 4 else ipv6_mask)
    return str(type(ip)(int(ip) >> host_bits << host_bits))


def parse_ip_or_none(text: str) -> IPAddress | None:
    """:func:`parse_ip`, None for text that is not an IP address."""
    try:
        return parse_ip(text)
    except ValueError:
        return None


@functools.cache
def _hostname_pattern(underscore: bool, lengths: bool, numeric: bool) -> re.Pattern[str]:
    chars = "A-Za-z0-9_-" if underscore else "A-Za-z0-9-"
    label = f"(?!-)[{chars}]{{1,63}}(?<!-)" if lengths else f"(?!-)[{chars}]+(?<!-)"
    checks = ("(?=.{1,255}$)" if lengths else "") + ("" if numeric else "(?=.*[^0-9.])")
    return re.compile(f"{checks}(?:{label}\\.)*{label}")


def valid_hostname(name: str, *, underscore: bool = True, lengths: bool = True, numeric: bool = False) -> bool:
    """Postfix's valid_hostname(): dot-separated labels of letters, digits,
    ``_`` and inner ``-``, no leading, trailing or doubled dot, labels of at
    most 63 and names of at most 255 characters, not all numeric (so
    ``1.2.3.4`` is no host name).

    Callers that deliberately accept other names say so: *underscore* False
    refuses ``_`` (a name of ours that goes into replies and banners,
    RFC 1123); *lengths* False drops the length limits and *numeric* True
    accepts all-numeric names (settings and allowlist entries whose
    acceptance must not change: they never were held to those limits, and a
    numeric entry is told apart from an address before this check)."""
    return _hostname_pattern(underscore, lengths, numeric).fullmatch(name) is not None
