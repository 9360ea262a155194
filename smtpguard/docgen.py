"""Generate reference documentation from the code, so it cannot drift.

    python -m smtpguard.docgen configuration > docs/configuration.md
    python -m smtpguard.docgen metrics > docs/metrics-reference.md

``configuration`` walks :class:`smtpguard.config.Config`: every section, every
key with its type (read from its parser), default, the Postfix / postscreen /
postgrey parameter it corresponds to (``opt(..., equivalent)``) and its
description (``opt(..., doc=...)``, else :data:`DESCRIPTIONS`).  A section
another branch adds shows up on the next regeneration; the unit test
``tests/unit/test_docgen.py`` fails while the committed files are stale.

``metrics`` lists every metric in :data:`smtpguard.metrics.METRICS` with its
type, labels and help text.
"""

from __future__ import annotations

import dataclasses
import inspect
import ipaddress
import sys
from collections.abc import Iterator
from typing import Any

from .config import Config
from .metrics import METRICS
from .options import HostPort

#: What each key does, for keys whose ``opt()`` carries no ``doc``; Markdown.
#: ``tests/unit/test_docgen.py`` fails for a key that has neither.
_ACTION = ("What a client that fails this test gets: `enforce` rejects each RCPT with the test's 5xx "
           "(postscreen's enforce), `tempfail` the 4xx form, `drop` sends 521 and hangs up, "
           "`ignore` only logs and counts (Postfix's `warn_if_reject`).")
_LIMIT_ACTION = ("`drop`: answer `421 4.7.0` and hang up (the sender rate: `450 4.7.1`, that message deferred); "
                 "`ignore`: only log the warning and count.")
_TTL = "How long a pass of this test is remembered for the client's address (postscreen's temporary allowlist)."
_REJECT_CODE = "Reply code for a definite failure: 4xx (the sender retries) or 5xx (permanent)."
_ON_DNS_ERROR = ("When the DNS lookup fails temporarily: `tempfail` answers 450 (Postfix's default), "
                 "`skip` lets the client through.")
