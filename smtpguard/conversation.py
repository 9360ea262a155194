"""The SMTP conversation with one client, and its relay to Postfix.

:class:`Conversation` gets one command line at a time from the listener
(which owns the socket) and answers through the small :class:`ClientIO`
interface, so it never touches aiosmtpd.  What it does per command:

* HELO/EHLO/MAIL/RCPT are screened by the :class:`~smtpguard.pipeline.Pipeline`
  (the checks, in the order written there); a reject is answered here and
  logged as smtpd's ``NOQUEUE: reject:`` line.
* The first RCPT that passes opens the upstream connection (XCLIENT, EHLO),
  then MAIL and that RCPT go to Postfix together (pipelined); later RCPTs
  follow one by one.  Postfix's replies are relayed **verbatim**.
* DATA goes to Postfix first; only Postfix's ``354`` is relayed, then the
  body streams through :class:`~smtpguard.data.DataScanner` chunk by chunk
  and the client gets Postfix's own end-of-data reply.  A client therefore
  never sees 250 for a message Postfix has not accepted.
* STARTTLS (offered when :attr:`ClientIO.tls_available`): ``220``, then the
  listener's handshake; the session restarts (new EHLO needed).  With
  ``tls.security_level = "encrypt"`` MAIL before it gets ``530 5.7.0``.
* Upstream trouble at any point gives the client a 4xx (``451 4.4.1`` /
  ``451 4.4.2``) and a log line saying why; the next transaction reconnects.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

from . import logs, tls
from .checks.errors import error_delay
from .checks.helo import unforwardable_helo
from .config import Config
from .data import DataScanner
from .envelope import EnvelopeError, parse_mail, parse_rcpt
from .metrics import METRICS
from .pipeline import Pipeline
from .relay import Upstream, UpstreamError, UpstreamReply
from .session import Session
from .verdict import REPLIES, Action, Reply, Verdict, wire_line

log = logging.getLogger("smtpguard")


class ClientIO(Protocol):
    """What the conversation needs from the client connection."""

    def send(self, data: bytes) -> None: ...

    async def read_chunk(self) -> bytes: ...

    def unread(self, data: bytes) -> None: ...

    def close(self) -> None: ...

    @property
    def tls_available(self) -> bool:
        """STARTTLS can be offered now (a certificate, not yet encrypted)."""

    async def start_tls(self) -> str | None:
        """Discard pipelined input, do the handshake; the TLS description
        for the log, or None when the handshake failed."""


class Hangup(Exception):
    """End the session after the reply already sent."""


class Conversation:
    def __init__(self, cfg: Config, session: Session, io: ClientIO, pipeline: Pipeline) -> None:
        self.cfg = cfg
        self.session = session
        self.io = io
        self.pipeline = pipeline
        self.upstream = Upstream(cfg.upstream)
        self._upstream_mail = False  # MAIL sent upstream in this transaction
        self.in_data = False
        self.last_command = ""  # for "lost connection after CMD" and the counts
        self.succeeded = False  # the last command's final reply was 2xx/3xx (smtpd's ok/total counts)
        # smtpd_error_sleep_time: output held back while the session is over the soft error limit.
        self._hold = 0.0
        self._held: list[bytes] = []

    # ---------------------------------------------------------- plumbing

    def reply(self, reply: Reply | str) -> None:
        wire = reply.wire() if isinstance(reply, Reply) else wire_line(reply)
        if wire[:1] in (b"4", b"5"):
            self._error()
        self._send(wire)

    def relay_reply(self, reply: UpstreamReply) -> None:
        if reply.code >= 400:
            self._error()
        self._send(reply.raw)

    def _error(self) -> None:
        """Count an error reply; past the soft limit it is held back."""
        delay = error_delay(self.cfg.errors, self.session.errors)
        self.session.errors += 1
        self._hold = max(self._hold, delay)

    def _send(self, data: bytes) -> None:
        self.succeeded = data[:1] in (b"2", b"3")
        if self._hold:
            self._held.append(data)
        else:
            self.io.send(data)

    @property
    def hold(self) -> float:
        """Seconds the listener must wait before :meth:`release` (the error
        sleep of the command just handled); 0 when nothing is held."""
        return self._hold

    def release(self) -> None:
        """Send the output held back by the error sleep."""
        self._hold = 0.0
        held, self._held = self._held, []
        for data in held:
            self.io.send(data)

    async def handle(self, raw: bytes, pending: bytes = b"") -> None:
        """Answer one command line *raw* (with its line ending, as received);
        *pending* is the input already received after it.

        Raises :class:`Hangup` when the session must end.
        """
        s = self.session
        s.commands += 1
        line = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1] if raw.endswith(b"\n") else raw
        verb, _, rest = line.partition(b" ")
        command = verb.upper().decode("ascii", "replace")
        name = _HANDLERS.get(command)
        handler = getattr(self, name) if name is not None else None
        previous = self.last_command
        self.last_command = command if handler is not None else "UNKNOWN"
        self.succeeded = False
        verdict = await self.pipeline.on_command(s, raw, command[:32], pending, previous)
        if verdict.action is Action.DROP:
            # The check logged its own line (PREGREET, too many errors, ...).
            self.io.send((verdict.reply or REPLIES["not_accepted"]).wire())
            raise Hangup
        arg = rest.strip().decode("utf-8", "surrogateescape") or None
        if handler is None:
            # XCLIENT, XFORWARD, BDAT, AUTH, ETRN... are never forwarded.
            log.info("warning: %s: unknown or unsupported command: %s", s.who, command[:32] or "<empty>")
            self.reply(REPLIES["unknown_command"] if line.strip() else REPLIES["bad_syntax"])
            return
        await handler(arg)

    def close(self) -> None:
        self.upstream.quit()

    # ---------------------------------------------------------- screening

    async def _screen(self, verdict: Verdict, stage: str, rcpt: str | None = None) -> bool:
        """Apply a pipeline verdict; True when the command may proceed."""
        if verdict.action in (Action.CONTINUE, Action.PASS):
            return True
        reply = verdict.reply or REPLIES["not_accepted"]
        s = self.session
        log.info(logs.noqueue(str(reply), stage, s.who, s.sender, rcpt, s.proto, s.helo))
        METRICS.rejects.labels(stage=stage, code=str(reply.code)).inc()
        self.reply(reply)
        if verdict.action is Action.DROP:
            raise Hangup
        return False

    # ---------------------------------------------------------- commands

    async def helo(self, arg: str | None) -> None:
        if arg is None:
            self.reply(REPLIES["helo_syntax"])
            return
        if await self._new_helo(arg, "HELO") and await self._screen(await self.pipeline.on_helo(self.session), "HELO"):
            self.reply(f"250 {self.cfg.server.hostname}")

    async def ehlo(self, arg: str | None) -> None:
        if arg is None:
            self.reply(REPLIES["ehlo_syntax"])
            return
        if not await self._new_helo(arg, "EHLO"):
            return
        if not await self._screen(await self.pipeline.on_helo(self.session), "EHLO"):
            return
        server = self.cfg.server
        lines = [server.hostname, "PIPELINING", f"SIZE {server.message_size_limit}"]
        if not server.disable_vrfy_command:
            lines.append("VRFY")
        if self.io.tls_available:
            lines.append("STARTTLS")
        lines += ["ENHANCEDSTATUSCODES", "8BITMIME", "DSN", "SMTPUTF8"]
        self._send("".join(f"250-{x}\r\n" for x in lines[:-1]).encode() + f"250 {lines[-1]}\r\n".encode())
        self.session.advertised = True  # from now on the client may pipeline

    async def _new_helo(self, name: str, stage: str) -> bool:
        """Take a new HELO name; False (and the 501 sent) for one that could
        not go to Postfix as the client's own (:func:`unforwardable_helo`)."""
        s = self.session
        refused = unforwardable_helo(name)
        if refused is not None:
            log.info(logs.noqueue(str(refused), stage, s.who, s.sender, None, s.proto, name))
            METRICS.rejects.labels(stage=stage, code=str(refused.code)).inc()
            self.reply(refused)
            return False
        # HELO/EHLO in a transaction resets it, as RSET does (RFC 5321 4.1.4).
        await self._reset()
        s.helo = name
        s.esmtp = stage == "EHLO"
        s.advertised = False
        return True

    async def starttls(self, arg: str | None) -> None:
        s = self.session
        if arg is not None:
            self.reply(tls.STARTTLS_SYNTAX)
            return
        if s.tls is not None:
            self.reply(tls.ALREADY_ACTIVE)
            return
        if not self.io.tls_available:
            self.reply(tls.NOT_AVAILABLE)
            return
        if s.in_transaction:
            self.reply(tls.IN_TRANSACTION)
            return
        self.reply(tls.READY)
        description = await self.io.start_tls()
        if description is None:
            raise Hangup
        # RFC 3207 4.2: forget what the client said before; it must EHLO again.
        self.upstream.quit()  # its XCLIENT HELO= is stale; the next RCPT reconnects
        s.helo, s.esmtp, s.advertised, s.tls = None, False, False, description
        log.info("Anonymous TLS connection established from %s: %s", s.who, description)

    async def mail(self, arg: str | None) -> None:
        s = self.session
        if self.cfg.tls.security_level == "encrypt" and s.tls is None:
            self.reply(tls.STARTTLS_FIRST)
            return
        if s.in_transaction:
            self.reply(REPLIES["nested_mail"])
            return
        try:
            path = parse_mail(arg, self.cfg.server.message_size_limit, smtputf8=True)
        except EnvelopeError as exc:
            if exc.address is not None:  # a limit, not a syntax error: smtpd logs it
                log.info(logs.noqueue(str(exc.reply), "MAIL", s.who, exc.address, None, s.proto, s.helo))
                METRICS.rejects.labels(stage="MAIL", code=str(exc.reply.code)).inc()
            self.reply(exc.reply)
            return
        s.sender, s.mail_params = path.address, path.params
        if await self._screen(await self.pipeline.on_mail(s), "MAIL"):
            self.reply(REPLIES["sender_ok"])
        else:
            s.reset_transaction()

    async def rcpt(self, arg: str | None) -> None:
        s = self.session
        if not s.in_transaction:
            self.reply(REPLIES["need_mail"])
            return
        try:
            path = parse_rcpt(arg)
        except EnvelopeError as exc:
            self.reply(exc.reply)
            return
        if not await self._screen(await self.pipeline.on_rcpt(s, path.address), "RCPT", path.address):
            return
        await self.pipeline.on_relayed(s)  # a recipient passed screening: the screening phase is over
        rcpt_line = _command("RCPT TO", path.address, path.params)
        try:
            if not self.upstream.connected:
                METRICS.upstream_connect_seconds.observe(await self.upstream.open(s.identity()))
            if not self._upstream_mail:
                # MAIL and the first RCPT together when Postfix got an EHLO (PIPELINING).
                mail_line = _command("MAIL FROM", s.sender or "", s.mail_params)
                pipelined = self.upstream.pipelining
                mail_reply = await self.upstream.command(mail_line + rcpt_line if pipelined else mail_line)
                if mail_reply.code != 250:
                    if pipelined:
                        await self.upstream.read_reply()  # the RCPT's (503) reply
                    self.relay_reply(mail_reply)
                    return
                if not pipelined:
                    self.upstream.write(rcpt_line)
                self._upstream_mail = True
                reply = await self.upstream.read_reply()
            else:
                reply = await self.upstream.command(rcpt_line)
        except UpstreamError as exc:
            self._upstream_failed(exc, "RCPT")
            self.reply(REPLIES["upstream_unavailable"])
            return
        if reply.code == 250:
            s.rcpts.append(path.address)
        else:
            log.info("%s: RCPT from %s: upstream said: %s; from=<%s> to=<%s>",
                     "NOQUEUE", s.who, reply.text, s.sender, path.address)
        self.relay_reply(reply)

    async def data(self, arg: str | None) -> None:
        s = self.session
        if arg is not None:
            self.reply(REPLIES["data_syntax"])
            return
        if not s.in_transaction:
            self.reply(REPLIES["need_mail"])
            return
        if not s.rcpts:
            self.reply(REPLIES["no_valid_rcpt"])
            return
        if not await self._screen(await self.pipeline.on_data(s), "DATA"):
            return
        try:
            reply = await self.upstream.command(b"DATA\r\n")
        except UpstreamError as exc:
            self._upstream_failed(exc, "DATA")
            self._end_transaction()  # its recipients are gone with the connection
            self.reply(REPLIES["upstream_lost"])
            return
        self.relay_reply(reply)
        if reply.code != 354:
            return
        await self._stream_body()

    async def _stream_body(self) -> None:
        """Stream the body to Postfix and relay its end-of-data reply."""
        s, server = self.session, self.cfg.server
        scanner = DataScanner(server.message_size_limit, server.line_length_limit, server.bare_newline)
        upstream_error: UpstreamError | None = None
        self.in_data = True
        start = time.monotonic()
        while not scanner.done:
            chunk = await self.io.read_chunk()
            if not chunk:
                self.upstream.abort()
                log.info("lost connection after DATA (%d bytes) from %s", scanner.size, s.who)
                raise Hangup
            out, leftover = scanner.feed(chunk)
            if upstream_error is None:
                try:
                    if scanner.error is not None:
                        self.upstream.abort()  # Postfix discards the partial message
                    elif scanner.done:
                        self.upstream.write(out + b".\r\n")  # the last piece and the end marker
                    elif out:
                        self.upstream.write(out)
                        await self.upstream.drain()
                except UpstreamError as exc:
                    upstream_error = exc
        self.in_data = False
        self.io.unread(leftover)
        sender, rcpts = s.sender, s.rcpts
        self._end_transaction()
        if scanner.error is not None:
            log.info(logs.noqueue(str(scanner.error), "END-OF-MESSAGE", s.who, sender, None, s.proto, s.helo))
            METRICS.rejects.labels(stage="END-OF-MESSAGE", code=str(scanner.error.code)).inc()
            self.reply(scanner.error)
            return
        try:
            if upstream_error is not None:
                raise upstream_error
            reply = await self.upstream.read_reply()
        except UpstreamError as exc:
            self._upstream_failed(exc, "END-OF-MESSAGE")
            self.reply(REPLIES["upstream_lost"])
            return
        METRICS.upstream_data_seconds.observe(time.monotonic() - start)
        if reply.code == 250:
            METRICS.messages_relayed.inc()
            METRICS.bytes_relayed.inc(scanner.size)
        log.info("%s: relayed from %s: %s; from=<%s> nrcpt=%d size=%d",
                 reply.queue_id or "NOQUEUE", s.who, reply.text, sender, len(rcpts), scanner.size)
        self.relay_reply(reply)

    async def rset(self, arg: str | None) -> None:
        await self._reset()
        self.reply(REPLIES["ok"])

    async def _reset(self) -> None:
        """Abandon the transaction here and upstream."""
        if self._upstream_mail and self.upstream.connected:
            try:
                await self.upstream.command(b"RSET\r\n")
            except UpstreamError as exc:
                self._upstream_failed(exc, "RSET")
        self._end_transaction()

    def _end_transaction(self) -> None:
        self.session.reset_transaction()
        self._upstream_mail = False

    async def noop(self, arg: str | None) -> None:
        self.reply(REPLIES["ok"])

    async def quit(self, arg: str | None) -> None:
        self.reply(REPLIES["bye"])
        raise Hangup

    async def vrfy(self, arg: str | None) -> None:
        self.reply(REPLIES["vrfy_disabled"] if self.cfg.server.disable_vrfy_command else REPLIES["vrfy"])

    def _upstream_failed(self, exc: UpstreamError, stage: str) -> None:
        METRICS.upstream_errors.labels(stage=stage).inc()
        log.warning("%s: upstream %s failed: %s", self.session.who, stage, exc)
        self.upstream.abort()
        self._upstream_mail = False
        self.session.rcpts = []


# Command verb -> method; a class-level table, so no per-session dict of bound methods.
_HANDLERS = {verb: verb.lower() for verb in ("HELO", "EHLO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "VRFY",
                                                   "STARTTLS")}


def _command(verb: str, address: str, params: tuple[str, ...]) -> bytes:
    words = [f"{verb}:<{address}>", *params]
    return (" ".join(words) + "\r\n").encode("utf-8", "surrogateescape")
