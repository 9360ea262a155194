"""The log consumers admins already run read smtpguard's lines unchanged:
pflogsumm counts its rejects, fail2ban's stock postfix filter bans on them."""

from __future__ import annotations

import dataclasses
import logging
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from smtpguard import logs
from smtpguard.config import Config, LogConfig
from smtpguard.verdict import Reply
from tests.integration.guard import Guard, RawClient
from tests.integration.test_metrics import scripted_sessions
from tests.lab import PrivatePostfix, which


def pflogsumm(log: Path, *args: str) -> str:
    binary = which("pflogsumm")
    assert binary is not None
    r = subprocess.run([binary, *args, str(log)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def rejected_count(report: str) -> int:
    m = re.search(r"^\s*(\d+)\s+rejected\b", report, re.M)
    assert m, report
    return int(m.group(1))


def reject_detail(report: str) -> str:
    m = re.search(r"message reject detail\n-+\n(.*?)\n\n", report, re.S)
    assert m, report
    return m.group(1)


def fail2ban_ips(log: Path) -> list[str]:
    binary = which("fail2ban-regex")
    assert binary is not None
    r = subprocess.run([binary, "-o", "ip", str(log), "/etc/fail2ban/filter.d/postfix.conf"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


@pytest.mark.postfix
@pytest.mark.pflogsumm
def test_pflogsumm_counts_guard_rejects_in_shared_maillog(
    backend: PrivatePostfix, make_guard: Callable[..., Guard], tmp_path: Path
) -> None:
    """smtpguard's own log (default syslog_name) + the backend Postfix's log,
    read as one maillog: pflogsumm counts Postfix's deliveries and reject,
    and smtpguard's rejects, with their client addresses."""
    g = make_guard(backend.port, "[server]\nmax_connections = 1\n")
    scripted_sessions(backend, g)
    g.wait_for_log(r"DISCONNECT \[127\.0\.0\.15\]")
    backend.wait_for_log(r"status=sent")
    assert re.search(r"^\w{3} [ \d]\d \d\d:\d\d:\d\d \S+ postfix/smtpd\[\d+\]: NOQUEUE: reject: "
                     r"END-OF-MESSAGE from unknown\[127\.0\.0\.14\]:\d+: 550 5\.5\.2 ", g.full_log(), re.M)
    maillog = tmp_path / "maillog"
    maillog.write_text(backend.log() + g.full_log())  # only this test's Postfix lines
    # The lab Postfix logs as postfix-backend/...; smtpguard as postfix/smtpd.
    report = pflogsumm(maillog, f"--syslog-name={backend.syslog_name}")
    # 4 received: Postfix queued the bare-newline message before smtpguard aborted it
    assert re.search(r"^\s*4\s+received\b", report, re.M), report
    assert re.search(r"^\s*3\s+delivered\b", report, re.M), report
    # Postfix's 454 Relay access denied + smtpguard's CONNECT busy and bare-newline rejects
    assert rejected_count(report) == 3, report
    detail = reject_detail(report)
    assert "CONNECT" in detail and "127.0.0.16" in detail, detail
    assert "END-OF-MESSAGE" in detail and "127.0.0.14" in detail, detail
    # smtpguard's log alone: exactly its two rejects
    own = tmp_path / "smtpguard.log"
    own.write_text(g.full_log())
    assert rejected_count(pflogsumm(own)) == 2


# The screening checks' reject replies, worded as Postfix words them (see
# smtpguard/checks/*): one client address each.
SCREENING_REJECTS = [
    ("192.0.2.11", "RCPT", Reply(554, "5.7.1", "Service unavailable; client [192.0.2.11] blocked using zen.test")),
    ("192.0.2.12", "RCPT", Reply(450, "4.7.1", "Client host rejected: cannot find your reverse hostname, "
                                               "[192.0.2.12]")),
    ("192.0.2.13", "RCPT", Reply(504, "5.5.2", "<localhost>: Helo command rejected: need fully-qualified hostname")),
    ("192.0.2.14", "RCPT", Reply(450, "4.1.8", "<a@nowhere.test>: Sender address rejected: Domain not found")),
    ("2001:db8::15", "RCPT", Reply(554, "5.7.1", "Service unavailable; client [2001:db8::15] blocked using zen.test")),
]


@pytest.fixture
def logged_rejects(tmp_path: Path) -> Iterator[Callable[[LogConfig], Path]]:
    """Write SCREENING_REJECTS through smtpguard's real log setup to a file."""
    saved = logs.log.handlers[:], logs.log.level, logs.log.propagate

    def write(cfg: LogConfig) -> Path:
        path = tmp_path / f"{cfg.syslog_name.replace('/', '_')}.log"
        with path.open("w") as f:
            real_stderr = sys.stderr
            sys.stderr = f
            try:
                logs.setup(cfg)
            finally:
                sys.stderr = real_stderr
            for ip, stage, reply in SCREENING_REJECTS:
                who = logs.client("unknown", ip, 40000)
                logs.log.info("CONNECT from %s to [192.0.2.1]:25", logs.endpoint(ip, 40000))
                logs.log.info(logs.noqueue(str(reply), stage, who, "a@sender.test", "bob@example.test",
                                           "ESMTP", "client.example"))
                logs.log.info("DISCONNECT %s ehlo=1 mail=1 rcpt=0/1 quit=1 commands=3/4", logs.endpoint(ip, 40000))
            for h in logs.log.handlers:
                h.flush()
        return path

    yield write
    logs.log.handlers[:], logs.log.level, logs.log.propagate = saved[0], saved[1], saved[2]
    logging.getLogger("smtpguard").handlers[:] = saved[0]


@pytest.mark.fail2ban
@pytest.mark.pflogsumm
@pytest.mark.parametrize(("syslog_name", "pflogsumm_args"), [
    ("postfix", ()),  # the default: postfix/smtpd
    ("postfix-smtpguard", ("--syslog-name=postfix-smtpguard",)),  # as for a Postfix multi-instance
])
def test_fail2ban_and_pflogsumm_read_reject_lines(
    logged_rejects: Callable[[LogConfig], Path], syslog_name: str, pflogsumm_args: tuple[str, ...]
) -> None:
    path = logged_rejects(LogConfig(syslog_name=syslog_name))
    text = path.read_text()
    assert re.search(rf"^\w{{3}} [ \d]\d \d\d:\d\d:\d\d \S+ {re.escape(syslog_name)}/smtpd\[\d+\]: NOQUEUE: reject: "
                     r"RCPT from unknown\[192\.0\.2\.11\]:40000: 554 5\.7\.1 Service unavailable; client "
                     r"\[192\.0\.2\.11\] blocked using zen\.test; from=<a@sender\.test> to=<bob@example\.test> "
                     r"proto=ESMTP helo=<client\.example>$", text, re.M), text
    # fail2ban's stock filter: every reject its patterns cover, IPv4 and IPv6
    assert sorted(fail2ban_ips(path)) == sorted(["192.0.2.11", "192.0.2.12", "192.0.2.13", "192.0.2.14",
                                                 "2001:db8::15"])
    report = pflogsumm(path, *pflogsumm_args)
    assert rejected_count(report) == len(SCREENING_REJECTS), report
    detail = reject_detail(report)
    assert re.search(r"blocked using zen\.test \(total: 2\)", detail), detail
    assert "192.0.2.12" in detail and "Helo command rejected" in detail, detail


@pytest.mark.fail2ban
def test_fail2ban_reads_postfix_smtpguard_syslog_name(logged_rejects: Callable[[LogConfig], Path]) -> None:
    """``syslog_name = "postfix/smtpguard"`` (program postfix/smtpguard/smtpd):
    fail2ban's filter still matches.  pflogsumm 1.1.5 does not count these
    lines (it reads the program as ``smtpguard/smtpd``) -- see docs/logging.md."""
    path = logged_rejects(LogConfig(syslog_name="postfix/smtpguard"))
    assert "postfix/smtpguard/smtpd[" in path.read_text()
    assert len(fail2ban_ips(path)) == len(SCREENING_REJECTS)


@pytest.mark.postfix
@pytest.mark.fail2ban
@pytest.mark.pflogsumm
@pytest.mark.skipif("helo" not in {f.name for f in dataclasses.fields(Config)},
                    reason="needs the screening checks ([helo] section), which land from the screen branch")
def test_fail2ban_and_pflogsumm_on_live_screening_reject(
    backend: PrivatePostfix, make_guard: Callable[..., Guard], tmp_path: Path
) -> None:
    """A real session rejected by a screening check (HELO is a bare IP
    address: ``504 5.5.2 <ip>: Helo command rejected: need fully-qualified
    hostname``, delivered at RCPT): both tools find it in smtpguard's log."""
    g = make_guard(backend.port)
    c = RawClient(g.port, source="127.0.0.51")
    c.reply()
    c.cmd("EHLO 192.0.2.51")
    c.cmd("MAIL FROM:<spam@sender.test>")
    reply = c.cmd("RCPT TO:<bob@example.test>")
    assert reply.startswith("504 5.5.2"), reply
    c.cmd("QUIT")
    c.close()
    g.wait_for_log(r"NOQUEUE: reject: RCPT from unknown\[127\.0\.0\.51\]")
    log = tmp_path / "live.log"
    log.write_text(g.full_log())
    assert fail2ban_ips(log) == ["127.0.0.51"]
    assert rejected_count(pflogsumm(log)) == 1


def journal_line(entry: dict[str, str], host: str = "mx") -> str:
    """A journal entry as fail2ban's ``backend = systemd`` hands it to its filter
    (fail2ban's ``FilterSystemd.formatJournalEntry``: hostname, identifier[pid]:, message),
    after the entry's time."""
    pid = entry.get("SYSLOG_PID") or entry.get("_PID")
    return (f"2026-05-04 10:00:00 {host} {entry.get('SYSLOG_IDENTIFIER') or entry['_COMM']}"
            f"{f'[{pid}]' if pid else ''}: {entry['MESSAGE']}")


@pytest.mark.fail2ban
@pytest.mark.parametrize("syslog_name", ["postfix", "postfix-smtpguard"])
def test_fail2ban_systemd_backend_reads_journal_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       syslog_name: str) -> None:
    """``[log] output = "journal"``: the entries journald stores, formatted as
    fail2ban's systemd backend formats them, match the stock postfix filter;
    stderr lines journalled under the unit's identifier (what ``output =
    "stderr"`` gives under systemd) match none."""
    import socket

    from tests.unit.test_logs_output import journal_entries

    path = str(tmp_path / "journal.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    monkeypatch.setattr(logs, "JOURNAL_SOCKET", path)
    saved = logs.log.handlers[:], logs.log.level, logs.log.propagate
    try:
        logs.setup(LogConfig(syslog_name=syslog_name, output="journal"))
        for ip, stage, reply in SCREENING_REJECTS:
            logs.log.info(logs.noqueue(str(reply), stage, logs.client("unknown", ip, 40000), "a@sender.test",
                                       "bob@example.test", "ESMTP", "client.example"))
        entries = journal_entries(server)
    finally:
        server.close()
        for h in logs.log.handlers:
            h.close()
        logs.log.handlers[:], logs.log.level, logs.log.propagate = saved[0], saved[1], saved[2]
    assert len(entries) == len(SCREENING_REJECTS)
    journal = tmp_path / "journal.log"
    journal.write_text("".join(journal_line(e) + "\n" for e in entries))
    assert sorted(fail2ban_ips(journal)) == sorted(ip for ip, _, _ in SCREENING_REJECTS), journal.read_text()
    # what output = "stderr" gives under systemd: our whole line is the MESSAGE of smtpguard[pid]
    stderr_style = tmp_path / "stderr-in-journal.log"
    stderr_style.write_text("".join(
        journal_line({"_COMM": "smtpguard", "_PID": "4242",
                      "MESSAGE": f"May  4 10:00:00 mx {syslog_name}/smtpd[4242]: {e['MESSAGE']}"}) + "\n"
        for e in entries))
    assert fail2ban_ips(stderr_style) == []
