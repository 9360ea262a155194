"""Hand a client's connection to Postfix's smtpd, as postscreen does.

How it works: postscreen gives a client that is allowlisted or ``PASS OLD``
to a real smtpd process without relaying a byte.  It connects to the smtpd
*pass* service (a master.cf line of type ``pass``) over its UNIX-domain
socket, sends the client's socket as ``SCM_RIGHTS`` ancillary data with one
byte of payload, then the client and server endpoints in Postfix's
attribute encoding (``attr_print0``: ``name\\0value\\0`` per attribute, one
more ``\\0`` at the end) and waits until smtpd closes the channel.  smtpd
greets the client with its own ``220`` and does the whole session itself;
postscreen's copy of the socket is closed.

smtpguard does the same for the clients :mod:`smtpguard.pipeline` lets
through at connect time (``[handoff] socket``, off by default).  :func:`send`
connects and sends everything in one ``sendmsg`` (smtpd reads the
descriptor with a one-byte read, then the attributes from the same stream)
and closes the channel at once; the listener closes its copy of the client
socket.  Not waiting for smtpd is safe on Linux: the message and the
descriptor in flight stay queued on smtpd's end of the channel, which reads
them and then end-of-file (postscreen waits for systems that drop what a
closed channel wrote, and to log ``timeout sending connection to service``).
Connecting does not wait either: a pass service whose backlog is full fails
at once, like postscreen's non-blocking connect, and the listener relays
that client itself instead.

Such a client costs smtpguard an accept, a cache lookup and a handful of
system calls; Postfix serves it exactly as if it had connected to Postfix (its
anvil limits, restrictions, TLS and logs apply), and nothing smtpguard would
do after the banner (HELO, sender and recipient checks, greylisting) is
done for it: see docs/handoff.md.

Nor does smtpguard's end-of-data rule: a handed-off client's message is read
by smtpd alone, so SMTP smuggling (a bare ``<LF>.<LF>`` or ``<CR>.<CR>`` read
as the end of data) is Postfix's to refuse.  With ``[handoff]
require_forbid_bare_newline`` (default on) smtpguard hands clients off only
when the pass service refuses or normalizes bare newlines:
:func:`check_pass_service` asks ``postconf`` at start and on every reload
(the service's master.cf ``-o smtpd_forbid_bare_newline``, else main.cf's
value); if it does not, or the answer is unknown, every client is relayed
and one warning names the master.cf line to add.
"""

from __future__ import annotations

import array
import logging
import os
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .options import ConfigError, opt, parse_bool, parse_str

log = logging.getLogger("smtpguard")


def parse_socket_path(value: Any) -> str:
    """An absolute path, or "" (off)."""
    text = parse_str(value)
    if text and not os.path.isabs(text):
        raise ValueError(f'expected an absolute path like /var/spool/postfix/public/smtpguard, got "{text}"')
    return text


@dataclass(frozen=True)
class HandoffConfig:
    """``[handoff]``: postscreen's hand-off to the smtpd pass service."""

    socket: str = field(
        default="",
        metadata=opt(
            parse_socket_path,
            "postscreen's smtpd pass service (master.cf: smtpd pass - - y - - smtpd)",
            "UNIX socket of a Postfix smtpd `pass` service (`/var/spool/postfix/public/smtpguard`): "
            "allowlisted and PASS OLD clients are handed to it (docs/handoff.md); `\"\"`: every client is relayed.",
        ),
    )

    ipv6: bool = field(
        default=False,
        metadata=opt(parse_bool, "inet_protocols (must include ipv6)",
                     "Hand off IPv6 clients too. Only with `inet_protocols = all` (or `ipv6`) in Postfix: "
                     "an IPv4-only smtpd exits on an IPv6 client's connection and master throttles "
                     "the service; off, they are relayed."),
    )

    require_forbid_bare_newline: bool = field(
        default=True,
        metadata=opt(parse_bool, "smtpd_forbid_bare_newline (of the pass service)",
                     "Hand clients off only when `postconf` says the pass service refuses or normalizes bare "
                     "newlines (`smtpd_forbid_bare_newline = reject | normalize | yes`, checked at start and on "
                     "reload); otherwise, or when that is unknown, relay them (SMTP smuggling). "
                     "`false`: trust the pass service unchecked."),
    )

    postfix_config_directory: str = field(
        default="",
        metadata=opt(parse_socket_path, "config_directory (postconf -c)",
                     "Postfix's configuration directory for that check (`postconf -c`); `\"\"`: postconf's "
                     "default (`/etc/postfix`, or `$MAIL_CONFIG`)."),
    )

    def validate(self) -> None:
        if self.socket and len(os.fsencode(self.socket)) > 107:
            raise ConfigError("socket", "a UNIX socket path must be shorter than 108 bytes")