DESCRIPTIONS: dict[str, str] = {
    "server.listen": "Addresses to accept SMTP clients on; IPv6 as `[::]:25`.",
    "server.hostname": "The name in the banner, EHLO reply and logs.",
    "server.banner": "Text after `220` in the greeting; `$myhostname` is expanded.",
    "server.max_connections": "Client sessions at once; beyond it new clients get `421 4.3.2` and are closed.",
    "server.message_size_limit": "Largest message accepted (advertised in EHLO SIZE); `k`/`m`/`g` suffixes.",
    "server.line_length_limit": "Longest command or message line (at least 1000, RFC 5321).",
    "server.command_timeout": "Idle time allowed between client commands before `421` and close.",
    "server.data_timeout": "Idle time allowed while the client sends the message body.",
    "server.bare_newline": "Bare CR/LF in message data: `reject` (550, like Postfix) or `normalize` to CRLF.",
    "server.disable_vrfy_command": "Answer VRFY with 502.",
    "server.shutdown_timeout": "On SIGTERM: how long transactions in progress may take before 421 and close.",
    "server.proxy_protocol": "Expect a PROXY protocol header (v1 or v2) from a load balancer before SMTP; "
                             "the client address is taken from it.",
    "server.proxy_trusted": "Networks allowed to send a PROXY header; connections from elsewhere are closed.",
    "server.proxy_timeout": "Time the load balancer has to send the PROXY header.",
    "upstream.address": "The Postfix smtpd that receives accepted sessions (must allow XCLIENT from us).",
    "upstream.connect_timeout": "Time to connect to Postfix and get its greeting.",
    "upstream.timeout": "Time to wait for each Postfix reply.",
    "state.url": "Where screening results, allowlist cache and greylist triplets live: "
                 "`sqlite:////var/lib/smtpguard/smtpguard.db` (four slashes: an absolute path; three: relative "
                 "to the working directory), `redis://host:port/db`, `unix:///path/redis.sock?db=N`, `memory://` "
                 "(lost on restart).",
    "state.cleanup_interval": "How often expired cache entries and greylist triplets are deleted.",
    "metrics.listen": "HTTP endpoint for `/metrics`, `/healthz`, `/readyz`; `\"\"` disables it.",
    "log.level": "Lowest level logged: debug, info, warning, error.",
    "log.syslog_name": "First part of the program name in each line (`syslog_name/service_name[pid]`), "
                       "as Postfix's `syslog_name`.",
    "log.service_name": "Second part of the program name; `smtpd` keeps pflogsumm and fail2ban working "
                        "unchanged; `\"\"` logs as `syslog_name[pid]` alone.",
    "log.output": "`stderr` (Postfix `maillog_file` format, for containers and files), `syslog` (/dev/log, "
                  "facility mail), `journal` (journald's native protocol: the journal keeps time and host, the "
                  "identifier is the program name, so fail2ban's `backend = systemd` matches), `auto` (`journal` "
                  "when started by systemd with stderr to the journal, else `stderr`).",
    "tls.security_level": "`may`: offer STARTTLS when a certificate is set; `encrypt`: also refuse MAIL before "
                          "STARTTLS (never on a public MX); `none`: no STARTTLS.",
    "tls.cert_file": "PEM certificate (may hold the key and chain too); `\"\"`: no STARTTLS.",
    "tls.key_file": "PEM private key; `\"\"`: the key is in `cert_file`.",
    "tls.chain_file": "PEM intermediate certificates sent after the certificate.",
    "tls.min_protocol": "Oldest TLS version accepted.",
    "dns.nameservers": "Resolvers to ask, as `IP` or `IP:PORT`; empty: those of /etc/resolv.conf. A DNSBL "
                       "needs a resolver of your own (public resolvers are refused by most lists).",
    "dns.timeout": "Time for one try at one nameserver.",
    "dns.lifetime": "Time for a whole question, retries included; a DNSBL slower than this counts as not listed.",
    "dns.cache_size": "Answers kept in the in-process DNS cache.",
    "dns.negative_ttl": "Longest time a \"no such name\" answer is cached.",
    "dns.max_in_flight": "DNS queries at once; more wait their turn.",
    "screen.delay_reject": "Answer HELO and sender rejections at RCPT, so the log line holds helo, from and to.",
    "limits.enabled": "Apply the per-client connection count and rate limits.",
    "limits.action": _LIMIT_ACTION,
    "limits.connection_count_limit": "Sessions one client address may have at once; 0: no limit.",
    "limits.connection_rate_limit": "Connections one client address may open per `rate_time_unit`; 0: no limit.",
    "limits.sender_rate_limit": "Messages one sender address may send per `rate_time_unit`, counted by the "
                                "policy service's `sender_rate` check (`[policy] checks`) once per message; over "
                                "it, that message's recipients get `450 4.7.1 Error: too much mail from <sender>` "
                                "(like smtpd_client_message_rate_limit, per sender rather than per client; "
                                "policyd's sender quota). 0: no limit.",
    "limits.rate_time_unit": "The period the connection and sender rates are counted over.",
    "limits.exceptions": "Client networks the limits do not apply to.",
    "access.enabled": "Look clients up in `client_table` at connect.",
    "access.mynetworks": "The networks `permit_mynetworks` in `client_table` permits (Postfix's "
                         "`mynetworks`; the default is `mynetworks_style = host` on loopback).",
    "access.action": "What a client the table rejects gets (see `enforce`/`drop`/`tempfail`/`ignore` above); "
                     "a table's 4xx always defers and 421/521 always hang up.",
    "access.client_table": "Postfix access tables looked up for the client address, in order; the first "
                           "answer decides and `DUNNO` ends the list, as in postscreen: `permit_mynetworks` "
                           "(the `mynetworks` key), `cidr:/etc/postfix/postscreen_access.cidr`, "
                           "`texthash:`, `regexp:`, `pcre:`. `OK`/`permit` allowlists, `REJECT`/`DEFER` decide. "
                           "Unlike postscreen's default, `permit_mynetworks` applies only when listed.",
    "dnsbl.enabled": "Look clients up in `sites`. Setting `sites` turns it on (as a non-empty "
                     "`postscreen_dnsbl_sites` does); `false` with sites set keeps it off, with a warning.",
    "dnsbl.action": _ACTION,
    "dnsbl.sites": "DNSBLs and DNSWLs with filter and weight: `zen.spamhaus.org*3`, "
                   "`b.barracudacentral.org=127.0.0.[2..11]*2`, `list.dnswl.org=127.0.[0..255].[1..3]*-2`; "
                   "a TOML list or one main.cf-style string.",
    "dnsbl.threshold": "Score (sum of the weights of the lists that answer) at which the client fails.",
    "dnsbl.allowlist_threshold": "Score at or below which (0 or negative, from DNSWL weights) the client skips "
                                 "the other tests and greylisting; 0: off.",
    "dnsbl.min_ttl": "Shortest time a DNSBL pass is cached, whatever the answers' TTL.",
    "dnsbl.max_ttl": "Longest time a DNSBL pass is cached.",
    "dnsbl.reply": "Reply text; `$client_address`, `$rbl_domain` and `$rank` are expanded.",
    "dnsbl.reply_map": "Names to show instead of a list's real (e.g. keyed) domain: "
                       "`{\"KEY.zen.dq.spamhaus.net\" = \"zen.spamhaus.org\"}`.",
    "pregreet.enabled": "Send the first banner line, wait `greet_wait` and fail clients that talk first.",
    "pregreet.action": _ACTION,
    "pregreet.greet_wait": "How long to wait, after the first banner line, before the final `220`.",
    "pregreet.ttl": _TTL,
    "pipelining.enabled": "Fail clients that send commands before the reply to the previous one "
                          "without PIPELINING having been offered.",
    "pipelining.action": _ACTION,
    "pipelining.ttl": _TTL,
    "non_smtp.enabled": "Fail clients that send `forbidden_commands` or header lines (`Subject:`) as commands.",
    "non_smtp.action": _ACTION,
    "non_smtp.ttl": _TTL,
    "non_smtp.forbidden_commands": "Command verbs that mark a non-SMTP client (HTTP proxies and the like).",
    "bare_newline.enabled": "Fail clients that end a command with a bare LF.",
    "bare_newline.action": _ACTION,
    "bare_newline.ttl": _TTL,
    "errors.enabled": "Apply the error and command limits.",
    "errors.action": "`drop`: `421` and hang up when a limit is reached; `ignore`: only log.",
    "errors.soft_limit": "Errors after which each reply is delayed by `error_sleep`.",
    "errors.hard_limit": "Errors after which the client is disconnected.",
    "errors.error_sleep": "Delay before each error reply once `soft_limit` is reached.",
    "errors.command_count_limit": "Commands allowed before the first recipient passes.",
    "errors.command_time_limit": "Time allowed for a whole session before the first recipient passes.",
    "client_name.action": _ACTION,
    "client_name.reject_code": _REJECT_CODE,
    "client_name.on_dns_error": _ON_DNS_ERROR,
    "client_name.lookup": "Look the client's name up (PTR, then the name's addresses) for logs, tables and "
                          "greylisting; `false` logs every client as `unknown`.",
    "client_name.enabled": "Reject clients without the name `require` asks for.",
    "client_name.require": "`reverse`: any PTR name; `fcrdns`: a PTR name whose addresses include the client's.",
    "helo.enabled": "Apply the HELO/EHLO checks.",
    "helo.action": _ACTION,
    "helo.required": "Clients must send HELO/EHLO before MAIL (`503` otherwise).",
    "helo.reject_invalid": "Reject a HELO name that is not a valid host name or address literal.",
    "helo.reject_non_fqdn": "Reject a HELO name without a dot (not fully qualified).",
    "helo.reject_bare_ip": "Reject a HELO that is an IP address without brackets.",
    "helo.reject_literal_mismatch": "Reject an `[address]` literal that is not the client's address "
                                    "(off: clients behind NAT send their inside address).",
    "helo.reject_impersonation": "Reject a HELO that claims to be us: `hostname`, `our_domains`, localhost "
                                 "or one of our addresses.",
    "helo.our_domains": "More names that only we may use in HELO.",
    "helo.access_table": "A Postfix access table looked up for the HELO name (and its parent domains).",
    "helo_hostname.action": _ACTION,
    "helo_hostname.reject_code": _REJECT_CODE,
    "helo_hostname.on_dns_error": _ON_DNS_ERROR,
    "helo_hostname.enabled": "Reject a HELO name that has no A, AAAA or MX record.",
    "addresses.enabled": "Apply the sender and recipient address checks.",
    "addresses.action": _ACTION,
    "addresses.strict_syntax": "Reject MAIL/RCPT addresses that break RFC 5321's grammar (`501`).",
    "addresses.reject_non_fqdn_sender": "Reject a sender whose domain has no dot.",
    "addresses.reject_non_fqdn_recipient": "Reject a recipient whose domain has no dot.",
    "addresses.sender_access_table": "A Postfix access table looked up for the sender (address, domain, "
                                     "parent domains, `user@`).",
    "addresses.recipient_access_table": "A Postfix access table looked up for each recipient.",
    "addresses.recipient_delimiter": "Characters that start an address extension (`+`), stripped for a second "
                                     "table lookup.",
    "greylist.enabled": "Greylist every (client network, sender, recipient) triplet not seen before, once "
                        "Postfix has accepted the recipient (a relay attempt or unknown user gets Postfix's "
                        "reject at once and leaves no triplet).",
    "greylist.action": "`tempfail`: answer 450 until the triplet has waited `delay`; `ignore`: only log.",
    "greylist.delay": "How long a new triplet is deferred.",
    "greylist.retry_window": "How long after the first attempt a retry is still accepted "
                             "(postgrey's `--retry-window=2` is two days: write `2d`).",
    "greylist.max_age": "A triplet unused for this long is forgotten.",
    "greylist.ipv4_mask": "IPv4 clients are greylisted per network of this prefix length.",
    "greylist.ipv6_mask": "IPv6 clients are greylisted per network of this prefix length.",
    "greylist.auto_allowlist_clients": "After this many passed deliveries (at most one an hour counted), a client "
                                       "network is no longer greylisted; 0: off.",
    "greylist.text": "Reply text; `%s` is the seconds left, `%r` the recipient's domain.",
    "greylist.client_allowlist": "postgrey `whitelist_clients` files (names, domains, addresses, networks, "
                                 "`/regexp/`): clients never greylisted.",
    "greylist.recipient_allowlist": "postgrey `whitelist_recipients` files: recipients never greylisted "
                                    "(`postmaster@` and `abuse@` always are).",
    "greylist.use_default_client_allowlist": "Also use the client allowlist shipped with smtpguard (postgrey's "
                                             "list of big senders that retry from other addresses).",
    "greylist.on_store_error": "When the state store cannot be reached: `accept` the recipient or `tempfail` it.",
    "greylist.spf_key": "When the sender's SPF record passes for the client, key the triplet by the "
                        "SPF-validated sender domain instead of the client network, so a sender pool retrying "
                        "from another address passes after one delay; any other SPF result (or a DNS failure) "
                        "is ordinary greylisting. The auto-allowlist still counts client networks.",
    "policy.listen": "Where the policy service listens for Postfix (`\"127.0.0.1:10023\"` or `\"unix:/path\"`); "
                     "empty: `serve` runs no policy service.",
    "policy.checks": "The checks the service runs, each at `RCPT` (`connection_rate`: `CONNECT`) or at the "
                     "states after `@` (`\"rhsbl_helo@HELO,RCPT\"`); each uses its own section's settings.",
    "policy.default_action": "The answer to a request that cannot be evaluated (malformed, oversized) or that "
                             "failed with an internal error.",
    "policy.greylist_action": "The answer to a greylisted recipient, followed by `4.2.0` and `[greylist] text`.",
    "policy.greylist_header": "A header PREPENDed when a triplet passes (`%t` delay, `%v` version, `%h` host "
                              "name, `%d` date); `\"\"`: none.",
    "policy.timeout": "A request once begun must be complete within this.",
    "policy.idle_timeout": "A Postfix connection without a request for this long is closed.",
    "policy.max_attribute_size": "Longest `name=value` line; a longer one gets `default_action`.",
    "policy.max_request_size": "Largest request; a larger one gets `default_action`.",
    "policy.max_connections": "Postfix connections served at once; more are closed at once.",
    "sender_domain.action": _ACTION,
    "sender_domain.reject_code": _REJECT_CODE,
    "sender_domain.on_dns_error": _ON_DNS_ERROR,
    "sender_domain.enabled": "Reject a sender whose domain has no MX, A or AAAA record.",
    "rhsbl.enabled": "Look up names in the RHSBL `*_sites`.",
    "rhsbl.action": _ACTION,
    "rhsbl.helo_sites": "RHSBLs looked up for the HELO name (`domain[=filter]`).",
    "rhsbl.sender_sites": "RHSBLs looked up for the sender's domain.",
    "rhsbl.reverse_client_sites": "RHSBLs looked up for the client's reverse name.",
    "rhsbl.override": "An access table; names it maps to `OK` are not looked up.",
}

