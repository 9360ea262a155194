"""Envelope syntax: MAIL/RCPT arguments, ESMTP parameters and xtext.

Pure functions, no I/O.  Parsing follows Postfix's default leniency
(``strict_rfc821_envelopes = no``): ``MAIL FROM: <a@b>`` with a space after
the colon and an address without angle brackets are accepted.  Parameters
are checked against what smtpguard advertises and relays to Postfix unchanged
(SIZE, BODY, SMTPUTF8, and the DSN parameters RET, ENVID, NOTIFY, ORCPT);
anything else gets Postfix's ``555 5.5.4 Unsupported option``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .text import ascii_upper, is_ascii_digits
from .verdict import REPLIES, Reply


@dataclass(frozen=True)
class Path:
    """A parsed MAIL FROM / RCPT TO argument."""

    address: str  # without angle brackets; "" for the null sender <>
    params: tuple[str, ...]  # raw "KEY=VALUE" words, relayed verbatim


class EnvelopeError(ValueError):
    """Bad envelope syntax, or a limit refused it; carries the reply to send.

    *address* is set when the syntax was fine and a limit refused the
    envelope (``552 5.3.4 Message size exceeds fixed limit``): smtpd logs
    such a refusal as ``NOQUEUE: reject: MAIL from ...``, syntax errors not.
    """

    def __init__(self, reply: Reply, address: str | None = None) -> None:
        super().__init__(str(reply))
        self.reply = reply
        self.address = address


# Parameters that take a value are named with their "=", as smtpd matches them
# (strncasecmp "SIZE="): a bare "SIZE" is an unsupported option.
_MAIL_PARAMS = {"SIZE=", "BODY=", "SMTPUTF8", "RET=", "ENVID="}
_RCPT_PARAMS = {"NOTIFY=", "ORCPT="}
_NOTIFY = {"NEVER", "SUCCESS", "FAILURE", "DELAY"}
_XTEXT_OK = re.compile(rb"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*")


def _split(arg: str | None, keyword: str, syntax: Reply, bad: Reply) -> Path:
    """Split ``FROM:<addr> P1 P2`` into address and parameter words."""
    if arg is None or not ascii_upper(arg[: len(keyword)]) == keyword:
        raise EnvelopeError(syntax)
    rest = arg[len(keyword):].lstrip(" ")
    if rest.startswith("<"):
        end = rest.find(">")
        if end < 0:
            raise EnvelopeError(bad)
        address, tail = rest[1:end], rest[end + 1:]
        if tail and not tail.startswith(" "):
            raise EnvelopeError(bad)
    else:
        address, _, tail = rest.partition(" ")
        if not address:
            raise EnvelopeError(syntax)
    # Postfix strips a source route (@a,@b:user@domain).
    if address.startswith("@") and ":" in address:
        address = address.split(":", 1)[1]
    if any(c in address for c in " <>\t\r\n\0") or address.count("@") > 1 and not address.startswith('"'):
        raise EnvelopeError(bad)
    return Path(address, tuple(tail.split()))


def parse_mail(arg: str | None, size_limit: int, smtputf8: bool) -> Path:
    """Parse ``MAIL`` arguments; raises :class:`EnvelopeError` with the reply."""
    path = _split(arg, "FROM:", REPLIES["mail_syntax"], REPLIES["bad_sender"])
    for word in path.params:
        key, eq, value = word.partition("=")
        key = ascii_upper(key) + eq
        if key not in _MAIL_PARAMS:
            raise EnvelopeError(Reply(555, "5.5.4", f"Unsupported option: {word}"))
        if key == "SIZE=":
            if not is_ascii_digits(value):
                raise EnvelopeError(Reply(501, "5.5.4", "Bad message size syntax"))
            if size_limit and int(value) > size_limit:
                raise EnvelopeError(REPLIES["too_big"], path.address)
        elif key == "BODY=" and ascii_upper(value) not in ("7BIT", "8BITMIME"):
            raise EnvelopeError(Reply(501, "5.5.4", "Unsupported BODY parameter value"))
        elif key == "SMTPUTF8" and not smtputf8:
            raise EnvelopeError(Reply(555, "5.5.4", f"Unsupported option: {word}"))
        elif key == "RET=" and ascii_upper(value) not in ("FULL", "HDRS"):
            raise EnvelopeError(Reply(501, "5.5.4", "Bad RET parameter syntax"))
        elif key == "ENVID=" and not _is_xtext(value):
            raise EnvelopeError(Reply(501, "5.5.4", "Bad ENVID parameter syntax"))
    return path


def parse_rcpt(arg: str | None) -> Path:
    """Parse ``RCPT`` arguments; the null address is not a valid recipient."""
    path = _split(arg, "TO:", REPLIES["rcpt_syntax"], REPLIES["bad_recipient"])
    if not path.address:
        raise EnvelopeError(REPLIES["bad_recipient"])
    for word in path.params:
        key, eq, value = word.partition("=")
        key = ascii_upper(key) + eq
        if key not in _RCPT_PARAMS:
            raise EnvelopeError(Reply(555, "5.5.4", f"Unsupported option: {word}"))
        if key == "NOTIFY=":
            words = set(ascii_upper(value).split(","))
            if not words <= _NOTIFY or ("NEVER" in words and len(words) > 1):
                raise EnvelopeError(Reply(501, "5.5.4", "Error: Bad NOTIFY parameter syntax"))
        elif key == "ORCPT=":
            kind, _, addr = value.partition(";")
            if not kind or not addr or not _is_xtext(addr):
                raise EnvelopeError(Reply(501, "5.5.4", "Error: Bad ORCPT parameter syntax"))
    return path


def _is_xtext(value: str) -> bool:
    try:
        raw = value.encode("ascii")
    except UnicodeEncodeError:
        return False
    return _XTEXT_OK.fullmatch(raw) is not None


def xtext(value: str) -> str:
    """RFC 3461 xtext encoding: ``+`` and ``=``, controls, space and
    non-ASCII bytes become ``+HH``; used for XCLIENT attribute values."""
    out = []
    for byte in value.encode("utf-8", "surrogateescape"):
        if 0x21 <= byte <= 0x7E and byte not in (0x2B, 0x3D):
            out.append(chr(byte))
        else:
            out.append(f"+{byte:02X}")
    return "".join(out)
