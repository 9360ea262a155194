"""smtpguard.handoff against a real UNIX socket standing in for Postfix's
pass service: what goes over the channel, and the config's errors."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from smtpguard import handoff
from smtpguard.config import ConfigError, from_dict


def test_attributes_are_postfix_attr_print0() -> None:
    assert handoff.attributes(("192.0.2.7", 40123), ("2001:db8::25", 25)) == (
        b"client_address\x00192.0.2.7\x00client_port\x0040123\x00"
        b"server_address\x002001:db8::25\x00server_port\x0025\x00\x00"
    )


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r'^handoff\.socket: expected an absolute path .*, got "private/smtpd"'):
        from_dict({"handoff": {"socket": "private/smtpd"}})
    with pytest.raises(ConfigError, match=r"^handoff\.socket: a UNIX socket path must be shorter than 108"):
        from_dict({"handoff": {"socket": "/" + "x" * 120}})
    assert from_dict({}).handoff.socket == ""


def receive(server: socket.socket) -> tuple[socket.socket, bytes, socket.socket]:
    """What smtpd's pass_accept_attr does: a one-byte read with the
    descriptor, then the attribute list from the same stream."""
    conn, _ = server.accept()
    first, fds, _, _ = socket.recv_fds(conn, 1, 1)
    assert first == b"\0" and len(fds) == 1
    rest = b""
    while not rest.endswith(b"\0\0"):
        rest += conn.recv(4096)
    return socket.socket(fileno=fds[0]), rest, conn


def test_send_passes_the_socket_and_the_endpoints(tmp_path: Path) -> None:
    path = str(tmp_path / "pass")
    with socket.socket(socket.AF_UNIX) as server, socket.socket() as listener:
        server.bind(path)
        server.listen()
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        client = socket.create_connection(listener.getsockname())
        ours, _ = listener.accept()
        # Sent and closed before the receiver even accepted: it all stays queued for it.
        handoff.send(path, ours.fileno(), ("127.0.0.1", 40000), ("127.0.0.1", 25))
        passed, attrs, conn = receive(server)
        assert conn.recv(1) == b""  # then end-of-file, as smtpd sees it
        ours.close()  # smtpguard's copy goes; the connection stays, with the receiver
        passed.sendall(b"220 from the receiver\r\n")
        assert client.recv(100) == b"220 from the receiver\r\n"
        assert attrs == handoff.attributes(("127.0.0.1", 40000), ("127.0.0.1", 25))
        for s in (passed, conn, client):
            s.close()


def test_send_fails_without_passing_anything(tmp_path: Path) -> None:
    full = str(tmp_path / "full")
    with socket.socket(socket.AF_UNIX) as server, socket.socket() as some:
        with pytest.raises(FileNotFoundError):
            handoff.send(str(tmp_path / "missing"), some.fileno(), ("192.0.2.7", 1), ("192.0.2.1", 25))
        server.bind(full)
        server.listen(0)
        with pytest.raises(BlockingIOError):  # a full backlog: postscreen's "all server ports are busy"
            for _ in range(64):
                handoff.send(full, some.fileno(), ("192.0.2.7", 1), ("192.0.2.1", 25))


def test_unknown_pass_service_is_not_trusted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """postconf (the real one) on a directory with no Postfix configuration:
    nothing is known, so no client is handed off, and the warning says what to add."""
    cfg = from_dict({"handoff": {"socket": "/var/spool/postfix/public/smtpguard",
                                 "postfix_config_directory": str(tmp_path)}}).handoff
    found = handoff.check_pass_service(cfg)
    assert not found.safe
    assert not handoff.handoff_allowed(cfg)
    assert '"  -o smtpd_forbid_bare_newline=normalize" under the "smtpguard pass ... smtpd" line' in caplog.text
    trusting = from_dict({"handoff": {"socket": "/run/x", "require_forbid_bare_newline": False}}).handoff
    assert handoff.handoff_allowed(trusting)
    assert not handoff.handoff_allowed(from_dict({}).handoff)  # no socket