#: Readable types, by the parser's ``module.qualname`` (closures: the factory's name).
TYPES: dict[str, str] = {
    "smtpguard.options.parse_duration": "duration (`30s`, `5m`, `2d`)",
    "smtpguard.options.parse_size": "size in bytes (`k`/`m`/`g` suffix)",
    "smtpguard.options.parse_int": "integer, 0 or more",
    "smtpguard.options.parse_bool": "`true` or `false`",
    "smtpguard.options.parse_str": "string",
    "smtpguard.options.parse_hostname": "host name",
    "smtpguard.options.parse_hostport": "`HOST:PORT`",
    "smtpguard.options.parse_optional_hostport": "`HOST:PORT`, or `\"\"` for off",
    "smtpguard.options.parse_network": "network (`192.0.2.0/24`, `2001:db8::/32` or one address)",
    "smtpguard.options.parse_state_url": "URL (`sqlite:///`, `redis://`, `unix://`, `memory://`)",
    "smtpguard.dns.parse_nameserver": "`IP` or `IP:PORT`",
    "smtpguard.checks.nonsmtp.parse_verb": "command verb",
    "smtpguard.checks.rdns.parse_reply_code": "reply code 400-599",
    "smtpguard.checks.dnsbl.parse_site": "DNSBL sites (`domain[=filter][*weight]`)",
    "smtpguard.checks.dnsbl.parse_rhsbl_site": "RHSBL sites (`domain[=filter]`)",
    "smtpguard.checks.dnsbl.parse_signed_int": "integer (may be negative)",
    "smtpguard.checks.dnsbl.parse_reply_template": "reply text (`$client_address`, `$rbl_domain`, `$rank`)",
    "smtpguard.checks.dnsbl.parse_reply_map": "table of `\"listed domain\" = \"name shown\"`",
    "smtpguard.checks.greylist._text": "one line of text",
    "smtpguard.checks.greylist.parse_postgrey_days": "duration (`30s`, `5m`, `2d`)",
    "smtpguard.checks.greylist.parse_client_allowlist": "file name or list of file names",
    "smtpguard.checks.greylist.parse_recipient_allowlist": "file name or list of file names",
    "smtpguard.checks.access.parse_access_list": "list of `permit_mynetworks` and `type:/path` tables",
    "smtpguard.handoff.parse_socket_path": "absolute path, or `\"\"` for off",
    "smtpguard.policy.settings.parse_endpoints": "`HOST:PORT` or `unix:/path`, or a list of them",
    "smtpguard.policy.settings.parse_checks": "list of `check[@STATE,STATE]`",
    "smtpguard.policy.settings.parse_action": "access(5) action (`DUNNO`, `DEFER_IF_PERMIT`, `451 4.3.0 text`)",
    "smtpguard.policy.settings.parse_greylist_action": "`DEFER_IF_PERMIT`, `DEFER` or a 4xx code",
    "smtpguard.policy.settings.parse_header": "header line `Name: value`, or `\"\"` for none",
}

