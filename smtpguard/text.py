"""Client text made safe to log or to echo, and ASCII-only protocol rules.

:func:`printable` is Postfix's ``printable()``: every byte that is not
printable ASCII (``0x20``-``0x7e``) becomes ``?``.  Client text reaches
smtpguard as ``str`` decoded from UTF-8 with ``surrogateescape``, so the
string is encoded back to the client's own bytes first: a two-byte UTF-8
character gives two ``?`` and a raw 8-bit byte one, as in Postfix's logs.
The log formatters apply it to every line and :meth:`Reply.wire` to every
reply of ours, so a CR or LF from a client can neither split a log line nor
reach the client back.

:func:`ascii_upper` and :func:`is_ascii_digits` are the SMTP grammar's case
folding and ``1*DIGIT``: ``str.upper()`` folds ``ſ`` to ``S`` and ``ı`` to
``I``, and ``str.isdigit()`` accepts ``²`` and ``٣``, none of which SMTP
allows (Postfix compares with ``strcasecmp()`` and ``ISDIGIT()``).
"""

from __future__ import annotations

_PRINTABLE = bytes(c if 0x20 <= c < 0x7F else ord("?") for c in range(256))


def printable(text: str) -> str:
    """*text* with each non-printable or non-ASCII byte replaced by ``?``."""
    if text.isascii() and text.isprintable():
        return text
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate no decoder of ours produces
        raw = text.encode("utf-8", "replace")
    return raw.translate(_PRINTABLE).decode("ascii")


def ascii_upper(text: str) -> str:
    """Upper-case ASCII letters only; text with anything else is left as is,
    so it cannot fold onto a keyword."""
    return text.upper() if text.isascii() else text


def is_ascii_digits(text: str) -> bool:
    """``1*DIGIT`` in ASCII."""
    return text.isascii() and text.isdigit()
