"""The policy service on real sockets (inet and unix), in this process: the
answers Postfix gets, several requests per connection, bad input, timeouts,
and a fuzzer that throws random bytes, huge values, partial and pipelined
requests at it -- after each, the same connection or a new one must still
get a correct answer: no crash, no hang."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smtpguard.config import from_dict
from smtpguard.pipeline import Pipeline
from smtpguard.policy.server import PolicyServer
from smtpguard.policy.settings import Endpoint
from smtpguard.store.memory import MemoryStore
from tests.lab import free_port

GOOD = (b"request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address=192.0.2.7\nclient_name=unknown\n"
        b"sender=a@sender.example\nrecipient=postmaster@example.test\ninstance=1\n\n")
GREY = (b"request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address=192.0.2.9\nclient_name=unknown\n"
        b"sender=a@sender.example\nrecipient=bob@example.test\n\n")


class Running:
    """A PolicyServer on its own event loop thread."""

    def __init__(self, toml: dict[str, Any], sock_path: Path) -> None:
        self.port = free_port()
        self.path = str(sock_path)
        cfg = from_dict(toml)
        self.pipeline = Pipeline(cfg, MemoryStore(time.time))
        self.loop = asyncio.new_event_loop()
        self.server = PolicyServer(lambda: self.pipeline)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        eps = (Endpoint(inet=_hp(self.port)), Endpoint(path=self.path))
        asyncio.run_coroutine_threadsafe(self.server.start(eps), self.loop).result(10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def _hp(port: int) -> Any:
    from smtpguard.config import HostPort

    return HostPort("127.0.0.1", port)


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    toml = {"greylist": {"use_default_client_allowlist": False},
            "policy": {"timeout": "2s", "idle_timeout": "2s", "max_attribute_size": 1024,
                       "max_request_size": 8192}}
    r = Running(toml, tmp_path_factory.mktemp("policy") / "policy.sock")
    yield r
    r.stop()


def connect(svc: Running) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", svc.port), timeout=5)
    return s


def read_answer(s: socket.socket) -> bytes:
    buf = b""
    while not buf.endswith(b"\n\n"):
        chunk = s.recv(4096)
        if not chunk:
            raise ConnectionError(f"closed after {buf!r}")
        buf += chunk
    return buf


def read_answers(s: socket.socket, n: int) -> list[bytes]:
    buf = b""
    while buf.count(b"\n\n") < n:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {buf!r}")
        buf += chunk
    return [a + b"\n\n" for a in buf.split(b"\n\n")[:n]]


def test_answers_and_several_requests_per_connection(svc: Running) -> None:
    with connect(svc) as s:
        s.sendall(GOOD)
        assert read_answer(s) == b"action=DUNNO\n\n"
        s.sendall(GREY)
        assert read_answer(s).startswith(b"action=DEFER_IF_PERMIT 4.2.0 Greylisted, see ")
        s.sendall(GOOD * 50)  # pipelined: answered in order
        assert read_answers(s, 50) == [b"action=DUNNO\n\n"] * 50


def test_unix_socket(svc: Running) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(svc.path)
        s.sendall(GOOD)
        assert read_answer(s) == b"action=DUNNO\n\n"


@pytest.mark.parametrize("bad", [
    b"request=smtpd_access_policy\nno equals sign\n\n",
    b"sender=a@b\n\n",  # no request=
    b"request=something_else\n\n",
    b"request=smtpd_access_policy\nsender=" + b"x" * 5000 + b"\n\n",  # oversized attribute
    b"request=smtpd_access_policy\n" + b"a=" + b"y" * 1000 + b"\n" * 0 + b"\n" + b"b=1\n" * 3000 + b"\n",
])
def test_bad_requests_get_the_default_action_and_the_connection_goes_on(svc: Running, bad: bytes) -> None:
    with connect(svc) as s:
        s.sendall(bad)
        answers = read_answers(s, bad.count(b"\n\n"))
        assert set(answers) == {b"action=DUNNO\n\n"}
        s.sendall(GOOD)
        assert read_answer(s) == b"action=DUNNO\n\n"


def test_unknown_attribute_is_not_an_error(svc: Running) -> None:
    with connect(svc) as s:
        s.sendall(GREY.replace(b"192.0.2.9", b"192.0.2.10").replace(b"\n\n", b"\nfuture_attribute=1\n\n"))
        assert read_answer(s).startswith(b"action=DEFER_IF_PERMIT")


def test_silent_client_and_partial_request_are_closed(svc: Running) -> None:
    with connect(svc) as s:
        s.settimeout(10)
        assert s.recv(10) == b""  # idle_timeout (2s here) closes it
    with connect(svc) as s:
        s.settimeout(10)
        s.sendall(b"request=smtpd_access_policy\nsender=")
        assert s.recv(10) == b""  # timeout in the middle of a request


# ------------------------------------------------------------------ fuzzing

NAMES = st.sampled_from(["request", "protocol_state", "client_address", "sender", "recipient", "instance",
                         "client_name", "helo_name", "x", "BAD", ""])
VALUES = st.one_of(
    st.sampled_from([b"smtpd_access_policy", b"RCPT", b"192.0.2.1", b"::1", b"a@b.example", b"", b"unknown"]),
    st.binary(max_size=64), st.binary(min_size=1000, max_size=3000),
)
LINE = st.one_of(
    st.builds(lambda n, v: n.encode() + b"=" + v.replace(b"\n", b""), NAMES, VALUES),
    st.binary(max_size=80).map(lambda b: b.replace(b"\n", b"")),
)
REQUEST = st.lists(LINE, max_size=12).map(lambda lines: b"".join(x + b"\n" for x in lines) + b"\n")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(requests=st.lists(REQUEST, min_size=1, max_size=6), chunk=st.integers(min_value=1, max_value=4096),
       partial=st.binary(max_size=200).map(lambda b: b.replace(b"\n", b"")))
def test_fuzz_the_running_service(svc: Running, requests: list[bytes], chunk: int, partial: bytes) -> None:
    data = b"".join(requests)
    with connect(svc) as s:
        for i in range(0, len(data), chunk):  # in pieces of any size, pipelined
            s.sendall(data[i:i + chunk])
        answers = read_answers(s, len(requests))
        assert all(a.startswith(b"action=") and a.count(b"\n") == 2 for a in answers)
        s.sendall(partial)  # a partial line, then the connection is dropped
    with connect(svc) as s:  # the service is still there and right
        s.sendall(GOOD)
        assert read_answer(s) == b"action=DUNNO\n\n"


def test_binary_garbage_then_close(svc: Running) -> None:
    with connect(svc) as s:
        s.sendall(bytes(range(256)) * 40)
        s.shutdown(socket.SHUT_WR)
        s.settimeout(10)
        while s.recv(65536):
            pass
    with connect(svc) as s:
        s.sendall(GOOD)
        assert read_answer(s) == b"action=DUNNO\n\n"
