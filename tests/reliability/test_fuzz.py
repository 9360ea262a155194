"""Hypothesis fuzzing of a running smtpguard: arbitrary command lines and
message bodies.  Every reply is a well-formed SMTP reply line, no internal
error is logged, the process lives and its memory stays flat."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.guard import Guard, RawClient
from tests.lab import PrivatePostfix
from tests.reliability.figures import record, size

MakeGuard = Callable[..., Guard]
REPLY = re.compile(rb"^[2-5]\d\d[ -][\x20-\x7e]*\r$")
LINE = st.binary(max_size=600).map(lambda b: b.replace(b"\n", b"") + b"\r\n")
VERB = st.sampled_from([b"HELO ", b"EHLO ", b"MAIL FROM:", b"RCPT TO:", b"DATA", b"RSET", b"NOOP", b"VRFY ",
                        b"STARTTLS", b"XCLIENT ", b"BDAT ", b"AUTH ", b"QUIT", b""])
COMMAND = st.tuples(VERB, st.binary(max_size=300)).map(lambda t: t[0] + t[1].replace(b"\n", b"") + b"\r\n")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def converse(port: int, lines: list[bytes], body: bytes | None) -> list[bytes]:
    """Send the lines one at a time (and a body after a 354); every line read back."""
    c = RawClient(port, timeout=20)
    got: list[bytes] = []
    try:
        got.append(c.line().encode())
        for line in lines:
            c.send(line)
            reply = c.reply().encode()
            got += reply.splitlines(keepends=True)
            if reply.startswith(b"354") and body is not None:
                c.send(body + b"\r\n.\r\n")
                got += c.reply().encode().splitlines(keepends=True)
            if reply[:3] in (b"221", b"421", b"521"):
                break
    except (TimeoutError, ConnectionError):
        pass
    finally:
        c.close()
    return got


def test_fuzzed_commands_and_bodies(backend: PrivatePostfix, make_guard: MakeGuard) -> None:
    g = make_guard(backend.port, '[pregreet]\ngreet_wait = "0s"\n[errors]\nhard_limit = 1000\n'
                   'command_count_limit = 1000\n', upstream_extra='timeout = "5s"\n')
    assert g.proc is not None
    pid = g.proc.pid
    before = rss_kib(pid)
    conversations = [0]
    prefix = [b"EHLO fuzz.example\r\n", b"MAIL FROM:<a@sender.test>\r\n", b"RCPT TO:<bob@example.test>\r\n"]

    @settings(max_examples=size(60, 3000), deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(st.one_of(COMMAND, LINE), max_size=8), st.booleans(), st.binary(max_size=4000))
    def one(lines: list[bytes], data: bool, body: bytes) -> None:
        conversations[0] += 1
        script = prefix + [b"DATA\r\n"] + lines if data else lines
        for reply in converse(g.port, script, body.replace(b"\r\n.\r\n", b"\r\n..\r\n")):
            assert REPLY.match(reply.rstrip(b"\n")), reply
        assert g.proc is not None and g.proc.poll() is None

    one()
    after = rss_kib(pid)
    record("hypothesis fuzzing (commands, DATA)", conversations=conversations[0],
           rss_before_kib=before, rss_after_kib=after)
    assert "internal error" not in g.full_log()
    assert after - before < 20 * 1024, (before, after)  # flat: no growth with the number of sessions
