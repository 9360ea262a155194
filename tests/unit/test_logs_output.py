"""``[log] output``: Postfix's maillog_file format on stderr, or syslog
datagrams (facility mail) with ``syslog_name/service_name[pid]`` as ident."""

from __future__ import annotations

import os
import re
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from smtpguard import logs
from smtpguard.config import LogConfig


@pytest.fixture
def restore_logger() -> Iterator[None]:
    saved = logs.log.handlers[:], logs.log.level, logs.log.propagate
    yield
    for h in logs.log.handlers:
        if h not in saved[0]:
            h.close()
    logs.log.handlers[:] = saved[0]
    logs.log.setLevel(saved[1])
    logs.log.propagate = saved[2]


def test_stderr_format(restore_logger: None, capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup(LogConfig(syslog_name="postfix-smtpguard"))
    logs.log.handlers[0].setStream(sys.stderr)  # type: ignore[attr-defined]
    logs.log.info("CONNECT from [192.0.2.7]:40123 to [192.0.2.1]:25")
    logs.log.warning("something odd")
    err = capsys.readouterr().err.splitlines()
    pid = os.getpid()
    assert re.fullmatch(rf"\w{{3}} [ \d]\d \d\d:\d\d:\d\d \S+ postfix-smtpguard/smtpd\[{pid}\]: "
                        r"CONNECT from \[192\.0\.2\.7\]:40123 to \[192\.0\.2\.1\]:25", err[0]), err
    assert err[1].endswith(f"postfix-smtpguard/smtpd[{pid}]: warning: something odd")


def test_program_without_service_name() -> None:
    assert logs.program(LogConfig(syslog_name="postfix/smtpguard", service_name="")) == "postfix/smtpguard"
    assert logs.program(LogConfig()) == "postfix/smtpd"


def test_syslog_output(restore_logger: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "log.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    server.settimeout(5)
    monkeypatch.setattr(logs, "SYSLOG_SOCKET", path)
    try:
        logs.setup(LogConfig(output="syslog"))
        logs.log.info("NOQUEUE: reject: RCPT from unknown[192.0.2.7]:1: 554 5.7.1 x; proto=ESMTP")
        datagram = server.recv(4096).decode()
    finally:
        server.close()
    # <22> = facility mail (2) * 8 + severity info (6)
    assert datagram.rstrip("\x00") == (f"<22>postfix/smtpd[{os.getpid()}]: "
                                       "NOQUEUE: reject: RCPT from unknown[192.0.2.7]:1: 554 5.7.1 x; proto=ESMTP")


def test_client_bytes_are_made_printable(restore_logger: None, capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup(LogConfig())
    logs.log.handlers[0].setStream(sys.stderr)  # type: ignore[attr-defined]
    logs.log.info("helo=<%s>", "x\rforged\n\x00caf\u00e9\udce9")
    [line] = capsys.readouterr().err.splitlines()
    assert line.endswith("helo=<x?forged??caf???>")  # one ? per byte: é is two in UTF-8, \udce9 one raw byte


def test_internal_error_is_logged_with_its_traceback(restore_logger: None,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup(LogConfig())
    logs.log.handlers[0].setStream(sys.stderr)  # type: ignore[attr-defined]
    try:
        int("\u00b2")
    except ValueError:
        logs.log.exception("%s: internal error", "unknown[192.0.2.7]")
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].endswith("error: unknown[192.0.2.7]: internal error")
    assert any("Traceback (most recent call last):" in line for line in lines[1:])
    assert lines[-1].endswith("error: ValueError: invalid literal for int() with base 10: '??'")  # ² is two bytes
    assert all(re.match(r"\w{3} [ \d]\d \d\d:\d\d:\d\d \S+ postfix/smtpd\[\d+\]: error: ", line) for line in lines)


def journal_entries(server: socket.socket) -> list[dict[str, str]]:
    """Parse journald native datagrams (KEY=value lines; length-prefixed values)."""
    entries = []
    server.settimeout(0.5)
    while True:
        try:
            data = server.recv(65536)
        except TimeoutError:
            return entries
        fields, i = {}, 0
        while i < len(data):
            nl = data.index(b"\n", i)
            line = data[i:nl]
            if b"=" in line:
                key, _, value = line.partition(b"=")
                i = nl + 1
            else:
                key, size = line, int.from_bytes(data[nl + 1:nl + 9], "little")
                value = data[nl + 9:nl + 9 + size]
                i = nl + 9 + size + 1
            fields[key.decode()] = value.decode()
        entries.append(fields)


def test_journal_output(restore_logger: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "journal.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    monkeypatch.setattr(logs, "JOURNAL_SOCKET", path)
    try:
        logs.setup(LogConfig(output="journal"))
        logs.log.info("NOQUEUE: reject: RCPT from unknown[192.0.2.7]:1: 554 5.7.1 x; proto=ESMTP")
        logs.log.warning("odd\nsecond line")  # made printable: one line
        entries = journal_entries(server)
    finally:
        server.close()
    assert entries[0] == {"MESSAGE": "NOQUEUE: reject: RCPT from unknown[192.0.2.7]:1: 554 5.7.1 x; proto=ESMTP",
                          "PRIORITY": "6", "SYSLOG_IDENTIFIER": "postfix/smtpd", "SYSLOG_PID": str(os.getpid()),
                          "SYSLOG_FACILITY": "2"}
    assert entries[1]["MESSAGE"] == "warning: odd?second line" and entries[1]["PRIORITY"] == "4"
    assert logs.journal_fields({"MESSAGE": "a\nb"}) == b"MESSAGE\n" + (3).to_bytes(8, "little") + b"a\nb\n"


def test_auto_output_follows_journal_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    assert logs.output(LogConfig(output="auto")) == "stderr"
    monkeypatch.setenv("JOURNAL_STREAM", "8:12345")
    assert logs.output(LogConfig(output="auto")) == "journal"
    assert logs.output(LogConfig(output="stderr")) == "stderr"


def test_journal_unreachable_falls_back_to_stderr(restore_logger: None, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(logs, "JOURNAL_SOCKET", str(tmp_path / "none.sock"))
    logs.setup(LogConfig(output="journal"))
    logs.log.info("CONNECT from [192.0.2.7]:1 to [192.0.2.1]:25")
    assert capsys.readouterr().err == f"postfix/smtpd[{os.getpid()}]: CONNECT from [192.0.2.7]:1 to [192.0.2.1]:25\n"


def test_syslog_without_dev_log_falls_back_to_stderr(restore_logger: None, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """No syslog daemon (a container without /dev/log): before, every line
    became a '--- Logging error ---' traceback and the log was lost."""
    missing = str(tmp_path / "no-dev-log")
    monkeypatch.setattr(logs, "SYSLOG_SOCKET", missing)
    monkeypatch.setattr(sys, "stderr", sys.stderr)  # setup() binds the stream capsys gives
    assert logs.syslog_problem() is not None
    logs.setup(LogConfig(output="syslog"))
    logs.log.info("CONNECT from [192.0.2.7]:40123 to [192.0.2.1]:25")
    err = capsys.readouterr().err
    assert "Logging error" not in err
    lines = err.splitlines()
    assert len(lines) == 2, lines
    assert re.search(rf"postfix/smtpd\[\d+\]: warning: \[log\] output = syslog: cannot send to {missing}: .*"
                     r"logging to stderr instead$", lines[0]), lines
    assert lines[1].endswith("CONNECT from [192.0.2.7]:40123 to [192.0.2.1]:25")


def test_check_config_warns_about_missing_syslog(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from smtpguard import cli

    monkeypatch.setattr(logs, "SYSLOG_SOCKET", str(tmp_path / "no-dev-log"))
    config = tmp_path / "smtpguard.toml"
    config.write_text('[log]\noutput = "syslog"\n')
    assert cli.main(["check-config", "-c", str(config)]) == 0
    out = capsys.readouterr()
    assert "configuration OK" in out.out
    assert "warning: [log] output = syslog: cannot send to" in out.err
