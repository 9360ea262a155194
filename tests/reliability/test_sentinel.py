"""Redis Sentinel: a real primary, a replica and three sentinels on
loopback; the primary is killed while mail flows.  Nothing acknowledged is
lost, and the greylist state the primary had replicated is there on the
promoted replica."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import pytest

from tests.integration.guard import Guard, RawClient
from tests.integration.ops import http_get
from tests.lab import PrivatePostfix, RedisSentinel, RedisServer, wait_until
from tests.reliability.figures import record

MakeGuard = Callable[..., Guard]
GREYLIST = ('[greylist]\nenabled = true\ndelay = "1s"\nuse_default_client_allowlist = false\n'
            'auto_allowlist_clients = 0\n')


class Cluster:
    def __init__(self) -> None:
        self.primary = RedisServer()
        self.primary.start()
        self.replica = RedisServer(extra=["--replicaof", "127.0.0.1", str(self.primary.port)])
        self.replica.start()
        wait_until(lambda: b"master_link_status:up" in (self.replica.command("INFO", "replication") or b""),
                   15, "the replica to sync")
        self.sentinels = [RedisSentinel(self.primary.port) for _ in range(3)]
        for s in self.sentinels:
            s.start()
        # Each sentinel must know the other two to authorise a failover.
        wait_until(lambda: all(_info(s).count(b"sentinels=3") for s in self.sentinels), 20, "sentinels to meet")

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/smtpguard?db=0"

    def cleanup(self) -> None:
        for part in (*self.sentinels, self.replica, self.primary):
            part.cleanup()


def _info(sentinel: RedisSentinel) -> bytes:
    import socket
    with socket.create_connection(("127.0.0.1", sentinel.port), timeout=5) as c:
        c.sendall(b"INFO sentinel\r\n")
        data = b""
        while b"master0:" not in data:
            chunk = c.recv(4096)
            if not chunk:
                break
            data += chunk
        return data


@pytest.fixture
def cluster(redis_server: RedisServer) -> Iterator[Cluster]:  # redis_server: the lab's redis check
    c = Cluster()
    try:
        yield c
    finally:
        c.cleanup()


def attempt(port: int, source: str, sender: str) -> str:
    """One delivery attempt; the RCPT reply (or the end-of-data reply when accepted)."""
    c = RawClient(port, source=source)
    c.reply()
    replies = c.transaction(sender=sender, subject=f"from {sender}")
    c.cmd("QUIT")
    c.close()
    return replies[-1] if replies[2].startswith("250") else replies[2]


def test_failover_under_mail_loses_nothing_replicated(backend: PrivatePostfix, cluster: Cluster,
                                                      make_guard: MakeGuard) -> None:
    g = make_guard(backend.port, GREYLIST, state_url=cluster.url, state_extra='breaker_backoff = "1s"\n')
    clients = [f"c{i}@sender.test" for i in range(10)]  # ten triplets
    for sender in clients:  # first attempts: greylisted, triplets written to the primary
        assert attempt(g.port, "127.0.5.1", sender).startswith("450 4.2.0"), sender
    assert cluster.primary.command("WAIT", "1", "5000") == 1  # replicated
    acknowledged = 0
    cluster.primary.proc.kill()  # type: ignore[union-attr]  # SIGKILL, mid-stream
    promoted = False
    for n in range(200):  # mail goes on during the failover: new clients, greylisted or accepted
        reply = attempt(g.port, "127.0.6.1", f"during{n}@sender.test")
        assert reply[:3] in ("250", "450", "451"), reply
        acknowledged += reply.startswith("250")
        promoted = promoted or all(s.primary() == cluster.replica.port for s in cluster.sentinels)
        if promoted and n >= 20:
            break
    assert promoted, "no failover"
    wait_until(lambda: http_get(g.metrics_port, "/readyz")[1].endswith("store ok\n"), 20, "the store back")
    g.mark()
    for sender in clients:  # the retries find their triplets on the promoted replica
        reply = attempt(g.port, "127.0.5.1", sender)
        assert reply.startswith("250 2.0.0 Ok: queued as"), (sender, reply)
        acknowledged += 1
    passed = re.findall(r"greylist: pass, reason=triplet passed, delayed \d+s, client=unknown\[127\.0\.5\.1\]",
                        g.log())
    assert len(passed) == len(clients), g.log()[-3000:]  # found as passed, not skipped nor new
    assert len(backend.wait_for_messages(acknowledged, timeout=60)) == acknowledged
    record("Redis Sentinel: primary SIGKILLed under mail", acknowledged=acknowledged,
           delivered=len(backend.messages()), lost=0, triplets_intact=f"{len(passed)}/{len(clients)}")
