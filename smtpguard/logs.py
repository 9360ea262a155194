r"""Postfix-style log lines.

Every event is one line with a stable keyword, formatted like Postfix's own
(``CONNECT from [192.0.2.7]:40123 to [127.0.0.1]:25``, ``NOQUEUE: reject: RCPT
from unknown[192.0.2.7]:40123: 550 5.7.1 ...; from=<a@b> to=<c@d>
proto=ESMTP helo=<x>``), so that pflogsumm, fail2ban and admins' grep habits
keep working.

The program name is built as Postfix builds it: ``syslog_name/service``
(``postfix/smtpd``, ``postfix-out/smtpd``, ``postfix/submission/smtpd``), from
``[log] syslog_name`` (default ``postfix``) and ``[log] service_name``
(default ``smtpd``).  That is what the log consumers key on:

* pflogsumm (1.1.5) counts ``NOQUEUE: reject:`` lines only when the program
  is ``smtpd`` or ``postscreen`` right after ``postfix/`` (or after
  ``postfix/smtps/``, ``postfix/submission/``, or after the name given with
  its ``--syslog-name``).  ``postfix/smtpd`` works unchanged;
  ``syslog_name = "postfix-smtpguard"`` works with
  ``pflogsumm --syslog-name=postfix-smtpguard``; ``postfix/smtpguard/smtpd``
  is *not* counted by pflogsumm (its regex reads the program as
  ``smtpguard/smtpd``).
* fail2ban's stock ``postfix`` filter matches programs
  ``postfix(-\w+)?/\w+(?:/smtp[ds])?``: all of the above.

On stderr each line carries the syslog prefix Postfix writes to
``maillog_file`` (``Nov 23 17:04:26 host postfix/smtpd[123]: ...``); with
``output = "syslog"`` the same message goes to the local syslog socket
(facility mail) with the same program name as ident -- or, when nothing
listens on ``/dev/log`` (a container without a syslog daemon), to stderr
after one warning saying so, rather than losing every line.  With ``output =
"journal"`` (or ``"auto"`` when systemd connected stderr to the journal:
``$JOURNAL_STREAM`` is set) each line is one journal entry sent with
journald's native protocol: ``MESSAGE`` without timestamp or host (the
journal records them), ``SYSLOG_IDENTIFIER`` the program name
(``postfix/smtpd``), ``SYSLOG_PID``, ``PRIORITY`` and ``SYSLOG_FACILITY``
(mail), so that ``journalctl`` and fail2ban's ``backend = systemd`` see
``host postfix/smtpd[123]: NOQUEUE: reject: ...`` as from Postfix itself.
(On stderr under systemd every line would carry a second timestamp and the
unit's identifier in front of ours, and no postfix filter matches it.)
(facility mail) with the same program name as ident -- or, when nothing
listens on ``/dev/log`` (a container without a syslog daemon), to stderr
after one warning saying so, rather than losing every line.

Every line is made printable as Postfix's ``printable()`` does (client text
may hold CR, LF, NUL and 8-bit bytes: each becomes ``?``), and
``log.exception()`` writes its traceback on lines of its own after the
message, each with the same prefix.

The helpers here only format; :func:`setup` wires the standard ``logging``
module once at start-up (and again on reload).
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import socket
import sys
import time
from typing import Literal

from .config import LogConfig
from .text import printable

log = logging.getLogger("smtpguard")

#: Where ``output = "syslog"`` sends datagrams (the local syslog daemon).
SYSLOG_SOCKET = "/dev/log"
#: journald's native protocol socket (``output = "journal"``).
JOURNAL_SOCKET = "/run/systemd/journal/socket"


class _PostfixFormatter(logging.Formatter):
    """``Mon DD HH:MM:SS host name[pid]: [level: ]message`` like maillog_file."""

    def __init__(self, program: str) -> None:
        super().__init__()
        self._prefix = f"{socket.gethostname().split('.')[0]} {program}[{os.getpid()}]: "
        self._second, self._stamp = -1, ""

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:  # one strftime per second, not per line
            self._second, self._stamp = second, time.strftime("%b %e %H:%M:%S", time.localtime(second))
        stamp = self._stamp
        head = f"{stamp} {self._prefix}"
        if record.levelno != logging.INFO:
            head += f"{_LEVEL_WORD[record.levelno]}: "
        return "\n".join(head + line for line in _lines(record))


class _SyslogFormatter(logging.Formatter):
    """The message alone (the handler adds ident and priority), made printable;
    a traceback follows it on lines of its own."""

    def format(self, record: logging.LogRecord) -> str:
        return "\n".join(_lines(record))


_TRACEBACK = logging.Formatter()


class _LineHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """StreamHandler with one ``write`` per record and no separate
    ``flush()``: stderr is line-buffered (Python 3.9+), so the line ending
    the text is its one write(2); the handler's lock is taken once, by
    :meth:`logging.Handler.handle`, not again by a flush."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stream.write(self.format(record) + "\n")
        except Exception:
            self.handleError(record)


def _lines(record: logging.LogRecord) -> list[str]:
    """The record's message and, for ``log.exception()``, its traceback, each
    line made :func:`printable` (client text can hold CR, LF and 8-bit bytes,
    which would otherwise split or forge log lines)."""
    lines = [printable(record.getMessage())]
    if record.exc_info:
        lines += (printable(line) for line in _TRACEBACK.formatException(record.exc_info).splitlines())
    return lines


