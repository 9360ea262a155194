"""The daily command line (issue 17): --version, show-config [-n], the default
configuration file, operator commands on a missing database, closed pipes."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from smtpguard import cli, config, showconfig

RICH = """\
[server]
listen = ["0.0.0.0:25", "[::]:25"]
hostname = "mx.example.com"
message_size_limit = "20m"
proxy_trusted = ["10.0.0.0/8"]
[metrics]
listen = ""
[dns]
nameservers = ["127.0.0.1:5353", "[::1]:53"]
[limits]
exceptions = ["192.0.2.0/24"]
[dnsbl]
sites = ["zen.example*3", "wl.example=127.0.[0..255].[1..3]*-2"]
allowlist_threshold = -1
reply_map = { "key.zen.example" = "zen.example" }
[greylist]
enabled = true
delay = "1m"
retry_window = "1d"
text = "Greylisted \\"now\\", %s seconds"
client_allowlist = ["{dir}/clients"]
[rhsbl]
enabled = true
sender_sites = ["dbl.example=127.0.1.[2..99]"]
[policy]
listen = ["127.0.0.1:10023", "unix:/run/smtpguard/policy"]
checks = ["greylist", "rhsbl_sender@RCPT,MAIL"]
"""


@pytest.fixture
def rich(tmp_path: Path) -> Path:
    (tmp_path / "clients").write_text("example.com\n192.0.2.0/24\n")
    path = tmp_path / "smtpguard.toml"
    path.write_text(RICH.replace("{dir}", str(tmp_path)))
    return path


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"smtpguard {cli.version()}\n"
    assert cli.version()[0].isdigit()


def test_show_config_is_a_configuration_that_loads_to_the_same(rich: Path) -> None:
    cfg = config.load(rich)
    for changed in (False, True):
        text = showconfig.render(cfg, changed)
        assert config.from_dict(tomllib.loads(text)) == cfg, text


def test_show_config_n_prints_what_differs_from_the_defaults(rich: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["show-config", "-n", "-c", str(rich)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"# smtpguard show-config -n: {rich}\n")
    assert "[dnsbl]\nenabled = true\n" in out  # implied by sites, as postscreen does
    assert 'delay = "1m"' in out and 'retry_window = "1d"' in out
    assert "[tls]" not in out and "max_connections" not in out and "max_age" not in out
    assert cli.main(["show-config", "-c", "/dev/null"]) == 0
    full = capsys.readouterr().out
    assert "max_connections = 1000" in full and "[tls]" in full
    assert cli.main(["show-config", "-n", "-c", "/dev/null"]) == 0
    assert capsys.readouterr().out == "# smtpguard show-config -n: /dev/null\n"


def test_default_configuration_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    default = tmp_path / "etc.toml"
    default.write_text('[server]\nhostname = "from-etc.example"\n')
    monkeypatch.setattr(cli, "DEFAULT_CONFIG", str(default))
    monkeypatch.delenv("SMTPGUARD_CONFIG", raising=False)
    assert cli.main(["show-config", "-n"]) == 0
    out = capsys.readouterr()
    assert 'hostname = "from-etc.example"' in out.out
    assert f"smtpguard: configuration {default} (the default" in out.err
    env = tmp_path / "env.toml"
    env.write_text('[server]\nhostname = "from-env.example"\n')
    monkeypatch.setenv("SMTPGUARD_CONFIG", str(env))
    assert cli.main(["check-config"]) == 0
    out = capsys.readouterr()
    assert f"smtpguard: configuration {env} (from $SMTPGUARD_CONFIG)" in out.err
    assert out.out.startswith(f"smtpguard: {env}: configuration OK:") and "from-env.example" in out.out
    assert cli.main(["check-config", "-c", str(default)]) == 0  # -c wins, and needs no word
    out = capsys.readouterr()
    assert "from-etc.example" in out.out and out.err == ""
    monkeypatch.delenv("SMTPGUARD_CONFIG")
    default.unlink()
    assert cli.main(["cache", "stats"]) == 1
    assert f"smtpguard: error: {default}: No such file or directory" in capsys.readouterr().err


def test_operator_commands_do_not_create_a_database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli.main(["greylist", "stats", "-c", "/dev/null"]) == 1
    err = capsys.readouterr().err
    assert f"no database at {tmp_path}/state/smtpguard.db (a relative path: from the current directory)" in err
    assert not (tmp_path / "state").exists()
    conf = tmp_path / "abs.toml"
    conf.write_text(f'[state]\nurl = "sqlite:///{tmp_path}/db/state.db"\n')
    (tmp_path / "db").mkdir()
    dump = tmp_path / "dump.txt"
    dump.write_text("VERSION=3\nformat=print\ntype=btree\nHEADER=END\nDATA=END\n")
    assert cli.main(["greylist", "import-postgrey", "-c", str(conf), str(dump)]) == 0  # creates it
    assert cli.main(["greylist", "stats", "-c", str(conf)]) == 0


def test_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text(f'[state]\nurl = "sqlite:///{tmp_path}/state.db"\n')
    proc = subprocess.Popen([sys.executable, "-m", "smtpguard", "show-config", "-c", str(conf)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ})
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # `| head` that has read enough, before anything is written
    err = proc.stderr.read().decode()
    assert proc.wait() == 141
    assert "Traceback" not in err and "BrokenPipeError" not in err and "Exception ignored" not in err
