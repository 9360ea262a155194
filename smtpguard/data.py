"""The DATA body scanner: where a message ends, and what may be forwarded.

Sans-IO: :meth:`DataScanner.feed` takes whatever bytes the client sent and
returns the bytes that may go to Postfix now plus whatever followed the
end-of-data marker (pipelined commands).  It never holds more than one
partial line, so memory stays bounded whatever the message size.

Rules (the SMTP-smuggling defence, CVE-2023-51764 and friends):

* the message ends **only** at ``<CRLF>.<CRLF>``; ``\\n.\\n``, ``\\r.\\r``,
  ``\\r\\n\\x00.\\r\\n`` and the other variants are just content;
* a bare CR, a bare LF or a NUL in the body is either an error (``reject``,
  the default: nothing more is forwarded, the caller aborts the upstream
  transaction so Postfix never queues the message, and the client gets
  ``550 5.5.2`` after its end-of-data) or is rewritten (``normalize``: bare
  CR/LF become CRLF, a dot that thereby starts a line is stuffed, NUL is
  removed), so that nothing forwarded can look like an end-of-data to Postfix;
* lines longer than ``line_limit`` and bodies larger than ``size_limit``
  (Postfix's ``message_size_limit``) are errors too.

The body is forwarded still dot-stuffed: Postfix un-stuffs it, so
transparency is preserved without touching the bytes.
"""

from __future__ import annotations

import re

from .verdict import REPLIES, Reply

_END = b"\r\n.\r\n"


class DataScanner:
    def __init__(self, size_limit: int, line_limit: int, bare_newline: str = "reject") -> None:
        self.size_limit = size_limit
        self.line_limit = line_limit
        self.normalize = bare_newline == "normalize"
        self._long_line = re.compile(rb"[^\r\n]{%d}" % (line_limit + 1))
        self._pending = b""  # unclassified bytes: a partial last line
        self._at_line_start = True  # does _pending start at a line start?
        self.size = 0  # bytes forwarded so far
        self.error: Reply | None = None
        self.done = False

    def feed(self, data: bytes) -> tuple[bytes, bytes]:
        """Scan *data*; return (bytes to forward, bytes after the end marker).

        After the end marker :attr:`done` is true; after a violation
        :attr:`error` holds the reply and nothing more is forwarded.
        """
        buf = self._pending + data
        if self._at_line_start and buf.startswith(b".\r\n"):
            end = 0
        else:
            i = buf.find(_END)
            end = i + 2 if i >= 0 else -1
        if end >= 0:
            body, leftover = buf[:end], buf[end + 3:]
            self._pending, self.done = b"", True
        else:
            k = buf.rfind(b"\r\n")
            body, rest = (buf[: k + 2], buf[k + 2:]) if k >= 0 else (b"", buf)
            if k >= 0:
                self._at_line_start = True
            if len(rest) > self.line_limit + 1:
                self._fail(REPLIES["data_line_too_long"])
                # Keep only what could start an end marker; we are mid-line now.
                rest, self._at_line_start = rest[-1:], False
            self._pending, leftover = rest, b""
        if self.error is not None or not body:
            return b"", leftover
        return self._check(body), leftover

    def _check(self, body: bytes) -> bytes:
        """Apply the body rules to complete lines; return what to forward."""
        crlf = body.count(b"\r\n")
        bare = body.count(b"\r") != crlf or body.count(b"\n") != crlf
        nul = b"\x00" in body
        if bare or nul:
            if not self.normalize:
                return self._fail(REPLIES["bare_newline" if bare else "nul_in_data"])
            body = b"\r\n".join(_normalize_line(line) for line in body.split(b"\r\n"))
        if self._long_line.search(body):
            return self._fail(REPLIES["data_line_too_long"])
        self.size += len(body)
        if self.size_limit and self.size > self.size_limit:
            return self._fail(REPLIES["file_too_big"])
        return body

    def _fail(self, reply: Reply) -> bytes:
        if self.error is None:
            self.error = reply
        return b""


def _normalize_line(line: bytes) -> bytes:
    """Rewrite one CRLF-delimited line: drop NULs, turn bare CR/LF into CRLF.

    The client's stuffing dot is removed first and every resulting line that
    starts with a dot is stuffed again, so no piece can become a lone "."
    (an end-of-data for Postfix), whatever bytes surrounded it.
    """
    if b"\r" not in line and b"\n" not in line and b"\x00" not in line:
        return line
    if line.startswith(b"."):
        line = line[1:]
    pieces = _BARE.split(line.replace(b"\x00", b""))
    return b"\r\n".join(b"." + p if p.startswith(b".") else p for p in pieces)


_BARE = re.compile(rb"\r|\n")
