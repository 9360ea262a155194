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
    assert out.startswith(f"smtpguard: {good}: configuration OK:") and "upstream 127.0.0.1:10026" in out
    assert len(out.strip().splitlines()) == 1
    bad = tmp_path / "bad.toml"
    bad.write_text('[upstream]\naddress = "localhost"\n')
    assert cli.main(["check-config", "-c", str(bad)]) == 1
    assert 'upstream.address: expected HOST:PORT, got "localhost"' in capsys.readouterr().err


# ---------------------------------------------------------------- every problem at once (issue 17)

FOUR_MISTAKES = """\
[server]
hostname = "mx.example.com"
max_conections = 10

[greylist]
enabled = true
delay = "5 minutes"

[dnsbl]
sites = ["zen.spamhaus.org*3"]
threshold = 0

[upstream]
address = "localhost"
"""


def test_check_config_reports_every_error_with_file_line_and_key(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "smtpguard.toml"
    path.write_text(FOUR_MISTAKES)
    assert cli.main(["check-config", "-c", str(path)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"{path}:3: server.max_conections: unknown key",
        f'{path}:7: greylist.delay: expected a duration like 300s, 5m or 2d, got "5 minutes"',
        f"{path}:11: dnsbl.threshold: must be at least 1",
        f'{path}:14: upstream.address: expected HOST:PORT, got "localhost"',
        f"smtpguard: {path}: 4 errors, 0 warnings",
    ]


def test_load_raises_all_errors(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigErrors) as info:
        load_text(tmp_path, FOUR_MISTAKES)
    assert [p.key for p in info.value.problems] == [
        "server.max_conections", "greylist.delay", "dnsbl.threshold", "upstream.address"]
    assert str(info.value).startswith("server.max_conections: unknown key; greylist.delay: ")


@pytest.mark.parametrize(("text", "warning"), [
    ('[state]\nurl = "sqlite:///var/lib/smtpguard/smtpguard.db"',
     ':2: warning: state.url: "sqlite:///var/lib/smtpguard/smtpguard.db" is the relative path '
     'var/lib/smtpguard/smtpguard.db'),
    ('[limits]\nexceptions = [\n  "192.0.2.0/24",\n  "10.1.2.3/8",\n]',
     ':2: warning: limits.exceptions: "10.1.2.3/8" has host bits set: it is read as 10.0.0.0/8'),
    ('[greylist]\ndelay = 1\nretry_window = 2',
     ':3: warning: greylist.retry_window: 2 is 2 seconds; postgrey counts this option in days: write "2d"'),
    ('[dnsbl]\nenabled = false\nsites = "zen.example"',
     ":2: warning: dnsbl.enabled: false, so the sites are not looked up"),
])
def test_warnings_exit_zero(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, warning: str) -> None:
    path = tmp_path / "smtpguard.toml"
    path.write_text(text + "\n")
    assert cli.main(["check-config", "-c", str(path)]) == 0
    out = capsys.readouterr()
    assert out.err.startswith(f"{path}{warning}"), out.err
    assert out.out.startswith(f"smtpguard: {path}: configuration OK:") and "(1 warning)" in out.out


def test_retry_window_in_postgrey_days_is_an_error_and_a_hint(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "smtpguard.toml"
    path.write_text("[greylist]\nenabled = true\nretry_window = 2\n")
    assert cli.main(["check-config", "-c", str(path)]) == 1
    err = capsys.readouterr().err
    assert f'{path}:3: warning: greylist.retry_window: 2 is 2 seconds; postgrey counts' in err
    assert f"{path}:3: greylist.retry_window: must be longer than delay (300s)" in err


def test_dnsbl_sites_imply_enabled() -> None:
    assert config.from_dict({"dnsbl": {"sites": ["zen.example*2"]}}).dnsbl.enabled
    assert not config.from_dict({"dnsbl": {"sites": ["zen.example"], "enabled": False}}).dnsbl.enabled
    assert not config.Config().dnsbl.enabled


def test_syntax_error_has_its_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "smtpguard.toml"
    path.write_text("[server]\nhostname = mx\n")
    assert cli.main(["check-config", "-c", str(path)]) == 1
    assert capsys.readouterr().err.startswith(f"{path}:2: TOML syntax error: ")


def test_key_lines() -> None:
    lines = config.key_lines('a = 1\n[server]\nlisten = [\n "x = 1",\n]\nhostname = "h" # c\n[dns]\n'
                             'nameservers=["127.0.0.1"]\n[ "greylist" ]\ndelay = 3\n')
    assert lines == {"a": 1, "server": 2, "server.listen": 3, "server.hostname": 6, "dns": 7,
                     "dns.nameservers": 8, "greylist": 9, "greylist.delay": 10}


@pytest.mark.parametrize("key", [("access", "client_table"), ("helo", "access_table"),
                                 ("addresses", "sender_access_table")])
def test_a_table_without_type_is_an_error_naming_the_types(tmp_path: Path, key: tuple[str, str]) -> None:
    cidr = tmp_path / "postscreen_access.cidr"
    cidr.write_text("192.168.0.0/16 reject\n")
    with pytest.raises(ConfigError) as info:
        config.from_dict({key[0]: {key[1]: str(cidr)}})
    message = str(info.value)
    assert message.startswith(f"{key[0]}.{key[1]}: {cidr}: no table type: write type:{cidr}, e.g. cidr:{cidr}")
    assert "texthash" in message and "pcre" in message
