"""``smtpguard report`` on log lines in smtpguard's format."""

from __future__ import annotations

import gzip
import json
from datetime import datetime
from pathlib import Path

import pytest

from smtpguard import cli, logs
from smtpguard.report import build, client_net, reason

NOW = datetime(2026, 11, 23, 18, 0, 0)


def line(hms: str, msg: str, prog: str = "postfix/smtpd", day: int = 23) -> str:
    return f"Nov {day:2d} {hms} mx {prog}[4242]: {msg}\n"


def reject(ip: str, reply: str, sender: str, rcpt: str, stage: str = "RCPT") -> str:
    return logs.noqueue(reply, stage, logs.client("unknown", ip, 40000), sender, rcpt, "ESMTP", "h.example")


def relayed(ip: str, sender: str, size: int = 100) -> str:
    return (f"ABC123: relayed from unknown[{ip}]:40001: 250 2.0.0 Ok: queued as ABC123; "
            f"from=<{sender}> nrcpt=1 size={size}")


GREY = "450 4.2.0 <{}>: Recipient address rejected: Greylisted, see https://example.test/grey"

LOG = [
    line("10:00:00", f"CONNECT from {logs.endpoint('192.0.2.10', 40000)} to [192.0.2.1]:25"),
    line("10:00:01", reject("192.0.2.10", GREY.format("bob@example.test"), "a@s.test", "bob@example.test")),
    line("10:00:02", reject("192.0.2.10", GREY.format("carol@example.test"), "a@s.test", "carol@example.test")),
    line("10:00:03", reject("198.51.100.7", GREY.format("bob@example.test"), "x@y.test", "bob@example.test")),
    line("10:00:04", reject("203.0.113.5", "554 5.7.1 Service unavailable; client [203.0.113.5] blocked using "
                                           "zen.test", "spam@z.test", "bob@example.test")),
    line("10:00:05", reject("203.0.113.5", "554 5.7.1 Service unavailable; client [203.0.113.5] blocked using "
                                           "zen.test", "spam@z.test", "dave@example.test")),
    line("10:00:06", reject("203.0.113.6", "554 5.7.1 Service unavailable; client [203.0.113.6] blocked using "
                                           "zen.test", "spam@z.test", "bob@example.test")),
    line("10:00:07", reject("203.0.113.6", "504 5.5.2 <localhost>: Helo command rejected: need fully-qualified "
                                           "hostname", "spam@z.test", "bob@example.test")),
    # a retry from another address of the same /24, 7 minutes later: greylist passes
    line("10:07:01", f"CONNECT from {logs.endpoint('192.0.2.11', 40001)} to [192.0.2.1]:25"),
    line("10:07:02", relayed("192.0.2.11", "A@s.test", 2048)),
    line("10:07:03", "a Postfix line smtpguard does not write", prog="postfix/cleanup"),
    line("10:08:00", "PASS NEW [192.0.2.11]:40001"),
    line("10:09:00", "PASS OLD [192.0.2.11]:40002"),
    line("10:09:01", "PASS OLD [192.0.2.11]:40003"),
    line("10:09:02", "PREGREET 11 after 0.20 from [203.0.113.9]:40004: EHLO bot\\r\\n"),
    line("10:09:03", "DNSBL rank 3 for [203.0.113.9]:40004"),
    "garbage that is no log line\n",
]


def test_report_counts() -> None:
    r = build(LOG, now=NOW)
    d = r.as_dict(top=10)
    assert d["connections"] == 2
    assert d["relayed"] == {"messages": 1, "bytes": 2048}
    assert d["rejects"] == {"total": 7, "4xx": 3, "5xx": 4}
    assert d["reject_reasons"][:3] == [
        {"stage": "RCPT", "reason": "Recipient address rejected: Greylisted, see https://example.test/grey",
         "count": 3},
        {"stage": "RCPT", "reason": "blocked using zen.test", "count": 3},
        {"stage": "RCPT", "reason": "Helo command rejected: need fully-qualified hostname", "count": 1},
    ]
    assert d["top_rejected_clients"] == [
        {"client": "192.0.2.10", "count": 2}, {"client": "203.0.113.5", "count": 2},
        {"client": "203.0.113.6", "count": 2}, {"client": "198.51.100.7", "count": 1},
    ]
    assert d["screening_events"] == {"DNSBL rank": 1, "PASS NEW": 1, "PASS OLD": 2, "PREGREET": 1}
    assert d["allowlist_cache_hit_ratio"] == pytest.approx(2 / 3)
    g = d["greylist"]
    # 3 triplets; both of 192.0.2.0/24 + a@s.test pass (sender compared lower-cased)
    assert (g["triplets"], g["passed"]) == (3, 2)
    assert g["pass_rate"] == pytest.approx(2 / 3)
    assert g["delay_seconds"] == {"median": 420.0, "p90": 421.0, "max": 421.0}
    assert g["delay_histogram"]["5-10m"] == 2 and sum(g["delay_histogram"].values()) == 2
    text = r.render(top=5)
    assert "3   triplets greylisted" in text and "66.7% pass rate" in text
    assert "median 7m00s" in text and "blocked using zen.test" in text
    assert "2   PASS OLD" in text and "allowlist cache hits (PASS OLD / PASS OLD+NEW): 66.7%" in text


def test_report_syslog_name_filter() -> None:
    lines = [line("10:00:00", f"CONNECT from {logs.endpoint('192.0.2.10', 1)} to [192.0.2.1]:25"),
             line("10:00:01", f"CONNECT from {logs.endpoint('192.0.2.11', 1)} to [192.0.2.1]:25",
                  prog="postfix-smtpguard/smtpd")]
    assert build(lines, syslog_name="postfix-smtpguard", now=NOW).connections == 1
    assert build(lines, now=NOW).connections == 2


def test_reason_and_net() -> None:
    assert reason("Client host rejected: cannot find your reverse hostname, [192.0.2.12]") == \
        "Client host rejected: cannot find your reverse hostname"
    assert reason("<a@b>: Sender address rejected: Domain not found") == "Sender address rejected: Domain not found"
    assert client_net("192.0.2.77") == "192.0.2.0/24"
    assert client_net("2001:db8::1:2") == "2001:db8::/64"


def test_cli_report_text_json_gz(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plain = tmp_path / "mail.log"
    plain.write_text("".join(LOG))
    rotated = tmp_path / "mail.log.1.gz"
    with gzip.open(rotated, "wt") as f:
        f.write(line("09:00:00", f"CONNECT from {logs.endpoint('192.0.2.99', 1)} to [192.0.2.1]:25"))
    assert cli.main(["report", "--json", str(rotated), str(plain)]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["connections"] == 3 and d["rejects"]["total"] == 7
    assert cli.main(["report", "-n", "1", str(plain)]) == 0
    out = capsys.readouterr().out
    assert "Top rejected clients (top 1)" in out and "Greylisting" in out
    assert cli.main(["report", str(tmp_path / "missing.log")]) == 1