def attributes(client: tuple[str, int], server: tuple[str, int]) -> bytes:
    """The endpoints as smtpd's ``smtpd_peer_from_pass_attr`` reads them
    (IPv6 addresses without brackets)."""
    pairs = (
        ("client_address", client[0]), ("client_port", str(client[1])),
        ("server_address", server[0]), ("server_port", str(server[1])),
    )
    return b"".join(f"{k}\0{v}\0".encode() for k, v in pairs) + b"\0"


def send(path: str, fd: int, client: tuple[str, int], server: tuple[str, int]) -> None:
    """Pass socket *fd* and the endpoints to the pass service at *path*.
    Raises OSError when nothing was passed: smtpd never got the connection,
    the caller still has it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as channel:
        channel.setblocking(False)
        channel.connect(path)  # a listening UNIX socket answers at once, or EAGAIN when its backlog is full
        payload = b"\0" + attributes(client, server)
        sent = channel.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
        if sent != len(payload):  # cannot happen on a new socket; smtpd would drop a short list
            raise OSError(f"short write ({sent} of {len(payload)} bytes)")


#: smtpd_forbid_bare_newline values under which smtpd never reads a bare
#: newline as a line end of its own: reject it, or normalize with the
#: standard end of data only (Postfix 3.7.10+; "yes" is "normalize")
SAFE_BARE_NEWLINE = frozenset({"reject", "normalize", "yes"})

Run = Callable[[list[str]], "subprocess.CompletedProcess[str]"]


def _postconf(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["postconf", *args], capture_output=True, text=True, timeout=10, check=False)


@dataclass(frozen=True)
class PassCheck:
    """What :func:`check_pass_service` found: may clients be handed off, and why (for the log)."""

    safe: bool
    why: str


def check_pass_service(cfg: HandoffConfig, run: Run = _postconf) -> PassCheck:
    """Does the pass service behind ``cfg.socket`` refuse or normalize bare
    newlines?  Asks ``postconf`` (its master.cf ``-o`` override of
    ``smtpd_forbid_bare_newline``, else main.cf's value, ``$names``
    expanded); unknown -- no postconf, no such service -- is unsafe."""
    service = os.path.basename(cfg.socket)
    base = ["-c", cfg.postfix_config_directory] if cfg.postfix_config_directory else []
    where = f" in {cfg.postfix_config_directory}" if cfg.postfix_config_directory else ""
    try:
        listed = run([*base, "-M", f"{service}/pass"])
        if listed.returncode != 0 or not listed.stdout.strip():
            detail = listed.stderr.strip().splitlines()[-1:] or ["no such master.cf entry"]
            return PassCheck(False, f"postconf{where} knows no pass service {service} ({detail[0]})")
        override = run([*base, "-P", "-xh", f"{service}/pass/smtpd_forbid_bare_newline"])
        value, origin = override.stdout.strip(), f"master.cf {service}/pass"
        if override.returncode != 0 or not value:
            main = run([*base, "-xh", "smtpd_forbid_bare_newline"])
            if main.returncode != 0:
                return PassCheck(False, f"postconf{where} failed: {main.stderr.strip() or main.returncode}")
            value, origin = main.stdout.strip(), "main.cf"
    except (OSError, subprocess.SubprocessError) as exc:
        return PassCheck(False, f"cannot run postconf: {exc}")
    setting = f"smtpd_forbid_bare_newline = {value or '(empty)'}, from {origin}"
    return PassCheck(value.lower() in SAFE_BARE_NEWLINE, setting)


def unsafe_warning(cfg: HandoffConfig, found: PassCheck) -> str:
    """The one warning for a pass service clients are not handed to."""
    service = os.path.basename(cfg.socket)
    return (f"handoff: Postfix's pass service {service} may accept bare newlines ({found.why}): "
            f"SMTP smuggling would reach it, so every client is relayed instead; add "
            f'"  -o smtpd_forbid_bare_newline=normalize" under the "{service} pass ... smtpd" line of '
            f"master.cf")


def handoff_allowed(cfg: HandoffConfig, run: Run = _postconf) -> bool:
    """Start and reload: may clients be handed off to ``cfg.socket``?  Logs
    one line saying why (a warning when not)."""
    if not cfg.socket:
        return False
    if not cfg.require_forbid_bare_newline:
        return True
    found = check_pass_service(cfg, run)
    if found.safe:
        log.info("handoff: the pass service %s refuses or normalizes bare newlines (%s)",
                 os.path.basename(cfg.socket), found.why)
    else:
        log.warning("%s", unsafe_warning(cfg, found))
    return found.safe