#: Keys whose parser is a plain string but whose value is something more definite.
KEY_TYPES: dict[str, str] = {
    "tls.cert_file": "file path",
    "tls.key_file": "file path",
    "tls.chain_file": "file path",
    "helo.access_table": "Postfix table (`type:/path`)",
    "addresses.sender_access_table": "Postfix table (`type:/path`)",
    "addresses.recipient_access_table": "Postfix table (`type:/path`)",
    "rhsbl.override": "Postfix table (`type:/path`)",
    "addresses.recipient_delimiter": "characters",
}


def describe_parser(parse: Any) -> str | None:
    """A readable type for a config value's parser (``duration``, ``list of
    `HOST:PORT` ``...), or None for a parser :data:`TYPES` does not know."""
    name = getattr(parse, "__qualname__", "")
    cells = [c.cell_contents for c in (getattr(parse, "__closure__", None) or ())]
    if name.startswith("one_of."):
        choices = next((c for c in cells if isinstance(c, tuple)), ())
        return "one of " + ", ".join(f"`{c}`" for c in choices)
    if name.startswith("sites_of."):  # a list_of() that also takes a main.cf-style string
        return next((describe_parser(c) for c in cells if getattr(c, "__qualname__", "").startswith("list_of.")),
                    None)
    if name.startswith("list_of."):
        item = next((c for c in cells if callable(c)), None)
        inner = describe_parser(item) if item else None
        return f"list of {inner}" if inner else None
    if name.startswith("_mask."):
        bits = next((c for c in cells if isinstance(c, int)), 0)
        return f"prefix length 1-{bits}"
    return TYPES.get(f"{getattr(parse, '__module__', '')}.{name}")


