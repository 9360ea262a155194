"""smtpguard.handoff against a real UNIX socket standing in for Postfix's
pass service: what goes over the channel, and the config's errors."""

from __future__ import annotations

import asyncio
import logging
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
    with pytest.raises(ConfigError, match=r"^handoff\.timeout: expected a duration"):
        from_dict({"handoff": {"timeout": "soon"}})
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
        channel = handoff.send(path, ours.fileno(), ("127.0.0.1", 40000), ("127.0.0.1", 25))
        passed, attrs, conn = receive(server)
        ours.close()  # smtpguard's copy goes; the connection stays, with the receiver
        passed.sendall(b"220 from the receiver\r\n")
        assert client.recv(100) == b"220 from the receiver\r\n"
        assert attrs == handoff.attributes(("127.0.0.1", 40000), ("127.0.0.1", 25))
        for s in (passed, conn, channel, client):
            s.close()


def test_send_fails_without_passing_anything(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        handoff.send(str(tmp_path / "missing"), 0, ("192.0.2.7", 1), ("192.0.2.1", 25))
    full = str(tmp_path / "full")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(full)
        server.listen(0)
        waiting = []
        with pytest.raises(BlockingIOError):  # a full backlog: postscreen's "all server ports are busy"
            for _ in range(64):
                waiting.append(handoff.send(full, 0, ("192.0.2.7", 1), ("192.0.2.1", 25)))
        for s in waiting:
            s.close()


async def test_release_closes_when_the_receiver_does_or_warns_after_the_timeout(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="smtpguard")
    ours, theirs = socket.socketpair()
    handoff.release(ours, "/pass", timeout=60)
    theirs.close()  # smtpd has taken the descriptor
    for _ in range(3):
        await asyncio.sleep(0)  # one loop turn for the reader callback
    assert ours.fileno() == -1 and "timeout" not in caplog.text

    ours, theirs = socket.socketpair()
    handoff.release(ours, "/pass", timeout=0)  # due at once: no waiting for time to pass
    for _ in range(3):
        await asyncio.sleep(0)
    assert ours.fileno() == -1
    assert "timeout sending connection to service /pass" in caplog.text
    theirs.close()

