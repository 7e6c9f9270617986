"""Local Redis deployments for scale-out tests: a cluster, a Sentinel group, TLS with an ACL user.

Everything is real ``redis-server`` processes on free ports, started and
stopped by the tests (Debian's build: cluster mode, ``--sentinel`` and
``--tls-port`` need no extra package).
"""

from __future__ import annotations

import random
import socket
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

from tests.helpers import free_port
from tests.redis_server import REDIS_CLI, RedisServer

if TYPE_CHECKING:
    import trustme

__all__ = ["ClusterGroup", "SentinelGroup", "tls_acl_server"]


def cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too; Redis refuses
    cluster ports above 55535, so ephemeral ports will not do."""
    for _ in range(200):
        port = random.randrange(20000, 45000)
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port
    raise RuntimeError("no free cluster port")


def _wait(predicate: object, what: str, timeout: float = 20.0) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


class ClusterGroup:
    """``masters`` masters (and ``replicas`` replicas each) in one Redis Cluster."""

    def __init__(self, masters: int = 3, replicas: int = 0) -> None:
        self.nodes: list[RedisServer] = []
        for _ in range(masters * (1 + replicas)):
            port = cluster_port()
            self.nodes.append(
                RedisServer(
                    port=port,
                    extra=[
                        "--cluster-enabled", "yes",
                        "--cluster-config-file", f"nodes-{port}.conf",
                        "--cluster-node-timeout", "1000",
                        "--cluster-replica-validity-factor", "0",
                    ],
                    cli_args=["-c"],
                )
            )  # fmt: skip
        self.replicas = replicas

    @property
    def addrs(self) -> list[str]:
        return [node.addr for node in self.nodes]

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        assert REDIS_CLI is not None
        subprocess.run(
            [REDIS_CLI, "--cluster", "create", *self.addrs,
             "--cluster-replicas", str(self.replicas), "--cluster-yes"],
            capture_output=True, check=True, timeout=60,
        )  # fmt: skip
        _wait(self.ok, "cluster_state:ok on every node")

    def ok(self) -> bool:
        live = [n for n in self.nodes if n.proc is not None]
        return all("cluster_state:ok" in n.cli("CLUSTER", "INFO", check=False) for n in live)

    def node_of(self, key: str) -> RedisServer:
        """The master serving ``key``'s slot now."""
        slot = int(self.nodes[0].cli("CLUSTER", "KEYSLOT", key).strip())
        for line in self.nodes[0].cli("CLUSTER", "NODES").splitlines():
            fields = line.split()
            if "master" not in fields[2] or "fail" in fields[2]:
                continue
            for part in fields[8:]:
                lo, _, hi = part.partition("-")
                if lo.isdigit() and int(lo) <= slot <= int(hi or lo):
                    port = int(fields[1].split("@")[0].rpartition(":")[2])
                    return next(n for n in self.nodes if n.port == port)
        raise LookupError(key)

    def node_id(self, node: RedisServer) -> str:
        return node.cli("CLUSTER", "MYID").strip()

    def move_slot_of(self, key: str, to: RedisServer) -> None:
        """Migrate ``key``'s slot (with its keys) to ``to``, as redis-cli --cluster reshard does."""
        source = self.node_of(key)
        slot = source.cli("CLUSTER", "KEYSLOT", key).strip()
        src_id, dst_id = self.node_id(source), self.node_id(to)
        to.cli("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        source.cli("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        while keys := source.cli("CLUSTER", "GETKEYSINSLOT", slot, "100").split():
            source.cli("MIGRATE", "127.0.0.1", str(to.port), "", "0", "5000", "KEYS", *keys)
        for node in self.nodes:
            if node.proc is not None:
                node.cli("CLUSTER", "SETSLOT", slot, "NODE", dst_id, check=False)
        _wait(lambda: self.node_of(key) is to, "the slot move")

    def cleanup(self) -> None:
        for node in self.nodes:
            node.cleanup()


class SentinelGroup:
    """One master, one replica and three sentinels monitoring ``mymaster``;
    with ``password`` the data nodes require it, and with
    ``sentinel_password`` the sentinels require theirs (as managed
    deployments do)."""

    NAME = "mymaster"

    def __init__(self, *, password: str = "", sentinel_password: str = "") -> None:
        def auth(secret: str) -> list[str]:
            return ["-a", secret, "--no-auth-warning"] if secret else []

        data = ["--requirepass", password, "--masterauth", password] if password else []
        self.master = RedisServer(extra=data, cli_args=auth(password))
        self.replica = RedisServer(
            extra=[*data, "--replicaof", "127.0.0.1", str(self.master.port)],
            cli_args=auth(password),
        )
        self.sentinels: list[RedisServer] = []
        for _ in range(3):
            port = free_port()
            sentinel = RedisServer(port=port, cli_args=auth(sentinel_password))
            conf = Path(sentinel.dir) / "sentinel.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {sentinel.dir}\n"
                f"sentinel monitor {self.NAME} 127.0.0.1 {self.master.port} 2\n"
                f"sentinel down-after-milliseconds {self.NAME} 1000\n"
                f"sentinel failover-timeout {self.NAME} 5000\n"
                f"sentinel parallel-syncs {self.NAME} 1\n"
                + (f"sentinel auth-pass {self.NAME} {password}\n" if password else "")
                + (f"requirepass {sentinel_password}\n" if sentinel_password else "")
            )
            sentinel.command = [str(conf), "--sentinel"]
            self.sentinels.append(sentinel)

    @property
    def addrs(self) -> list[str]:
        return [s.addr for s in self.sentinels]

    def start(self) -> None:
        self.master.start()
        self.replica.start()
        _wait(
            lambda: "master_link_status:up" in self.replica.cli("INFO", "replication"),
            "the replica in sync",
        )
        for sentinel in self.sentinels:
            sentinel.start()
        _wait(
            lambda: all(
                "num-other-sentinels" in s.cli("SENTINEL", "MASTER", self.NAME, check=False)
                and self._others(s) >= 2
                for s in self.sentinels
            ),
            "sentinels that know each other",
        )

    def _others(self, sentinel: RedisServer) -> int:
        lines = sentinel.cli("SENTINEL", "MASTER", self.NAME, check=False).split()
        return int(lines[lines.index("num-other-sentinels") + 1])

    def primary_port(self) -> int:
        out = self.sentinels[0].cli("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.NAME).split()
        return int(out[1])

    def cleanup(self) -> None:
        for server in [*self.sentinels, self.replica, self.master]:
            server.cleanup()


def tls_acl_server(ca: trustme.CA, tmp: Path) -> RedisServer:
    """A redis-server on a TLS port only, whose default user is off: clients
    log in as ``plasma`` / ``s3cret`` and check the server against ``ca``."""
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file, ca_file = tmp / "redis.crt", tmp / "redis.key", tmp / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    ca.cert_pem.write_to_path(str(ca_file))
    port = free_port()
    return RedisServer(
        port=port,
        extra=[
            "--port", "0", "--tls-port", str(port),
            "--tls-cert-file", str(cert_file), "--tls-key-file", str(key_file),
            "--tls-ca-cert-file", str(ca_file), "--tls-auth-clients", "no",
            "--user", "default", "off",
            "--user", "plasma", "on", ">s3cret", "~*", "&*", "+@all",
        ],
        cli_args=["--tls", "--cacert", str(ca_file), "--user", "plasma", "--pass", "s3cret"],
    )  # fmt: skip