def key_type(key: str, parse: Any) -> str | None:
    return KEY_TYPES.get(key) or describe_parser(parse)


def toml_value(value: Any) -> str:
    """A default as it would be written in the TOML file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return '""'
    if isinstance(value, (HostPort, ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return f'"{value}"'
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    sources = getattr(value, "sources", None)  # a value loaded from files: what was written is the file list
    if isinstance(sources, tuple):
        return toml_value(sources)
    if dataclasses.is_dataclass(value):  # written as a string: [policy]'s endpoints and checks
        return f'"{value}"'
    return str(value)


def duration(seconds: float) -> str:
    """``300.0`` -> ``"5m"``: the largest unit that divides evenly."""
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f'"{int(seconds // size)}{unit}"'
    return f'"{int(seconds)}s"' if float(seconds).is_integer() else f'"{seconds}s"'


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _sections(cls: type, prefix: str) -> list[tuple[str, type]]:
    out = [(prefix, cls)]
    for f in dataclasses.fields(cls):
        if "parse" not in f.metadata and dataclasses.is_dataclass(_default(f)):
            out += _sections(type(_default(f)), f"{prefix}.{f.name}")
    return out


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


#: What each section is for, in an admin's words (Markdown); a section
#: without an entry gets its class docstring, converted from reST.
SECTIONS: dict[str, str] = {
    "server": "The SMTP listener clients talk to (Postfix's `smtpd` on port 25 and its `master.cf` line).",
    "upstream": "The Postfix `smtpd` that gets the sessions smtpguard accepts, announced with `XCLIENT`.",
    "handoff": "The fast path: allowlisted and `PASS OLD` clients handed to a Postfix smtpd `pass` service, "
               "as postscreen does ([handoff.md](handoff.md)).",
    "state": "Where the allowlist cache, rate counters and greylist triplets are kept.",
    "metrics": "Prometheus metrics and the health endpoints ([metrics.md](metrics.md)).",
    "log": "Postfix-style log lines ([logging.md](logging.md)).",
    "tls": "STARTTLS towards clients (Postfix's `smtpd_tls_*`, [transport.md](transport.md)).",
    "dns": "Which nameservers to ask, how long to wait, what to cache. `timeout` bounds one try at one "
           "nameserver (resolv.conf's 5s); `lifetime` the whole question, retries included (10s, Postfix's "
           "`postscreen_dnsbl_timeout`): a DNSBL that takes longer counts as not listed. With the default 6s "
           "greet wait most answers are in long before the wait ends.",
    "screen": "How screening verdicts are delivered.",
    "limits": "Per-client connection count and rate (Postfix's anvil: `smtpd_client_connection_*_limit`).",
    "access": "The permanent access list: postscreen's `postscreen_access_list`, smtpd's "
              "`check_client_access` ([screening.md](screening.md)).",
    "dnsbl": "postscreen's weighted DNSBL/DNSWL test ([dns.md](dns.md)).",
    "pregreet": "postscreen's pregreet test: clients that talk before the greeting (`postscreen_greet_*`).",
    "pipelining": "Clients that send commands ahead without PIPELINING (`postscreen_pipelining_*`, "
                  "`reject_unauth_pipelining`).",
    "non_smtp": "Clients that send HTTP or header lines as commands (`postscreen_non_smtp_command_*`).",
    "bare_newline": "Clients that end commands with a bare LF (`postscreen_bare_newline_*`).",
    "errors": "Error and command limits (`smtpd_*_error_limit`, `postscreen_command_*_limit`).",
    "client_name": "The client's reverse DNS name: looked up at connect (`lookup`) and, when `enabled`, "
                   "required (`reject_unknown_reverse_client_hostname` / `reject_unknown_client_hostname`).",
    "helo": "HELO/EHLO checks (`smtpd_helo_restrictions`).",
    "helo_hostname": "`reject_unknown_helo_hostname`: the HELO name must resolve.",
    "addresses": "Sender and recipient address checks (`smtpd_sender_restrictions`, "
                 "`smtpd_recipient_restrictions`).",
    "greylist": "Greylisting with postgrey's semantics ([greylisting.md](greylisting.md)); each key names its "
                "postgrey option. postgrey's durations are in days: its `--retry-window=2` is `\"2d\"` here.",
    "sender_domain": "`reject_unknown_sender_domain`: the sender's domain must resolve.",
    "rhsbl": "smtpd's `reject_rhsbl_helo`, `reject_rhsbl_sender` and `reject_rhsbl_reverse_client`.",
}


def markdown(doc: str) -> str:
    """A reST docstring as Markdown: dedented, ````x```` as `x`, one paragraph per blank line."""
    text = inspect.cleandoc(doc).replace("``", "`")
    return "\n\n".join(" ".join(p.split()) for p in text.split("\n\n"))


def keys() -> Iterator[tuple[str, dataclasses.Field[Any]]]:
    """Every configuration key: ``(section.key, field)``."""
    for f in dataclasses.fields(Config):
        for section, cls in _sections(type(_default(f)), f.name):
            for kf in dataclasses.fields(cls):
                if "parse" in kf.metadata:
                    yield f"{section}.{kf.name}", kf


def description(key: str, f: dataclasses.Field[Any]) -> str:
    """The admin-facing text of :data:`DESCRIPTIONS`, else the field's own ``doc``."""
    return str(DESCRIPTIONS.get(key) or f.metadata.get("doc") or "")


