"""``smtpguard greylist import-postgrey``: postgrey's BerkeleyDB state, as
``db_dump -p`` prints it, into smtpguard's store.  The real round trip
builds the two databases with Berkeley DB's own ``db5.3_load`` and dumps them
with ``db5.3_dump -p`` (Debian package db5.3-util)."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from smtpguard.admin import Admin
from smtpguard.checks.greylist import GreylistConfig
from smtpguard.config import Config
from smtpguard.policy.postgrey_import import DumpError, ImportSummary, convert, records
from smtpguard.store.memory import MemoryStore

NOW = 1_700_000_000
CFG = GreylistConfig()
DUMP = f"""VERSION=3
format=print
type=btree
db_pagesize=4096
HEADER=END
 192.0.2.0/alice@sender.example/bob@example.test
 {NOW - 3600},{NOW - 3000}
 192.0.2.0/new@sender.example/bob@example.test
 {NOW - 60},{NOW - 60}
 198.51.100.0/old@sender.example/bob@example.test
 {NOW - 90 * 86400},{NOW - 80 * 86400}
 2001:db8::/x\\5cy@sender.example/bob@example.test
 {NOW - 1000},{NOW - 100},mx.example
DATA=END
VERSION=3
format=print
type=btree
HEADER=END
 192.0.2.7
 5,{NOW - 100}
 192.0.2.9
 7,{NOW - 7200}
 203.0.113.5
 1,{NOW - 60}
 da39a3ee5e6b4b0d3255bfef95601890afd80709
 5,{NOW}
DATA=END
""".encode()


def test_records_unescape_and_several_dumps() -> None:
    pairs = list(records(DUMP))
    assert len(pairs) == 8
    assert pairs[3][0] == "2001:db8::/x\\y@sender.example/bob@example.test"


def test_convert_follows_postgrey() -> None:
    summary = ImportSummary()
    triplets, clients = convert(records(DUMP), CFG, NOW, summary)
    by_key = dict(triplets)
    passed = by_key["192.0.2.0/alice@sender.example/bob@example.test"]
    assert passed.passed_at == NOW - 3000 and passed.expires == NOW - 3000 + CFG.max_age
    waiting = by_key["192.0.2.0/new@sender.example/bob@example.test"]
    assert waiting.passed_at is None and waiting.expires == NOW - 60 + CFG.retry_window
    assert "198.51.100.0/old@sender.example/bob@example.test" not in by_key  # expired
    # Two addresses of one /24 merge: highest count, latest time.
    assert clients["192.0.2.0"].count == 7 and clients["192.0.2.0"].last_counted == NOW - 100
    assert clients["203.0.113.0"].count == 1
    assert (summary.expired, summary.skipped_hashed, summary.passed) == (1, 1, 2)


def test_not_a_dump() -> None:
    with pytest.raises(DumpError, match="not db_dump -p output"):
        list(records(b"hello world\n"))
    with pytest.raises(DumpError, match="cut short"):
        list(records(b"VERSION=3\nHEADER=END\n a\n b\n"))
    with pytest.raises(DumpError, match="must start with a space"):
        list(records(b"VERSION=3\nHEADER=END\na\n"))


async def test_admin_command_imports_into_the_store(tmp_path: Path) -> None:
    path = tmp_path / "dump.txt"
    path.write_bytes(DUMP)
    store = MemoryStore(lambda: float(NOW))
    out = io.StringIO()
    admin = Admin(store, Config(), out, False, lambda: float(NOW))
    assert await admin.greylist_import_postgrey([str(path)]) == 0
    assert "imported 3 triplet(s) (2 passed) and 2 auto-allowlist network(s)" in out.getvalue()
    assert (await store.get_triplet("192.0.2.0/alice@sender.example/bob@example.test")) is not None
    assert (await store.get_client("192.0.2.0")).count == 7  # type: ignore[union-attr]
    out = io.StringIO()
    bad = tmp_path / "bad.txt"
    bad.write_text("nonsense\n")
    assert await Admin(store, Config(), out, False, lambda: float(NOW)).greylist_import_postgrey([str(bad)]) == 1


@pytest.mark.skipif(not (shutil.which("db5.3_load") and shutil.which("db5.3_dump")),
                    reason="needs db5.3_load and db5.3_dump (Debian package db5.3-util)")
def test_real_berkeley_db_round_trip(tmp_path: Path) -> None:
    """postgrey.db and postgrey_clients.db made by Berkeley DB, dumped by
    db_dump -p, imported by the real command into a SQLite store."""
    import time

    now = int(time.time())
    grey = f" 192.0.2.0/alice@sender.example/bob@example.test\n {now - 3600},{now - 3000}\n"
    awl = f" 192.0.2.7\n 5,{now - 100}\n"
    for name, body in (("postgrey.db", grey), ("postgrey_clients.db", awl)):
        text = f"VERSION=3\nformat=print\ntype=btree\nHEADER=END\n{body}DATA=END\n"
        subprocess.run(["db5.3_load", "-f", "/dev/stdin", str(tmp_path / name)], input=text.encode(), check=True)
    dump = subprocess.run(["db5.3_dump", "-p", str(tmp_path / "postgrey.db")], check=True,
                          capture_output=True).stdout
    dump += subprocess.run(["db5.3_dump", "-p", str(tmp_path / "postgrey_clients.db")], check=True,
                           capture_output=True).stdout
    (tmp_path / "dump.txt").write_bytes(dump)
    config = tmp_path / "smtpguard.toml"
    config.write_text(f'[state]\nurl = "sqlite:///{tmp_path}/state.db"\n')
    run = [sys.executable, "-m", "smtpguard", "greylist"]
    out = subprocess.run(run + ["import-postgrey", str(tmp_path / "dump.txt"), "-c", str(config)],
                         check=True, capture_output=True, text=True).stdout
    assert "imported 1 triplet(s) (1 passed) and 1 auto-allowlist network(s)" in out
    listed = subprocess.run(run + ["clients", "-c", str(config)], check=True, capture_output=True, text=True).stdout
    assert "192.0.2.0" in listed and "yes" in listed
