"""The client access table: postscreen_access_list and check_client_access.

How it works: ``client_table`` is a list, like postscreen_access_list
(``permit_mynetworks, cidr:/etc/postfix/postscreen_access.cidr``): Postfix
tables (``cidr:``, ``regexp:``, ``pcre:``, ``texthash:``...) looked up with
access(5) semantics (:func:`smtpguard.tables.lookup_client`: the IP address
and its truncations, ``192.0.2.7``, ``192.0.2``, ``192.0``, ``192``; in a
cidr table, first match wins) and ``permit_mynetworks``, which permits the
clients in ``mynetworks``.  The entries are tried in order and the first
that has an answer for the client decides; as in postscreen, ``DUNNO``
ends the list.  A table written as a bare path is an error (Postfix would
read it with its default type; smtpguard does not guess).  The list runs
at connect time, before the allowlist cache and the pregreet wait
(design.md 1.1):

* ``OK``/``PERMIT`` (postscreen's ``permit``): the client is allowlisted
  and skips the screening tests (pregreet, pipelining, non-SMTP, bare
  newline, HELO); envelope checks still apply.
* ``REJECT [text]``/``5NN text``: with the default ``enforce`` action the
  client hears smtpd's reply at every RCPT (smtpd_delay_reject), e.g.
  ``554 5.7.1 <unknown[192.0.2.7]>: Client host rejected: Access denied``;
  ``drop`` sends 521 and hangs up.  ``421``/``521`` always hang up.
* ``DEFER [text]``/``4NN text``: the 4xx at every RCPT.
* ``DUNNO``: no decision; ``WARN text``: logged.

The HELO, sender and recipient tables are the ``access_table`` keys of
``[helo]`` and ``[addresses]``.  All tables reload on SIGHUP.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any

from ..net import IPAddress, IPNetwork
from ..options import list_of, one_of, opt, parse_bool, parse_network, parse_str
from ..tables import CLIENT, Table, access_check, check_access_spec, lookup_client, open_access_table
from ..verdict import ACTIONS, Outcome, Result
from ._common import skip

NAME = "client_access"
PERMIT_MYNETWORKS = "permit_mynetworks"

Network = IPNetwork


def parse_access_list(value: Any) -> tuple[str, ...]:
    """``permit_mynetworks`` and ``type:path`` tables: a TOML list, or one
    string separated by commas and whitespace as in main.cf."""
    if isinstance(value, str):
        return tuple(e for e in re.split(r"[\s,]+", value) if e)
    return list_of(parse_str)(value)


@dataclass(frozen=True)
class AccessConfig:
    """``[access]``: postscreen_access_list / check_client_access."""

    enabled: bool = field(default=True, metadata=opt(parse_bool, ""))
    action: str = field(default="enforce", metadata=opt(one_of(*ACTIONS), "postscreen_blacklist_action"))
    client_table: tuple[str, ...] = field(
        default=(), metadata=opt(parse_access_list, "postscreen_access_list / check_client_access")
    )
    mynetworks: tuple[Network, ...] = field(
        default=(ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")),
        metadata=opt(list_of(parse_network), "mynetworks (mynetworks_style = host)"),
    )

    def validate(self) -> None:
        for spec in self.client_table:
            if spec != PERMIT_MYNETWORKS:
                check_access_spec("client_table", spec)


@dataclass(frozen=True)
class MyNetworks:
    """``permit_mynetworks`` in an opened client access list."""

    networks: tuple[Network, ...]

    def __contains__(self, ip: IPAddress) -> bool:
        return any(ip in net for net in self.networks)


ClientAccess = tuple[Table | MyNetworks, ...]


def open_client_access(cfg: AccessConfig) -> ClientAccess:
    """The ``client_table`` list with its tables read (on every load and reload)."""
    return tuple(MyNetworks(cfg.mynetworks) if spec == PERMIT_MYNETWORKS else open_access_table(spec)
                 for spec in cfg.client_table)


def check_client_access(cfg: AccessConfig, lists: ClientAccess | Table | None, ip: IPAddress,
                        name: str = "unknown") -> Result:
    """The first answer for the client in *lists* (the opened ``client_table``)."""
    if isinstance(lists, Table):
        lists = (lists,)
    if not cfg.enabled or not lists:
        return skip(NAME, "no table")
    host = None if name == "unknown" else name
    for entry in lists:
        if isinstance(entry, MyNetworks):
            if ip in entry:
                return Result(NAME, Outcome.PASS, f"<{name}[{ip}]>: {PERMIT_MYNETWORKS}")
            continue
        value = lookup_client(entry, ip, host)
        if value is not None:  # the first answer decides; DUNNO ends the list (postscreen)
            return access_check(NAME, cfg.action, value, CLIENT, f"{name}[{ip}]")
    return access_check(NAME, cfg.action, None, CLIENT, f"{name}[{ip}]")