def undescribed() -> list[str]:
    """Keys without a description or a readable type (the unit test wants none)."""
    return [key for key, f in keys() if not description(key, f) or not key_type(key, f.metadata["parse"])]


def configuration() -> str:
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated by `python -m smtpguard.docgen configuration > docs/configuration.md`;"
        " do not edit by hand. -->",
        "",
        "One TOML file (`smtpguard serve -c /etc/smtpguard/smtpguard.toml`),"
        " one table per section. Every key is optional; the default is used when it is absent."
        " `smtpguard check-config -c FILE` reports every error and warning in the file, each with its line"
        " and key (`smtpguard.toml:14: greylist.delay: ...`). SIGHUP re-reads the file (see"
        " [operations](operations.md#hot-reload)); `server.listen` and `metrics.listen` need a restart.",
        "",
        "Durations are written like Postfix's: `300s`, `5m`, `2h`, `2d`, `1w`, or a bare number of seconds"
        " (postgrey's options count days: write `2d`, not `2`)."
        " Sizes are bytes with an optional `k`/`m`/`g` suffix (powers of 1024).",
        "",
        "The failure actions of the tests: `enforce` rejects each RCPT with the test's 5xx reply (postscreen's"
        " `enforce`: the session goes on so that the log holds helo, from and to), `tempfail` gives the 4xx"
        " form, `drop` sends `521` and hangs up, `ignore` only logs and counts (Postfix's `warn_if_reject`).",
        "",
    ]
    for f in dataclasses.fields(Config):
        for section, cls in _sections(type(_default(f)), f.name):
            lines += [f"## [{section}]", ""]
            intro = SECTIONS.get(section) or markdown(cls.__doc__ or "")
            if intro and not intro.startswith(cls.__name__ + "("):
                lines += [intro, ""]
            lines += ["| key | type | default | Postfix / postscreen / postgrey | description |",
                      "|---|---|---|---|---|"]
            for kf in dataclasses.fields(cls):
                if "parse" not in kf.metadata:
                    continue
                key = f"{section}.{kf.name}"
                equivalent = kf.metadata.get("equivalent") or ""
                equivalent_cell = f"`{_cell(equivalent)}`" if equivalent and " " not in equivalent else _cell(
                    equivalent) or "—"
                default = _default(kf)
                kind = key_type(key, kf.metadata["parse"]) or "?"
                shown = duration(default) if kind.startswith("duration") else toml_value(default)
                lines.append(f"| `{kf.name}` | {_cell(kind)} | "
                             f"`{_cell(shown)}` | {equivalent_cell} | {_cell(description(key, kf))} |")
            lines.append("")
    return "\n".join(lines)


