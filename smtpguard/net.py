"""IP addresses as smtpguard carries them: parsed once, then typed.

The listener parses the client's address with :func:`parse_ip` when it
accepts the connection (or reads a PROXY header); from there on the
:class:`~smtpguard.session.Session`, the checks, the DNS lookups and the
tables get an :data:`IPAddress`, never the text again.  Text is made where a
line is written (logs, XCLIENT, store keys): ``str(ip)``, the canonical form
Postfix writes too.

Imports nothing of smtpguard's, so every module can build on it.
"""

from __future__ import annotations

import ipaddress

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


def parse_ip_or_none(text: str) -> IPAddress | None:
    """:func:`parse_ip`, None for text that is not an IP address."""
    try:
        return parse_ip(text)
    except ValueError:
        return None
