"""The client access table: postscreen_access_list and check_client_access.

How it works: ``client_table`` is a Postfix table (``cidr:``, ``regexp:``,
``pcre:``, ``texthash:``...) looked up with access(5) semantics
(:func:`smtpguard.tables.lookup_client`: the IP address and its
truncations, ``192.0.2.7``, ``192.0.2``, ``192.0``, ``192``; in a cidr
table, first match wins).  It runs at connect time, before the allowlist
cache and the pregreet wait (design.md 1.1):

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

from dataclasses import dataclass, field

from ..net import IPAddress
from ..options import one_of, opt, parse_bool, parse_str
from ..tables import CLIENT, Table, access_check, check_access_spec, lookup_client
from ..verdict import ACTIONS, Result
from ._common import skip

NAME = "client_access"


@dataclass(frozen=True)
class AccessConfig:
    """``[access]``: postscreen_access_list / check_client_access."""

    enabled: bool = field(default=True, metadata=opt(parse_bool, ""))
    action: str = field(default="enforce", metadata=opt(one_of(*ACTIONS), "postscreen_blacklist_action"))
    client_table: str = field(
        default="", metadata=opt(parse_str, "postscreen_access_list / check_client_access")
    )

    def validate(self) -> None:
        check_access_spec("client_table", self.client_table)


def check_client_access(cfg: AccessConfig, table: Table | None, ip: IPAddress, name: str = "unknown") -> Result:
    """The client's entry in *table* (the opened ``client_table``)."""
    if not cfg.enabled or table is None:
        return skip(NAME, "no table")
    host = None if name == "unknown" else name
    return access_check(NAME, cfg.action, lookup_client(table, ip, host), CLIENT, f"{name}[{ip}]")