def metrics() -> str:
    lines = [
        "# Metrics reference",
        "",
        "<!-- Generated by `python -m smtpguard.docgen metrics > docs/metrics-reference.md`;"
        " do not edit by hand. -->",
        "",
        "Every metric smtpguard exports on `[metrics] listen` at `/metrics`. Labels are bounded sets; no label"
        " ever holds a client address, sender or recipient. See [metrics.md](metrics.md) for queries and alerts.",
        "",
        "| metric | type | labels | help |",
        "|---|---|---|---|",
    ]
    for family in sorted(METRICS.registry.collect(), key=lambda fam: fam.name):
        name = family.name + ("_total" if family.type == "counter" else "")
        labels = _label_names(family.name)
        lines.append(f"| `{name}` | {family.type} | {', '.join(f'`{x}`' for x in labels) or '—'} | "
                     f"{_cell(family.documentation)} |")
    return "\n".join(lines) + "\n"


def _label_names(family_name: str) -> list[str]:
    for f in dataclasses.fields(METRICS):
        obj = getattr(METRICS, f.name)
        if getattr(obj, "_name", None) == family_name:
            return list(getattr(obj, "_labelnames", ()))
    return []


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    what = args[0] if args else "configuration"
    if what == "configuration":
        sys.stdout.write(configuration())
    elif what == "metrics":
        sys.stdout.write(metrics())
    else:
        print("usage: python -m smtpguard.docgen configuration|metrics", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
