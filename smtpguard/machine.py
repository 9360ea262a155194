"""The SMTP session with one client as a sans-IO state machine.

:class:`SessionMachine` owns what one session knows and decides, from the
connect to the end: the screening before the banner and the pregreet wait,
the stage (before HELO, in a transaction, in DATA), the command counts, the
error count and the error sleep, the upstream transaction (is MAIL open at
Postfix, did Postfix get an EHLO?), the reply order, which commands are
answered here and which go to Postfix, the idle timeout of each stage and
the log lines of the session's life (``timeout after``, ``lost connection
after``, ``DISCONNECT`` with smtpd's ``ok/total`` counts).  It never awaits
and never touches a socket; the clock it times the message transfer with
is given to it (a fake one in the tests).  It is driven with events and
answers with actions, in the manner of h11.

Events: :meth:`~SessionMachine.connect`, :meth:`~SessionMachine.command`
(a line as received, with the input already read past it),
:meth:`~SessionMachine.line_too_long`, :meth:`~SessionMachine.timed_out`,
:meth:`~SessionMachine.lost`, :meth:`~SessionMachine.finish`, and
:meth:`~SessionMachine.answer` with the result of the request returned
last.  Each returns a list of actions; only the last can be a request::

    actions = machine.command(raw_line, pending)
    while actions:
        *effects, last = actions
        ...perform the effects...
        if not isinstance(last, REQUESTS):
            ...perform last; break
        actions = machine.answer(result_of(last))

Effects need no answer: :class:`Send` (bytes for the client), :class:`Arm`
(hold the replies that follow for the error sleep, smtpd_error_sleep_time),
:class:`AbortUpstream` / :class:`QuitUpstream`, :class:`Unread` (input read
past the end of DATA goes back to the command reader) and :class:`Close`
(end the session after what was sent; :attr:`~SessionMachine.closed` is set).
Requests need one: the pipeline's :class:`~smtpguard.verdict.Verdict` for
:class:`Screen`; True/False for :class:`HandOff`; a :class:`Greeted` for
:class:`GreetWait`; for :class:`OpenUpstream` the seconds it took, for
:class:`Upstream` the list of :class:`~smtpguard.relay.UpstreamReply`,
either of them an :class:`~smtpguard.relay.UpstreamError` when Postfix could
not be reached; for :class:`StartTls` the TLS description or None; for
:class:`ReadBody` the next chunk of the message (``b""`` at end of input).

States, as the machine walks them: *connected* (``Screen connect``, then
``HandOff`` for an allowlisted or PASS OLD client, or the greet wait with
``220-`` and ``Screen greet``, then ``Screen banner`` and ``220``) →
*greeted* (commands; each one ``Screen command`` first: pipelining, error
and command limits) → *in transaction* after MAIL (RCPTs: ``Screen rcpt``,
then the first accepted one opens the upstream, MAIL and RCPT forwarded
together when Postfix got an EHLO; recipients a client pipelined go to
Postfix together, see below) → *in DATA* after Postfix's 354
(``ReadBody``/``Upstream`` until the end of data, Postfix's reply relayed) →
back to *greeted*; ``Close`` from any state ends it.

Pipelined recipients: when the client sent the next RCPT line along with
this one (PIPELINING) and Postfix got an EHLO, an accepted recipient is not
forwarded at once: it is *owed* a reply, and the replies the machine makes
meanwhile (a later recipient refused here, an error sleep) are held behind
it.  The last recipient of the group forwards all of them -- with MAIL, for
the first group -- in one write and one round trip, and every reply then
goes out in the client's order.  A reply is owed only while the client's
next line, complete and short, is an RCPT already received, so the reader
takes it at once.  A group goes to Postfix before it could carry the
session past the hard error limit (or past :data:`GROUP_LIMIT`), so each
command's error-limit check sees the errors of the recipients before it.
A session that ends with replies owed (a drop verdict, a timeout) answers
each owed recipient ``451 4.3.0`` (it never reached Postfix; the client
tries it again), then what it held, then its own last reply.

Inside, each event's work is a generator that yields its requests and gets
their answers back, so the logic of a command reads top to bottom; replies
are queued and returned with the next request, in order.  The listener
(:mod:`smtpguard.listener`) carries the actions out against the client, the
pipeline and Postfix; tests/unit/test_machine.py runs them against tables
of answers, with no sockets and no clock.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any

from . import logs, stress, tls
from .checks.errors import error_delay
from .checks.helo import unforwardable_helo
from .config import Config
from .data import DataScanner
from .envelope import EnvelopeError, parse_mail, parse_rcpt
from .metrics import METRICS, reject_reason
from .relay import UpstreamError, UpstreamReply
from .session import Session
from .verdict import REPLIES, Action, Reply, ScreenTest, Verdict

log = logging.getLogger("smtpguard")

#: The most recipients a pipelined group holds before it goes to Postfix
#: (fewer when the hard error limit is nearer: see SessionMachine._room).
GROUP_LIMIT = 100

#: While Postfix's reply to the final dot is outstanding, the client's idle
#: timer runs this much past ``upstream.data_done_timeout``, so that the wait
#: is ended by the upstream's own timer (a 451, ``upstream END-OF-MESSAGE
#: failed``), never cut short by ``server.data_timeout``.
DATA_DONE_GRACE = 1.0


# ------------------------------------------------------------------ effects


@dataclass(frozen=True, slots=True)
class Send:
    """Bytes for the client (one or more complete reply lines)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Arm:
    """Hold the replies that follow for *seconds* (the error sleep)."""

    seconds: float


