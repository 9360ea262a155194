"""[tls] and [server] transport keys, the TLS context, /64 client keys."""

from __future__ import annotations

import ipaddress
import ssl
from pathlib import Path

import pytest
import trustme

from smtpguard import cli
from smtpguard.checks.limits import client_key
from smtpguard.config import ConfigError, from_dict
from smtpguard.net import client_network, parse_ip
from smtpguard.tls import TlsConfig, build_context, describe


@pytest.fixture(scope="module")
def pems(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pems")
    ca = trustme.CA()
    intermediate = ca.create_child_ca()
    leaf, other = intermediate.issue_cert("mx.guard.test"), ca.issue_cert("other.test")
    paths = {name: d / f"{name}.pem" for name in ("cert", "key", "chain", "other_key", "combined")}
    leaf.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    leaf.private_key_pem.write_to_path(str(paths["key"]))
    intermediate.cert_pem.write_to_path(str(paths["chain"]))
    other.private_key_pem.write_to_path(str(paths["other_key"]))
    paths["combined"].write_bytes(paths["cert"].read_bytes() + paths["key"].read_bytes())
    return paths


def tls(**kw: str) -> dict[str, dict[str, str]]:
    return {"tls": {k: str(v) for k, v in kw.items()}}


def test_context_defaults(pems: dict[str, Path]) -> None:
    ctx = build_context(TlsConfig(cert_file=str(pems["cert"]), key_file=str(pems["key"]),
                                  chain_file=str(pems["chain"])))
    assert ctx is not None and ctx.minimum_version is ssl.TLSVersion.TLSv1_2
    assert build_context(TlsConfig()) is None  # no certificate: STARTTLS not offered
    assert build_context(TlsConfig(security_level="none", cert_file="/nonexistent")) is None
    one_file = build_context(TlsConfig(cert_file=str(pems["combined"]), min_protocol="TLSv1.3"))
    assert one_file is not None and one_file.minimum_version is ssl.TLSVersion.TLSv1_3


def handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> ssl.SSLObject:
    """A TLS handshake over memory BIOs (no sockets); the server's side."""
    bios = [ssl.MemoryBIO() for _ in range(4)]
    srv = server.wrap_bio(bios[0], bios[1], server_side=True)
    cli = client.wrap_bio(bios[2], bios[3], server_hostname="mx.guard.test")
    done = {id(srv): False, id(cli): False}
    while not all(done.values()):
        for end, out, into in ((cli, bios[3], bios[0]), (srv, bios[1], bios[2])):
            if not done[id(end)]:
                try:
                    end.do_handshake()
                    done[id(end)] = True
                except ssl.SSLWantReadError:
                    pass
            into.write(out.read())
    return srv


def test_min_protocol_is_enforced(pems: dict[str, Path]) -> None:
    files = {"cert_file": str(pems["cert"]), "key_file": str(pems["key"]), "chain_file": str(pems["chain"])}
    client = ssl.create_default_context(cafile=None)
    client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    tls12 = build_context(TlsConfig(**files))
    assert tls12 is not None
    assert describe(handshake(tls12, client)).startswith("TLSv1.2 with cipher ECDHE-")
    tls13 = build_context(TlsConfig(min_protocol="TLSv1.3", **files))
    assert tls13 is not None
    with pytest.raises(ssl.SSLError, match="VERSION|PROTOCOL"):
        handshake(tls13, client)


@pytest.mark.parametrize(("kw", "error"), [
    ({"cert_file": "/nonexistent/cert.pem", "key_file": "key"},
     "tls.cert_file: /nonexistent/cert.pem: No such file or directory"),
    ({"cert_file": "cert", "key_file": "/nonexistent/key.pem"},
     "tls.key_file: /nonexistent/key.pem: No such file or directory"),
    ({"cert_file": "cert", "key_file": "other_key"},
     "tls.key_file: {other_key}: the private key does not match the certificate in {cert}"),
    ({"cert_file": "key", "key_file": "key"}, "tls.cert_file: {key}: no certificate found"),
    ({"cert_file": "cert", "key_file": "cert"}, "tls.key_file: {cert}: no private key found"),
    ({"cert_file": "cert"}, "tls.cert_file: {cert}: no private key found"),
    ({"key_file": "key"}, "tls.cert_file: key_file/chain_file given without cert_file"),
    ({"security_level": "encrypt"}, "tls.cert_file: security_level = encrypt needs a certificate"),
    ({"security_level": "always"}, "tls.security_level: expected one of none, may, encrypt, got 'always'"),
])
def test_config_errors_name_the_key(pems: dict[str, Path], kw: dict[str, str], error: str) -> None:
    values = {k: str(pems.get(v, v)) for k, v in kw.items()}
    with pytest.raises(ConfigError) as exc:
        from_dict(tls(**values))
    assert str(exc.value) == error.format(**{k: str(v) for k, v in pems.items()})


def test_check_config_names_the_key(tmp_path: Path, pems: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "smtpguard.toml"
    path.write_text(f'[tls]\ncert_file = "{pems["cert"]}"\nkey_file = "{pems["other_key"]}"\n')
    assert cli.main(["check-config", "-c", str(path)]) == 1
    assert capsys.readouterr().err.startswith(f"{path}:3: tls.key_file: {pems['other_key']}: ")
    path.write_text(f'[tls]\ncert_file = "{pems["cert"]}"\nkey_file = "{pems["key"]}"\n'
                    '[server]\nproxy_protocol = true\n')
    assert cli.main(["check-config", "-c", str(path)]) == 0
    assert "STARTTLS may; PROXY protocol" in capsys.readouterr().out


def test_proxy_keys() -> None:
    cfg = from_dict({"server": {"proxy_protocol": True, "proxy_trusted": ["10.0.0.0/8", "[2001:db8::1]"],
                                "proxy_timeout": "3s"}})
    assert cfg.server.proxy_trusted == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::1/128"))
    assert cfg.server.proxy_timeout == 3.0
    with pytest.raises(ConfigError, match=r'^server\.proxy_trusted: entry 2: expected a network like'):
        from_dict({"server": {"proxy_trusted": ["10.0.0.0/8", "lb.example"]}})


@pytest.mark.parametrize(("ip", "key"), [
    ("192.0.2.77", "192.0.2.77"),
    ("::ffff:192.0.2.77", "192.0.2.77"),
    ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::"),
    ("2001:db8:1:2:ffff::1", "2001:db8:1:2::"),
    ("::1", "::"),
])
def test_connection_limits_count_ipv6_by_64(ip: str, key: str) -> None:
    assert client_key(parse_ip(ip)) == key


def test_greylist_keys_ipv6_by_64() -> None:
    a, b = ipaddress.ip_address("2001:db8:1:2::a"), ipaddress.ip_address("2001:db8:1:2:ffff::b")
    assert client_network(a, 24, 64) == client_network(b, 24, 64) == "2001:db8:1:2::"
