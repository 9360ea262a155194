"""Config validation: every error names the key and what is wrong."""

from pathlib import Path

import pytest

from smtpguard import cli, config, options
from smtpguard.config import ConfigError, HostPort


def load_text(tmp_path: Path, text: str) -> config.Config:
    p = tmp_path / "smtpguard.toml"
    p.write_text(text)
    return config.load(p)


def test_defaults() -> None:
    cfg = config.Config()
    assert cfg.server.listen == (HostPort("127.0.0.1", 2525),)
    assert cfg.upstream.address == HostPort("127.0.0.1", 10025)
    assert cfg.state.url.startswith("sqlite:///")
    assert cfg.server.message_size_limit == 10240000


def test_full_file(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, """
[server]
listen = ["0.0.0.0:25", "[::1]:25"]
hostname = "mx.example.com"
banner = "$myhostname ESMTP ready"
max_connections = 500
message_size_limit = "20m"
command_timeout = "5m"
[upstream]
address = "127.0.0.1:10025"
connect_timeout = "10s"
timeout = "2m"
[state]
url = "redis://127.0.0.1:6379/0"
[metrics]
listen = ""
[log]
level = "debug"
syslog_name = "postfix/smtpguard"
""")
    assert cfg.server.listen == (HostPort("0.0.0.0", 25), HostPort("::1", 25))
    assert str(cfg.server.listen[1]) == "[::1]:25"
    assert cfg.server.greeting == "mx.example.com ESMTP ready"
    assert cfg.server.message_size_limit == 20 * 1024 * 1024
    assert cfg.server.command_timeout == 300
    assert cfg.upstream.timeout == 120
    assert cfg.metrics.listen is None
    assert cfg.log.syslog_name == "postfix/smtpguard"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[upstream]\naddress = "localhost"', 'upstream.address: expected HOST:PORT, got "localhost"'),
        ('[upstream]\naddress = "127.0.0.1:99999"', "upstream.address: port must be 1-65535"),
        ('[upstream]\ntimeout = "5 minutes"', 'upstream.timeout: expected a duration like 300s, 5m or 2d'),
        ('[upstream]\nconnect_timeout = -1', "upstream.connect_timeout: must not be negative"),
        ('[server]\nlisten = ["127.0.0.1:25", "nope"]', 'server.listen: entry 2: expected HOST:PORT, got "nope"'),
        ('[server]\nlisten = "127.0.0.1:25"', "server.listen: expected a list"),
        ('[server]\nlisten = ["[::zz]:25"]', "server.listen: entry 1: bad IPv6 address"),
        ('[server]\nlisten = []', "server.listen: at least one HOST:PORT is required"),
        ('[server]\nhostname = "bad host"', 'server.hostname: expected a host name'),
        ('[server]\nmax_connections = "many"', "server.max_connections: expected an integer"),
        ('[server]\nmessage_size_limit = "ten"', "server.message_size_limit: expected a size"),
        ('[server]\nbare_newline = "allow"', "server.bare_newline: expected one of reject, normalize"),
        ('[server]\nline_length_limit = 80', "server.line_length_limit: must be at least 1000"),
        ('[server]\nlisten_on = ["x"]', "server.listen_on: unknown key"),
        ('[servr]\nlisten = []', "servr: unknown section"),
        ('[state]\nurl = "postgres://x"', "state.url: expected sqlite:///PATH"),
        ('[log]\nlevel = "loud"', "log.level: expected one of debug, info, warning, error"),
        ('server = 1', "server: expected a table [server]"),
        ('[server\nx=1', "TOML syntax error"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_text(tmp_path, text)
    assert message in str(err.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="No such file"):
        config.load(tmp_path / "nope.toml")


@pytest.mark.parametrize(("raw", "seconds"), [("300s", 300), ("5m", 300), ("2d", 172800), ("1w", 604800),
                                             (30, 30), ("1.5s", 1.5), ("6", 6), ("1h", 3600)])
def test_durations(raw: object, seconds: float) -> None:
    assert options.parse_duration(raw) == seconds


def test_check_config_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.toml"
    good.write_text('[upstream]\naddress = "127.0.0.1:10026"\n')
    assert cli.main(["check-config", "-c", str(good)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("smtpguard: configuration OK:") and "upstream 127.0.0.1:10026" in out
    assert len(out.strip().splitlines()) == 1
    bad = tmp_path / "bad.toml"
    bad.write_text('[upstream]\naddress = "localhost"\n')
    assert cli.main(["check-config", "-c", str(bad)]) == 1
    assert 'upstream.address: expected HOST:PORT, got "localhost"' in capsys.readouterr().err
