"""Run smtpguard for real (a subprocess, as an admin would) and talk to it.

:class:`Guard` writes a TOML file, starts ``python -m smtpguard serve``, waits
until the port answers, and gives the test its log.  :class:`RawClient` is a
line-level SMTP client on a plain socket, bound to a chosen 127.0.0.x source
address, for the conversations smtplib will not have (pipelining, smuggling,
pregreet, forbidden commands).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

from tests.lab import free_port, wait_until

# Tests keep pregreet on (the default) with a short wait, so that every
# end-to-end test also proves a client that waits for the banner is fine.
PREGREET_WAIT = "0.2s"
# Tests that set no [dns] section ask no DNS at all (no PTR lookup of the
# client either): nothing may leave the loopback.
NO_DNS = "[client_name]\nlookup = false\n"


class Guard:
    def __init__(self, workdir: Path, upstream_port: int, extra: str = "", port: int | None = None,
                 upstream_extra: str = "", state_url: str | None = None,
                 listen: tuple[str, ...] = ("127.0.0.1",), source: Path | None = None,
                 command: str = "serve", wrap: tuple[str, ...] = (), state_extra: str = "") -> None:
        self.state_extra = state_extra  # more [state] keys (deadline, breaker_backoff, ...)
        self.wrap = wrap  # a command line that runs the rest (e.g. unshare -m ... for a private tmpfs)
        self.command = command  # "policy": the policy service alone (its [policy] listen in extra)
        self.port = port or free_port()
        self.source = source  # another checkout to run smtpguard from (bench/relay.py --baseline)
        self.listen = listen  # addresses to listen on, all on self.port
        self.metrics_port = free_port()
        self.dir = workdir
        self.config = workdir / "smtpguard.toml"
        self.log_path = workdir / "smtpguard.log"
        self.upstream_port = upstream_port
        self.extra = extra
        self.upstream_extra = upstream_extra
        self.state_url = state_url or f"sqlite:///{workdir}/state.db"
        self.proc: subprocess.Popen[bytes] | None = None
        self._offset = 0

    def write_config(self) -> None:
        server_extra, rest = _split_server(self.extra)
        self.config.write_text(
            "[server]\n"
            f"listen = [{', '.join(_quoted_endpoint(a, self.port) for a in self.listen)}]\n"
            'hostname = "mx.guard.test"\n'
            + server_extra +
            "[upstream]\n"
            f'address = "127.0.0.1:{self.upstream_port}"\n'
            + self.upstream_extra +
            "[metrics]\n"
            f'listen = "127.0.0.1:{self.metrics_port}"\n'
            "[state]\n"
            f'url = "{self.state_url}"\n'
            + self.state_extra
            + ("" if "[pregreet]" in rest else f'[pregreet]\ngreet_wait = "{PREGREET_WAIT}"\n')
            + ("" if "[dns]" in rest or "[client_name]" in rest else NO_DNS)
            + rest
        )

    def start(self) -> Guard:
        self.write_config()
        offset = len(self.full_log())  # a restart appends to the same log
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [*self.wrap, sys.executable, "-m", "smtpguard", self.command, "-c", str(self.config)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=None if self.source is None else {**os.environ, "PYTHONPATH": str(self.source)},
            # ``-m`` puts the working directory first on sys.path, before PYTHONPATH:
            # another checkout's code runs only from that checkout.
            cwd=self.source,
        )
        log.close()

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"smtpguard exited {self.proc.returncode}:\n{self.full_log()}")
            # Not a probe connection: it would count as a session (limits tests).
            return "daemon started" in self.full_log()[offset:]

        wait_until(up, timeout=20, what="smtpguard to start")
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        return code

    def full_log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def mark(self) -> None:
        self._offset = len(self.full_log())

    def log(self) -> str:
        return self.full_log()[self._offset:]

    def wait_for_log(self, regex: str, timeout: float = 10) -> re.Match[str]:
        found: list[re.Match[str]] = []

        def seen() -> bool:
            m = re.search(regex, self.log())
            if m:
                found.append(m)
            return m is not None

        try:
            wait_until(seen, timeout=timeout, what=f"smtpguard log line /{regex}/")
        except Exception as exc:
            raise AssertionError(f"{exc}\n--- smtpguard log ---\n{self.log()[-4000:]}") from None
        return found[0]


def _quoted_endpoint(address: str, port: int) -> str:
    return f'"[{address}]:{port}"' if ":" in address else f'"{address}:{port}"'


def _split_server(extra: str) -> tuple[str, str]:
    """Keys given under a leading ``[server]`` header merge into ours."""
    if extra.lstrip().startswith("[server]"):
        body = extra.lstrip()[len("[server]"):]
        m = re.search(r"^\[", body, re.M)
        return (body[: m.start()], body[m.start():]) if m else (body, "")
    return "", extra


class RawClient:
    """A line-level SMTP client bound to a chosen source address."""

    def __init__(self, port: int, source: str = "127.0.0.1", timeout: float = 15) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0))
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> str:
        """Read one (possibly multi-line) reply; returns it with CRLFs."""
        lines = []
        while True:
            line = self.line()
            lines.append(line)
            if len(line) < 4 or line[3] != "-":
                return "".join(lines)

    def line(self) -> str:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed; got {self.buf!r}")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode() + "\n"

    def cmd(self, line: str) -> str:
        self.send(line.encode() + b"\r\n")
        return self.reply()

    def transaction(self, helo: str = "EHLO client.example", sender: str = "a@sender.test",
                    rcpt: str = "bob@example.test", subject: str = "screened") -> list[str]:
        """A polite transaction after the banner; returns the replies to HELO,
        MAIL, RCPT and (if the RCPT was accepted) DATA and the end of data."""
        replies = [self.cmd(helo), self.cmd(f"MAIL FROM:<{sender}>"), self.cmd(f"RCPT TO:<{rcpt}>")]
        if replies[-1].startswith("250"):
            replies.append(self.cmd("DATA"))
            self.send(f"Subject: {subject}\r\n\r\nhello\r\n.\r\n".encode())
            replies.append(self.reply())
        return replies

    def closed(self, timeout: float = 10) -> bool:
        """True when the server closes the connection within *timeout*."""
        self.sock.settimeout(timeout)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buf += chunk
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()