@dataclass(frozen=True, slots=True)
class AbortUpstream:
    """Drop the connection to Postfix at once (a partial message is discarded)."""


@dataclass(frozen=True, slots=True)
class QuitUpstream:
    """End the connection to Postfix politely (QUIT), if there is one."""


@dataclass(frozen=True, slots=True)
class Unread:
    """Input received past the end of DATA: the next command's."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Close:
    """End the session after what was sent."""


# ------------------------------------------------------------------ requests


class Stage(enum.Enum):
    """What the pipeline is asked to screen (``Pipeline.on_*``)."""

    CONNECT = "connect"  # before anything is sent: limits, access table, allowlist cache
    GREET = "greet"  # after the greet wait: the pregreet test
    BANNER = "banner"  # before the final 220: the DNS lookups started at connect
    COMMAND = "command"
    HELO = "helo"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"
    RELAYED = "relayed"  # a recipient passed: the screening phase is over (no verdict)
    GREYLIST = "greylist"  # a recipient Postfix accepted: greylisting's verdict


@dataclass(frozen=True, slots=True)
class Screen:
    """Ask the pipeline for a :class:`Verdict` at *stage*.  For
    ``Stage.COMMAND``: *line* as received, *command* its verb, *pending*
    the input received after it and *previous* the command before; for
    ``Stage.GREET``: *line* is what the client sent in the greet wait and
    *after* when its first byte came; for ``Stage.RCPT`` and
    ``Stage.GREYLIST``: *rcpt*."""

    stage: Stage
    rcpt: str | None = None
    line: bytes = b""
    command: str = ""
    pending: bytes = b""
    previous: str = ""
    after: float = 0.0


@dataclass(frozen=True, slots=True)
class HandOff:
    """Pass the client's socket to Postfix's smtpd; answer True when it went."""


@dataclass(frozen=True, slots=True)
class GreetWait:
    """After ``220-``: wait *seconds* (until the first byte when
    *stop_early*); answer a :class:`Greeted`."""

    seconds: float
    stop_early: bool


@dataclass(frozen=True, slots=True)
class Greeted:
    """What the client sent in the greet wait, when its first byte came
    (seconds into the wait) and whether it has gone."""

    received: bytes
    after: float
    eof: bool


@dataclass(frozen=True, slots=True)
class OpenUpstream:
    """Connect to Postfix (XCLIENT, EHLO); answer the seconds it took."""


@dataclass(frozen=True, slots=True)
class Upstream:
    """Write *data* to Postfix, then read *replies* replies (after a drain
    when *replies* is 0)."""

    data: bytes
    replies: int = 1


@dataclass(frozen=True, slots=True)
class StartTls:
    """Discard pipelined input and do the TLS handshake; answer the TLS
    description for the log, or None when it failed."""


@dataclass(frozen=True, slots=True)
class ReadBody:
    """The next chunk of the message body; ``b""`` when the client is gone."""


Effect = Send | Arm | AbortUpstream | QuitUpstream | Unread | Close
Request = Screen | HandOff | GreetWait | OpenUpstream | Upstream | StartTls | ReadBody
Event = Verdict | Greeted | bool | float | list[UpstreamReply] | UpstreamError | str | bytes | None
_Steps = Generator[Request, Event, None]

#: The action classes that need an answer (``isinstance(action, REQUESTS)``).
REQUESTS = (Screen, HandOff, GreetWait, OpenUpstream, Upstream, StartTls, ReadBody)


@dataclass(slots=True)
class _Owed:
    """A recipient accepted here whose RCPT waits to go to Postfix with the
    rest of its pipelined group, and the actions made after it (held until
    its reply is sent)."""

    address: str
    line: bytes
    held: list[Effect]


class _Hangup(Exception):
    """End the session after the reply already queued."""


class SessionMachine:
    """One client's SMTP session, from accept to the end (see the module doc)."""

    __slots__ = ("cfg", "session", "clock", "tls_available", "upstream_connected", "_upstream_pipelining",
                 "_upstream_mail", "_upstream_extra", "_rcpt_lines", "in_data", "last_command", "counts",
                 "_succeeded", "_out", "_steps", "greeted", "handed_off", "closed", "_data_done", "wallclock",
                 "_pending", "_owed", "_count_later")

    def __init__(self, cfg: Config, session: Session, tls_available: bool,
                 clock: Callable[[], float] = time.monotonic, wallclock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.session = session
        self.clock = clock
        self.wallclock = wallclock  # the date of [tls] received_header's trace header
        self.tls_available = tls_available  # STARTTLS can be offered (a certificate, not yet encrypted)
        self.upstream_connected = False
        self._upstream_pipelining = False  # Postfix got an EHLO: MAIL and RCPT may go in one write
        self._upstream_mail = False  # MAIL sent upstream in this transaction
        # RCPT lines of the recipients Postfix and greylisting both accepted
        # (s.rcpts), to replay them after a RSET when Postfix also holds one
        # that greylisting deferred (_upstream_extra): Postfix must never get
        # DATA for a greylisted recipient.
        self._rcpt_lines: list[bytes] = []
        self._upstream_extra = False
        self.in_data = False
        self._data_done = False  # the end of data went to Postfix; its reply is outstanding
        self.last_command = ""  # for "lost connection after CMD" and the counts
        #: command -> [succeeded, sent]: smtpd's per-command counts for DISCONNECT
        self.counts: dict[str, list[int]] = {}
        self._succeeded = False  # the last command's final reply was 2xx/3xx
        self._out: list[Effect] = []
        self._pending = b""  # the client's input already received after the current command
        # Pipelined recipients not yet forwarded (see the module doc); a tuple: thousands of
        # sessions wait in the greet wait, and an empty tuple is shared, an empty list is not.
        self._owed: tuple[_Owed, ...] = ()
        self._count_later = False  # the current RCPT is owed: its DISCONNECT count comes with its reply
        self._steps: _Steps | None = None
        self.greeted = False  # the final 220 was sent: commands are read now
        self.handed_off = False  # the client went to Postfix's smtpd (no DISCONNECT line of ours)
        self.closed = False  # Close was returned

    # ------------------------------------------------------------ events

    def connect(self) -> list[Effect | Request]:
        """The client connected: screening before the banner, the greet
        wait, the banner."""
        if self._steps is not None or self.greeted:
            raise RuntimeError("connect() twice")
        self._steps = self._greet()
        return self._run(None)

    def command(self, raw: bytes, pending: bytes = b"") -> list[Effect | Request]:
        """A command line *raw* arrived (with its line ending, as received);
        *pending* is the input already received after it."""
        if self._steps is not None:
            raise RuntimeError("command() while a request is unanswered")
        self._steps = self._command(raw, pending)
        return self._run(None)

    def answer(self, event: Event) -> list[Effect | Request]:
        """The answer to the request last returned."""
        if self._steps is None:
            raise RuntimeError("answer() with no request outstanding")
        return self._run(event)

    def line_too_long(self) -> list[Effect | Request]:
        """The reader discarded a command line over the length limit."""
        self._abandon_owed()  # cannot happen (see _rcpt_follows): the replies' order if it did
        self._reply(REPLIES["line_too_long"])
        return self._flush()

    def timed_out(self) -> list[Effect | Request]:
        """The idle timer ran out (:attr:`timeout`): Postfix's ``timeout after CMD``."""
        s = self.session
        log.info("timeout after %s from %s", self.last_command or "CONNECT", s.who)
        self._abandon_owed()
        if self.in_data:
            self._abort_upstream()  # never finish a half-received message
        self._send(f"421 4.4.2 {self.cfg.server.hostname} Error: timeout exceeded\r\n".encode())
        self._close()
        return self._flush()

    def lost(self) -> None:
        """The client closed the connection between commands."""
        log.info("lost connection after %s from %s", self.last_command or "CONNECT", self.session.who)

    def finish(self) -> None:
        """The session is over: smtpd's ``DISCONNECT`` line with its counts
        (none for a client handed off to Postfix: postscreen logs none)."""
        for _ in self._owed:  # the client left with replies owed
            self._count("RCPT", False)
        if not self.handed_off:
            log.info("DISCONNECT %s %s", self.session.peer, _command_counts(self.counts))

    @property
    def timeout(self) -> float:
        """How long the next read may take: ``data_timeout`` in DATA,
        ``command_timeout`` once a recipient passed screening and, before
        that, postscreen's ``command_time_limit`` if it is shorter.  A
        session that started under stress (``session.stress``) has the
        ``[stress]`` command timeout if it is shorter (smtpguard.stress).
        While Postfix's reply to the final dot is outstanding, the wait is
        ``upstream.data_done_timeout`` (RFC 1047: Postfix may take long to
        queue a message, and a 4xx meanwhile would make the client send it
        again), so the idle timer then runs :data:`DATA_DONE_GRACE` past it."""
        server = self.cfg.server
        if self._data_done:
            return self.cfg.upstream.data_done_timeout + DATA_DONE_GRACE
        if self.in_data:
            return stress.command_timeout(server.data_timeout, self.cfg.stress, self.session.stress)
        command = stress.command_timeout(server.command_timeout, self.cfg.stress, self.session.stress)
        if self.session.screened or not self.greeted:
            return command
        return min(command, self.cfg.errors.command_time_limit)

    @property
    def busy(self) -> bool:
        """A request is waiting for its answer."""
        return self._steps is not None

    def _run(self, event: Event) -> list[Effect | Request]:
        assert self._steps is not None
        request: Request | None = None
        try:
            request = self._steps.send(event)
        except StopIteration:
            self._steps = None
        except _Hangup:
            self._steps = None
            self._abandon_owed()
            self._close()
        if self._steps is None and self.last_command:
            if self._count_later:
                self._count_later = False
            else:
                self._count(self.last_command, self._succeeded)
        out = self._flush()
        if request is not None:
            out.append(request)
        return out

    def _abandon_owed(self) -> None:
        """The session ends with replies owed: each owed recipient (Postfix
        never got it) is answered 451 and counted failed, what it held
        follows; the caller's own reply comes after them all."""
        owed, self._owed = self._owed, ()
        succeeded = self._succeeded
        self._answer_each(owed, REPLIES["not_forwarded"])
        self._succeeded = succeeded

    def _count(self, command: str, succeeded: bool) -> None:
        count = self.counts.setdefault(command, [0, 0])
        count[0] += succeeded
        count[1] += 1

    def _flush(self) -> list[Effect | Request]:
        out: list[Effect | Request] = list(self._out)
        self._out.clear()
        return out

    # ------------------------------------------------------------ replies

    def _reply(self, reply: Reply) -> None:
        data = reply.wire()
        if reply.code >= 400:
            self._error()
        self._send(data)

    def _relay_reply(self, reply: UpstreamReply) -> None:
        if reply.code >= 400:
            self._error()
        self._send(reply.raw)

    def _error(self) -> None:
        """Count an error reply; past the soft limit the replies that follow
        are held back (smtpd_error_sleep_time)."""
        delay = error_delay(self.cfg.errors, self.session.errors)
        self.session.errors += 1
        if delay:
            self._emit(Arm(delay))

    def _send(self, data: bytes) -> None:
        self._succeeded = data[:1] in (b"2", b"3")
        self._emit(Send(data))

    def _emit(self, effect: Effect) -> None:
        """Queue *effect*, or hold it behind the last owed recipient's reply."""
        (self._owed[-1].held if self._owed else self._out).append(effect)

    def _close(self) -> None:
        if not self.closed:
            self.closed = True
            self._out.append(Close())

    # ------------------------------------------------------------ before the first command

    def _greet(self) -> _Steps:
        """postscreen's part: refuse, hand off, or greet (with the pregreet
        wait when the test is due)."""
        s, cfg = self.session, self.cfg
        verdict = yield from self._ask(Screen(Stage.CONNECT))
        if verdict.action is Action.DROP:
            self._refuse(verdict, "CONNECT")
        if verdict.action is Action.PASS:
            passed = yield HandOff()
            if passed:
                self.handed_off = True  # Postfix's smtpd has the connection; ours closes
                raise _Hangup
        greeting = cfg.server.greeting
        # A session that started under stress has the shorter [stress] greet wait.
        wait = stress.greet_wait(cfg.pregreet.greet_wait, cfg.stress, s.stress)
        if ScreenTest.PREGREET in s.todo and wait > 0:
            # Pregreet: the first line of a multi-line banner, then wait.
            self._send(f"220-{greeting}\r\n".encode())
            greeted = yield GreetWait(wait, cfg.pregreet.action == "drop")
            assert isinstance(greeted, Greeted)
            if not greeted.received and greeted.eof:
                log.info("HANGUP after %.2f from %s in tests before SMTP handshake",
                         self.clock() - s.started, s.peer)
                raise _Hangup
            verdict = yield from self._ask(Screen(Stage.GREET, line=greeted.received, after=greeted.after))
            if verdict.action is Action.DROP:
                self._refuse(verdict, "PREGREET")
        verdict = yield from self._ask(Screen(Stage.BANNER))  # the DNS lookups started at connect
        if verdict.action is Action.DROP:
            self._refuse(verdict, "CONNECT")
        self._send(f"220 {greeting}\r\n".encode())
        self.greeted = True

    def _ask(self, screen: Screen) -> Generator[Request, Event, Verdict]:
        """The pipeline's verdict for *screen*."""
        verdict = yield screen
        assert isinstance(verdict, Verdict)
        return verdict

    def _refuse(self, verdict: Verdict, stage: str) -> None:
        """Refuse before the SMTP dialogue and hang up; a failed test
        (PREGREET) has logged its own line already, as postscreen does."""
        reply = verdict.reply or REPLIES["not_accepted"]
        counters = _REFUSED.get(reply)
        if counters is None:  # labels() is slow on a bot flood: keep the children
            counters = _REFUSED[reply] = (
                METRICS.connections_rejected.labels(reason=reject_reason(reply)),
                METRICS.rejects.labels(stage="CONNECT", code=str(reply.code)),
            )
        for counter in counters:
            counter.inc()
        if stage == "CONNECT":
            log.info("NOQUEUE: reject: %s from %s: %s; proto=SMTP", stage, self.session.who, reply)
        self._send(reply.wire())
        raise _Hangup

    # ------------------------------------------------------------ one command

    def _command(self, raw: bytes, pending: bytes) -> _Steps:
        s = self.session
        self._pending = pending
        s.commands += 1
        line = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1] if raw.endswith(b"\n") else raw
        verb, _, rest = line.partition(b" ")
        command = verb.upper().decode("ascii", "replace")
        assert not self._owed or command == "RCPT", "a reply is owed only while an RCPT follows"
        handler = _HANDLERS.get(command)
        previous = self.last_command
        self.last_command = command if handler is not None else "UNKNOWN"
        self._succeeded = False
        verdict = yield from self._ask(Screen(Stage.COMMAND, line=raw, command=command[:32], pending=pending,
                                              previous=previous))
        if verdict.action is Action.DROP:
            # The check logged its own line (PREGREET, too many errors, ...).
            self._send((verdict.reply or REPLIES["not_accepted"]).wire())
            raise _Hangup
        arg = rest.strip().decode("utf-8", "surrogateescape") or None
        if handler is None:
            # XCLIENT, XFORWARD, BDAT, AUTH, ETRN... are never forwarded.
            log.info("warning: %s: unknown or unsupported command: %s", s.who, command[:32] or "<empty>")
            self._reply(REPLIES["unknown_command"] if line.strip() else REPLIES["bad_syntax"])
            return
        yield from handler(self, arg)

    def _screen(self, stage: Stage, where: str, rcpt: str | None = None) -> Generator[Request, Event, bool]:
        """Ask the pipeline; True when the command may proceed, else the
        reject is answered and logged as smtpd's ``NOQUEUE: reject:`` at
        *where* (the command)."""
        verdict = yield from self._ask(Screen(stage, rcpt))
        if verdict.action in (Action.CONTINUE, Action.PASS):
            return True
        reply = verdict.reply or REPLIES["not_accepted"]
        s = self.session
        log.info(logs.noqueue(str(reply), where, s.who, s.sender, rcpt, s.proto, s.helo))
        METRICS.rejects.labels(stage=where, code=str(reply.code)).inc()
        self._reply(reply)
        if verdict.action is Action.DROP:
            raise _Hangup
        return False

    def _upstream(self, data: bytes, replies: int = 1) -> Generator[Request, Event, list[UpstreamReply]]:
        """Forward *data*; Postfix's replies.  Raises UpstreamError."""
        answer = yield Upstream(data, replies)
        if isinstance(answer, UpstreamError):
            raise answer
        assert isinstance(answer, list)
        return answer

    # ------------------------------------------------------------ commands

    def helo(self, arg: str | None) -> _Steps:
        if arg is None:
            self._reply(REPLIES["helo_syntax"])
            return
        if (yield from self._new_helo(arg, "HELO")) and (yield from self._screen(Stage.HELO, "HELO")):
            self._reply(Reply(250, "", self.cfg.server.hostname))

    def ehlo(self, arg: str | None) -> _Steps:
        if arg is None:
            self._reply(REPLIES["ehlo_syntax"])
            return
        if not (yield from self._new_helo(arg, "EHLO")) or not (yield from self._screen(Stage.HELO, "EHLO")):
            return
        server = self.cfg.server
        lines = [server.hostname, "PIPELINING", f"SIZE {server.message_size_limit}"]
        if not server.disable_vrfy_command:
            lines.append("VRFY")
        if self.tls_available:
            lines.append("STARTTLS")
        lines += ["ENHANCEDSTATUSCODES", "8BITMIME", "DSN", "SMTPUTF8"]
        self._send("".join(f"250-{x}\r\n" for x in lines[:-1]).encode() + f"250 {lines[-1]}\r\n".encode())
        self.session.advertised = True  # from now on the client may pipeline

    def _new_helo(self, name: str, stage: str) -> Generator[Request, Event, bool]:
        """Take a new HELO name; False (and the 501 sent) for one that could
        not go to Postfix as the client's own (:func:`unforwardable_helo`)."""
        s = self.session
        refused = unforwardable_helo(name)
        if refused is not None:
            log.info(logs.noqueue(str(refused), stage, s.who, s.sender, None, s.proto, name))
            METRICS.rejects.labels(stage=stage, code=str(refused.code)).inc()
            self._reply(refused)
            return False
        # HELO/EHLO in a transaction resets it, as RSET does (RFC 5321 4.1.4).
        yield from self._reset()
        s.helo = name
        s.esmtp = stage == "EHLO"
        s.advertised = False
        return True

    def starttls(self, arg: str | None) -> _Steps:
        s = self.session
        if arg is not None:
            self._reply(tls.STARTTLS_SYNTAX)
        elif s.tls is not None:
            self._reply(tls.ALREADY_ACTIVE)
        elif not self.tls_available:
            self._reply(tls.NOT_AVAILABLE)
        elif s.in_transaction:
            self._reply(tls.IN_TRANSACTION)
        else:
            self._reply(tls.READY)
            description = yield StartTls()
            if not isinstance(description, str):
                raise _Hangup
            # RFC 3207 4.2: forget what the client said before; it must EHLO again.
            self._quit_upstream()  # its XCLIENT HELO= is stale; the next RCPT reconnects
            s.helo, s.esmtp, s.advertised, s.tls = None, False, False, description
            self.tls_available = False
            log.info("Anonymous TLS connection established from %s: %s", s.who, description)

    def mail(self, arg: str | None) -> _Steps:
        s = self.session
        if self.cfg.tls.security_level == "encrypt" and s.tls is None:
            self._reply(tls.STARTTLS_FIRST)
            return
        if s.in_transaction:
            self._reply(REPLIES["nested_mail"])
            return
        try:
            path = parse_mail(arg, self.cfg.server.message_size_limit, smtputf8=True)
        except EnvelopeError as exc:
            if exc.address is not None:  # a limit, not a syntax error: smtpd logs it
                log.info(logs.noqueue(str(exc.reply), "MAIL", s.who, exc.address, None, s.proto, s.helo))
                METRICS.rejects.labels(stage="MAIL", code=str(exc.reply.code)).inc()
            self._reply(exc.reply)
            return
        s.sender, s.mail_params = path.address, path.params
        if (yield from self._screen(Stage.MAIL, "MAIL")):
            self._reply(REPLIES["sender_ok"])
        else:
            s.reset_transaction()

    def rcpt(self, arg: str | None) -> _Steps:
        yield from self._rcpt(arg)
        if self._owed and not (self._upstream_pipelining and self._rcpt_follows() and len(self._owed) < self._room()):
            yield from self._settle()  # alone, the last of a pipelined group, or a full group: forward them

    def _room(self) -> int:
        """How many recipients a group may hold: never so many that their
        refusals could carry the session past the hard error limit unseen
        (the error-limit check before each command counts the errors
        replied so far), and at most :data:`GROUP_LIMIT`."""
        errors = self.cfg.errors
        if not (errors.enabled and errors.hard_limit):  # no hard limit
            return GROUP_LIMIT
        return min(GROUP_LIMIT, errors.hard_limit - self.session.errors)

    def _rcpt_follows(self) -> bool:
        """The client's next line is an RCPT, received whole (and short:
        the reader answers it at once, never with the over-long-line reply)."""
        pending = self._pending
        end = pending.find(b"\n")
        return 0 <= end < min(512, self.cfg.server.line_length_limit) and pending[:5].upper() == b"RCPT "

    def _rcpt(self, arg: str | None) -> _Steps:
        s = self.session
        if not s.in_transaction:
            self._reply(REPLIES["need_mail"])
            return
        try:
            path = parse_rcpt(arg)
        except EnvelopeError as exc:
            self._reply(exc.reply)
            return
        if not (yield from self._screen(Stage.RCPT, "RCPT", path.address)):
            return
        yield Screen(Stage.RELAYED)  # a recipient passed screening: the screening phase is over
        if not self.upstream_connected:
            opened = yield OpenUpstream()
            if isinstance(opened, UpstreamError):
                self._upstream_failed(opened, "RCPT")
                self._reply(REPLIES["upstream_unavailable"])
                return
            assert isinstance(opened, float)
            METRICS.upstream_connect_seconds.observe(opened)
            self.upstream_connected = True
            self._upstream_pipelining = s.helo is not None  # Postfix got the client's EHLO
        self._owed += (_Owed(path.address, _command("RCPT TO", path.address, path.params), []),)
        self._count_later = True  # with its reply, in _settle

    def _settle(self) -> _Steps:
        """Forward the owed recipients -- after MAIL when Postfix has none
        yet -- in one write when Postfix got an EHLO (PIPELINING), and
        answer each of them, and what was held behind it, in order."""
        s = self.session
        owed, self._owed = self._owed, ()
        succeeded = self._succeeded  # the current command's own reply decides its count
        lines = b"".join(o.line for o in owed)
        replies: list[UpstreamReply] = []
        try:
            if not self._upstream_mail:
                mail_line = _command("MAIL FROM", s.sender or "", s.mail_params)
                if self._upstream_pipelining:
                    mail_reply, *replies = yield from self._upstream(mail_line + lines, len(owed) + 1)
                else:
                    [mail_reply] = yield from self._upstream(mail_line)
                    if mail_reply.code == 250:
                        replies = yield from self._upstream(lines, len(owed))
                if mail_reply.code != 250:
                    replies = [mail_reply] * len(owed)  # Postfix refused the sender: that is every answer
                else:
                    self._upstream_mail = True
            else:
                replies = yield from self._upstream(lines, len(owed))
        except UpstreamError as exc:
            self._upstream_failed(exc, "RCPT")
            self._answer_each(owed, REPLIES["upstream_unavailable"])
            self._succeeded = succeeded
            return
        for o, reply in zip(owed, replies, strict=True):
            yield from self._answer_rcpt(o, reply)
            self._answered(o)
        self._succeeded = succeeded

    def _answer_each(self, owed: tuple[_Owed, ...], reply: Reply) -> None:
        """Owed recipients Postfix never judged: *reply* for each, in order."""
        for o in owed:
            self._reply(reply)
            self._answered(o)

    def _answered(self, owed: _Owed) -> None:
        """An owed recipient's reply is out: count it, release what it held."""
        self._count("RCPT", self._succeeded)
        self._out += owed.held

    def _answer_rcpt(self, owed: _Owed, reply: UpstreamReply) -> _Steps:
        """Postfix's reply to a recipient, relayed -- or greylisting's."""
        s = self.session
        if reply.code != 250:
            log.info("%s: RCPT from %s: upstream said: %s; from=<%s> to=<%s>",
                     "NOQUEUE", s.who, reply.text, s.sender, owed.address)
            self._relay_reply(reply)
            return
        # Greylisting judges only what Postfix accepted (postgrey's place at
        # the end of smtpd_recipient_restrictions): a relay attempt or an
        # unknown user got Postfix's own reject above, and left no triplet.
        if self.cfg.greylist.enabled and not (yield from self._screen(Stage.GREYLIST, "RCPT", owed.address)):
            self._upstream_extra = True  # Postfix holds it: no DATA before a RSET
            return
        s.rcpts.append(owed.address)
        self._rcpt_lines.append(owed.line)
        self._relay_reply(reply)

    def data(self, arg: str | None) -> _Steps:
        s = self.session
        if arg is not None:
            self._reply(REPLIES["data_syntax"])
            return
        if not s.in_transaction:
            self._reply(REPLIES["need_mail"])
            return
        if not s.rcpts:
            # Postfix may hold recipients greylisting deferred: reset its
            # transaction (the client's own stays, as in smtpd).
            yield from self._reset_upstream()
            self._reply(REPLIES["no_valid_rcpt"])
            return
        if not (yield from self._screen(Stage.DATA, "DATA")):
            return
        try:
            if self._upstream_extra and not (yield from self._replay()):
                yield from self._reset()
                self._reply(REPLIES["upstream_changed"])
                return
            [reply] = yield from self._upstream(b"DATA\r\n")
        except UpstreamError as exc:
            self._upstream_failed(exc, "DATA")
            self._end_transaction()  # its recipients are gone with the connection
            self._reply(REPLIES["upstream_lost"])
            return
        self._relay_reply(reply)
        if reply.code == 354:
            yield from self._stream_body()

    def _tls_trace_header(self) -> bytes:
        """With ``[tls] received_header`` and a client on TLS: a ``Received:``
        line of ours with the TLS facts, as Postfix's smtpd_tls_received_header
        writes them (Postfix's own Received: cannot carry them: XCLIENT's PROTO
        is SMTP or ESMTP only).  Never for a plaintext session."""
        s = self.session
        if s.tls is None or not self.cfg.tls.received_header:
            return b""
        name = s.client_name
        proto = "ESMTPS" if s.esmtp else "SMTPS"
        line = (f"Received: from {s.helo or name} ({name} [{s.client_addr}])\r\n"
                f"\t(using {s.tls})\r\n"
                f"\tby {self.cfg.server.hostname} (smtpguard) with {proto};\r\n"
                f"\t{formatdate(self.wallclock(), localtime=True)}\r\n")
        return line.encode("ascii", "replace")  # every part is ASCII already (the HELO was checked)

    def _stream_body(self) -> _Steps:
        """Stream the body to Postfix and relay its end-of-data reply."""
        s, server = self.session, self.cfg.server
        scanner = DataScanner(server.message_size_limit, server.line_length_limit, server.bare_newline)
        upstream_error: UpstreamError | None = None
        self.in_data = True
        start = self.clock()
        leftover = b""
        answer: Event = None
        trace = self._tls_trace_header()  # goes before the first piece of the message
        while not scanner.done:
            chunk = yield ReadBody()
            assert isinstance(chunk, bytes)
            if not chunk:
                self._abort_upstream()
                log.info("lost connection after DATA (%d bytes) from %s", scanner.size, s.who)
                raise _Hangup
            out, leftover = scanner.feed(chunk)
            if upstream_error is not None:
                continue
            if scanner.error is not None:
                self._abort_upstream()  # Postfix discards the partial message
            elif scanner.done:
                self._data_done = True  # the reply may take upstream.data_done_timeout (see timeout)
                answer = yield Upstream(trace + out + b".\r\n", 1)  # the last piece, the end marker, the reply
                self._data_done = False
                if isinstance(answer, UpstreamError):
                    upstream_error = answer
            elif out:
                answer, trace = (yield Upstream(trace + out, 0)), b""
                if isinstance(answer, UpstreamError):
                    upstream_error = answer
        self.in_data = False
        if leftover:
            self._out.append(Unread(leftover))
        sender, rcpts = s.sender, s.rcpts
        self._end_transaction()
        if scanner.error is not None:
            log.info(logs.noqueue(str(scanner.error), "END-OF-MESSAGE", s.who, sender, None, s.proto, s.helo))
            METRICS.rejects.labels(stage="END-OF-MESSAGE", code=str(scanner.error.code)).inc()
            self._reply(scanner.error)
            return
        if upstream_error is not None:
            self._upstream_failed(upstream_error, "END-OF-MESSAGE")
            self._reply(REPLIES["upstream_lost"])
            return
        assert isinstance(answer, list)
        [reply] = answer
        METRICS.upstream_data_seconds.observe(self.clock() - start)
        if reply.code == 250:
            METRICS.messages_relayed.inc()
            METRICS.bytes_relayed.inc(scanner.size)
        log.info("%s: relayed from %s: %s; from=<%s> nrcpt=%d size=%d",
                 reply.queue_id or "NOQUEUE", s.who, reply.text, sender, len(rcpts), scanner.size)
        self._relay_reply(reply)

    def rset(self, arg: str | None) -> _Steps:
        yield from self._reset()
        self._reply(REPLIES["ok"])

    def _reset(self) -> _Steps:
        """Abandon the transaction here and upstream."""
        yield from self._reset_upstream()
        self._end_transaction()

    def _reset_upstream(self) -> _Steps:
        """Abandon the transaction at Postfix (RSET) only; the next
        recipient sends MAIL again."""
        if self._upstream_mail and self.upstream_connected:
            try:
                yield from self._upstream(b"RSET\r\n")
            except UpstreamError as exc:
                self._upstream_failed(exc, "RSET")
        self._upstream_mail = self._upstream_extra = False

    def _replay(self) -> Generator[Request, Event, bool]:
        """Postfix holds a recipient greylisting deferred beside the
        accepted ones: RSET, then MAIL and the accepted recipients again (in
        one write when Postfix offered PIPELINING).  False when Postfix now
        refuses one of them.  Raises UpstreamError."""
        s = self.session
        lines = [b"RSET\r\n", _command("MAIL FROM", s.sender or "", s.mail_params), *self._rcpt_lines]
        if self._upstream_pipelining:
            replies = yield from self._upstream(b"".join(lines), len(lines))
        else:
            replies = []
            for line in lines:
                replies += yield from self._upstream(line)
        self._upstream_extra = False
        refused = [r for r in replies if r.code != 250]
        for r in refused:
            log.warning("%s: upstream refused a recipient replayed after greylisting: %s; from=<%s>",
                        s.who, r.text, s.sender)
        return not refused

    def _end_transaction(self) -> None:
        self.session.reset_transaction()
        self._upstream_mail = self._upstream_extra = False
        self._rcpt_lines = []

    def noop(self, arg: str | None) -> _Steps:
        self._reply(REPLIES["ok"])
        yield from ()

    def quit(self, arg: str | None) -> _Steps:
        self._reply(REPLIES["bye"])
        yield from ()
        raise _Hangup

    def vrfy(self, arg: str | None) -> _Steps:
        self._reply(REPLIES["vrfy_disabled"] if self.cfg.server.disable_vrfy_command else REPLIES["vrfy"])
        yield from ()

    # ------------------------------------------------------------ upstream bookkeeping

    def _upstream_failed(self, exc: UpstreamError, stage: str) -> None:
        METRICS.upstream_errors.labels(stage=stage).inc()
        log.warning("%s: upstream %s failed: %s", self.session.who, stage, exc)
        self._abort_upstream()
        self.session.rcpts = []
        self._rcpt_lines = []

    def _abort_upstream(self) -> None:
        self._out.append(AbortUpstream())
        self.upstream_connected = self._upstream_mail = self._upstream_extra = False

    def _quit_upstream(self) -> None:
        self._out.append(QuitUpstream())
        self.upstream_connected = self._upstream_mail = self._upstream_extra = False


_REFUSED: dict[Reply, tuple[Any, Any]] = {}


def _command_counts(counts: dict[str, list[int]]) -> str:
    """smtpd's summary, as Postfix 3.x writes it: ``name=N`` when all N
    succeeded, ``name=ok/N`` otherwise (``rcpt=0/2 ... commands=3/6``)."""
    def word(name: str, ok: int, total: int) -> str:
        return f"{name}={total}" if ok == total else f"{name}={ok}/{total}"

    words = [word(k.lower(), ok, total) for k, (ok, total) in counts.items()]
    ok_all = sum(ok for ok, _ in counts.values())
    return " ".join([*words, word("commands", ok_all, sum(total for _, total in counts.values()))])


# Command verb -> handler; a class-level table, so no per-session dict of bound methods.
_HANDLERS = {verb: getattr(SessionMachine, verb.lower()) for verb in (
    "HELO", "EHLO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "VRFY", "STARTTLS")}


def _command(verb: str, address: str, params: tuple[str, ...]) -> bytes:
    words = [f"{verb}:<{address}>", *params]
    return (" ".join(words) + "\r\n").encode("utf-8", "surrogateescape")