# Postfix's own severity words (msg_warn -> "warning:", msg_fatal -> "fatal:").
_LEVEL_WORD = {
    logging.DEBUG: "debug",
    logging.WARNING: "warning",
    logging.ERROR: "error",
    logging.CRITICAL: "fatal",
}


# syslog severities (RFC 5424) for PRIORITY=
_SEVERITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}
_MAIL = 2  # syslog facility mail


def journal_fields(fields: dict[str, str]) -> bytes:
    """journald's native datagram: ``KEY=value`` lines (a value with a
    newline is sent length-prefixed, as the protocol requires)."""
    out = bytearray()
    for key, value in fields.items():
        data = value.encode("utf-8", "surrogateescape")
        if b"\n" in data:
            out += key.encode() + b"\n" + len(data).to_bytes(8, "little") + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


class JournalHandler(logging.Handler):
    """One journal entry per line, with Postfix's program name as identifier."""

    def __init__(self, identifier: str, address: str) -> None:
        super().__init__()
        self.address = address
        self.fields = {"SYSLOG_IDENTIFIER": identifier, "SYSLOG_PID": str(os.getpid()),
                       "SYSLOG_FACILITY": str(_MAIL)}
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    def emit(self, record: logging.LogRecord) -> None:
        word = _LEVEL_WORD.get(record.levelno)
        prefix = f"{word}: " if word and record.levelno != logging.INFO else ""
        priority = str(_SEVERITY.get(record.levelno, 6))
        for line in _lines(record):
            datagram = journal_fields({"MESSAGE": prefix + line, "PRIORITY": priority, **self.fields})
            try:
                self.sock.sendto(datagram, self.address)
            except OSError:  # no journald (yet): the line is not lost
                sys.stderr.write(f"{self.fields['SYSLOG_IDENTIFIER']}[{self.fields['SYSLOG_PID']}]: "
                                 f"{prefix}{line}\n")

    def close(self) -> None:
        self.sock.close()
        super().close()


def output(cfg: LogConfig) -> str:
    """Where lines go: ``auto`` is ``journal`` when systemd connected stderr to
    the journal (``$JOURNAL_STREAM``), else ``stderr``."""
    if cfg.output == "auto":
        return "journal" if os.environ.get("JOURNAL_STREAM") else "stderr"
    return cfg.output


def program(cfg: LogConfig) -> str:
    """``syslog_name/service_name`` as Postfix names its processes."""
    return f"{cfg.syslog_name}/{cfg.service_name}" if cfg.service_name else cfg.syslog_name


def syslog_problem() -> str | None:
    """Why nothing can be sent to :data:`SYSLOG_SOCKET`, or None."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
            probe.connect(SYSLOG_SOCKET)
    except OSError as exc:
        return f"[log] output = syslog: cannot send to {SYSLOG_SOCKET}: {exc.strerror or exc}"
    return None


def setup(cfg: LogConfig) -> None:
    """Configure the ``smtpguard`` logger from ``[log]``."""
    # Records need none of these; skipping them is the logging HOWTO's
    # documented optimisation (a few microseconds per line, several lines
    # per message).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler: logging.Handler
    where = output(cfg)
    problem = syslog_problem() if where == "syslog" else None
    if where == "journal":
        handler = JournalHandler(program(cfg), JOURNAL_SOCKET)
    elif where == "syslog" and problem is None:
        handler = logging.handlers.SysLogHandler(
            address=SYSLOG_SOCKET, facility=logging.handlers.SysLogHandler.LOG_MAIL
        )
        handler.ident = f"{program(cfg)}[{os.getpid()}]: "
        handler.setFormatter(_SyslogFormatter())
    else:
        handler = _LineHandler(sys.stderr)
        handler.setFormatter(_PostfixFormatter(program(cfg)))
    for old in log.handlers:
        if isinstance(old, JournalHandler):
            old.close()
    log.handlers[:] = [handler]
    log.setLevel(cfg.level.upper())
    log.propagate = False
    if problem is not None:
        log.warning("%s; logging to stderr instead", problem)


def endpoint(host: str, port: int | str) -> str:
    """``[192.0.2.7]:25`` / ``[2001:db8::1]:25`` as postscreen writes them."""
    return f"[{host}]:{port}"


def client(name: str, host: str, port: int | str | None = None) -> str:
    """``name[addr]:port`` (or ``name[addr]``) as smtpd writes a client."""
    return f"{name}[{host}]" + (f":{port}" if port is not None else "")


Disposition = Literal["reject", "reject_warning", "warn"]


def noqueue(reply: str, stage: str, who: str, sender: str | None, rcpt: str | None,
            proto: str, helo: str | None, disposition: Disposition = "reject") -> str:
    """smtpd's ``NOQUEUE: reject:`` line (format fail2ban's postfix filter
    reads); *disposition* ``reject_warning`` for a reject that
    ``warn_if_reject`` (``action = "ignore"``) turned into a warning, ``warn``
    for an access table's ``WARN``."""
    parts = [f"from=<{sender or ''}>"] if sender is not None else []
    if rcpt is not None:
        parts.append(f"to=<{rcpt}>")
    parts.append(f"proto={proto}")
    if helo:
        parts.append(f"helo=<{helo}>")
    return f"NOQUEUE: {disposition}: {stage} from {who}: {reply}; {' '.join(parts)}"
