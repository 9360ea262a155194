"""Postfix's policy delegation protocol, sans-IO (SMTPD_POLICY_README).

Postfix's smtpd writes one request as ``name=value`` lines, each ending in
``\\n``, and an empty line after the last; it reads one answer,
``action=...`` and an empty line, and may send the next request on the same
connection.  :class:`PolicyParser` takes the bytes as they arrive
(:meth:`~PolicyParser.feed`) and gives back each finished
:class:`PolicyRequest`; :func:`answer` gives the bytes of an answer.  No
socket, no ``await``, no clock: the server adapter (:mod:`.server`) feeds
it, and tests (and the fuzzer) drive it without one.

What the parser does with bad input -- it never raises, and a request that
ended always gets exactly one :class:`PolicyRequest` (so one answer):

* a line longer than ``max_line`` bytes (an oversized attribute): the line
  is skipped up to its end (never buffered) and the request is marked bad;
* a request larger than ``max_request`` bytes: the rest of it is skipped up
  to the empty line, and the request is marked bad;
* a line without ``=`` (or with an empty or non-lower-case name): the
  request is marked bad;
* a missing ``request=`` or one other than ``smtpd_access_policy``: bad;
* an attribute name Postfix does not send (:data:`KNOWN_ATTRIBUTES`): noted
  in :attr:`PolicyRequest.unknown` but *not* bad: newer Postfix versions add
  attributes, and they must not break the service.

A bad request's :attr:`~PolicyRequest.problems` say why; the service answers
it with its ``default_action`` (``DUNNO``) instead of evaluating it.  A
``\\r\\n`` line ending is taken as ``\\n``; values are decoded as UTF-8
(with ``surrogateescape``, as the SMTP front end decodes client text), so
an 8-bit value survives into the log as ``?``.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

from ..net import IPAddress, parse_ip_or_none
from ..text import printable

#: The attributes Postfix 3.x sends (SMTPD_POLICY_README, "Protocol description").
KNOWN_ATTRIBUTES = frozenset({
    "request", "protocol_state", "protocol_name", "helo_name", "queue_id", "sender", "recipient",
    "recipient_count", "client_address", "client_name", "reverse_client_name", "instance",
    "sasl_method", "sasl_username", "sasl_sender", "size", "ccert_subject", "ccert_issuer",
    "ccert_fingerprint", "ccert_pubkey_fingerprint", "encryption_protocol", "encryption_cipher",
    "encryption_keysize", "etrn_domain", "stress", "client_port", "policy_context", "server_address",
    "server_port", "compatibility_level", "mail_version",
})

#: The one request type Postfix sends.
REQUEST_TYPE = "smtpd_access_policy"

#: How many unknown attribute names one request lists (the rest are counted).
_UNKNOWN_KEPT = 8

#: One whole well-formed request, as Postfix writes it: the fast path of
#: :meth:`PolicyParser.feed` (one regex and one decode per request instead
#: of a call per line).  Anything else -- a CR, a bad name, a line without
#: ``=``, a request split across reads -- goes the line-by-line way.
_WHOLE_REQUEST = re.compile(rb"(?:[a-z0-9_]+=[^\n\r]*\n)+\n")


@dataclass
class PolicyRequest:
    """One request: its attributes (last value wins for a repeated name),
    and why it cannot be evaluated (:attr:`problems`, empty when it can)."""

    attrs: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)  # attribute names Postfix does not send
    size: int = 0  # bytes, the empty line included

    @property
    def ok(self) -> bool:
        return not self.problems

    def get(self, name: str, default: str = "") -> str:
        return self.attrs.get(name, default)

    @functools.cached_property
    def client_ip(self) -> IPAddress | None:
        """``client_address`` parsed (once), None when it is not an IP address."""
        return parse_ip_or_none(self.get("client_address"))

    @property
    def state(self) -> str:
        """``protocol_state`` (``RCPT``, ``MAIL``...), upper-cased."""
        return self.attrs.get("protocol_state", "").upper()


@dataclass(frozen=True)
class Limits:
    """How much one request may hold (Postfix's own policy client never
    comes close: a request is about 1 KB)."""

    max_line: int = 8192  # one name=value line, without its newline
    max_request: int = 65536  # one whole request


class PolicyParser:
    """Feed bytes, get finished requests."""

    def __init__(self, limits: Limits = Limits()) -> None:
        self.limits = limits
        self._buf = bytearray()
        self._current = PolicyRequest()
        self._skipping_line = False  # inside an over-long line: drop bytes up to its newline

    @property
    def pending(self) -> bool:
        """Has a request begun that has not ended yet?"""
        return bool(self._buf) or self._skipping_line or bool(self._current.attrs or self._current.size)

    def feed(self, data: bytes) -> list[PolicyRequest]:
        """The requests *data* finished, in order (often none, or one)."""
        done: list[PolicyRequest] = []
        if not self._buf and not self._skipping_line and not self._current.size:
            start = self._whole(data, done)
            if start == len(data):
                return done
            data = data[start:]
        return self._lines(data, done)

    def _whole(self, data: bytes, done: list[PolicyRequest]) -> int:
        """The fast path: whole well-formed requests at the start of *data*
        (within both size limits, so no line can be over-long) go to *done*;
        returns where the rest begins."""
        limit = min(self.limits.max_line, self.limits.max_request)
        match = _WHOLE_REQUEST.match
        pos = 0
        while True:
            m = match(data, pos)
            if m is None:
                return pos
            end = m.end()
            if end - pos > limit:
                return pos
            text = data[pos:end - 2].decode("utf-8", "surrogateescape")
            attrs = dict(line.split("=", 1) for line in text.split("\n"))
            unknown = [k for k in attrs if k not in KNOWN_ATTRIBUTES]
            req = PolicyRequest(attrs, [], unknown[:_UNKNOWN_KEPT], end - pos)
            self._check_type(req)
            done.append(req)
            pos = end

    def _lines(self, data: bytes, done: list[PolicyRequest]) -> list[PolicyRequest]:
        """Line by line, with every check on bad input (see the module docstring)."""
        buf = self._buf
        buf += data
        start = 0
        max_line = self.limits.max_line
        while True:
            end = buf.find(b"\n", start)
            if end < 0:
                break
            line = bytes(buf[start:end])
            start = end + 1
            if self._skipping_line:  # the tail of an over-long line
                self._skipping_line = False
                self._current.size += len(line) + 1
                continue
            if len(line) > max_line + 1:  # +1: a CR before the LF
                self._oversized()
                self._current.size += len(line) + 1
                continue
            req = self._line(line)
            if req is not None:
                done.append(req)
        del buf[:start]
        if len(buf) > max_line + 1:  # an over-long line still arriving: drop it as it comes
            self._oversized()
            self._current.size += len(buf)
            buf.clear()
            self._skipping_line = True
        return done

    def _oversized(self) -> None:
        # No length in the text: how much of the line had arrived depends on
        # how the input was split into reads (a hypothesis test found that).
        self._problem(f"attribute line longer than {self.limits.max_line} bytes")

    def _problem(self, text: str) -> None:
        problems = self._current.problems
        if text not in problems and len(problems) < 8:
            problems.append(text)

    def _line(self, line: bytes) -> PolicyRequest | None:
        cur = self._current
        if line.endswith(b"\r"):
            line = line[:-1]
            cur.size += 1
        cur.size += len(line) + 1
        if not line:
            return self._finish()
        if cur.size > self.limits.max_request:
            self._problem(f"request larger than {self.limits.max_request} bytes")
            return None
        name, eq, value = line.partition(b"=")
        if not eq:
            self._problem(f"line without '=': {_show(line)}")
            return None
        if not name or not _is_name(name):
            self._problem(f"bad attribute name: {_show(name)}")
            return None
        key = name.decode("ascii")
        if key not in KNOWN_ATTRIBUTES and key not in cur.attrs and len(cur.unknown) < _UNKNOWN_KEPT:
            cur.unknown.append(key)
        cur.attrs[key] = value.decode("utf-8", "surrogateescape")
        return None

    def _finish(self) -> PolicyRequest:
        req, self._current = self._current, PolicyRequest()
        self._check_type(req)
        return req

    @staticmethod
    def _check_type(req: PolicyRequest) -> None:
        if not req.problems:
            kind = req.attrs.get("request")
            if kind is None:
                req.problems.append("no request= attribute")
            elif kind != REQUEST_TYPE:
                req.problems.append(f"unknown request type {_show(kind.encode('utf-8', 'surrogateescape'))}")


def _is_name(name: bytes) -> bool:
    """Postfix's attribute names: lower-case ASCII letters, digits, ``_``."""
    return all(c == 0x5F or 0x61 <= c <= 0x7A or 0x30 <= c <= 0x39 for c in name)


def _show(data: bytes, limit: int = 60) -> str:
    text = printable(data[:limit].decode("utf-8", "surrogateescape"))
    return f'"{text}"' + ("..." if len(data) > limit else "")


def answer(action: str) -> bytes:
    """The bytes of one answer: ``action=ACTION\\n\\n``.  *action* is made
    one printable ASCII line (a newline in it would end the answer early)."""
    return b"action=" + printable(action).encode("ascii") + b"\n\n"
