"""A throwaway redis-server on a free port, which tests can stop and restart."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from tests.helpers import free_port

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")


class RedisServer:
    def __init__(
        self,
        *,
        aof: bool = False,
        extra: Sequence[str] = (),
        cli_args: Sequence[str] = (),
        port: int | None = None,
    ) -> None:
        if REDIS_SERVER is None or REDIS_CLI is None:
            pytest.fail(
                "redis-server/redis-cli not installed: "
                "run the tests through nox, or apt-get install redis-server"
            )
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="plasma-redis-")
        # More redis-server arguments (cluster, TLS, ACL users), and what
        # redis-cli then needs to talk to it (--tls --cacert, --user --pass).
        self.extra = list(extra)
        self.cli_args = list(cli_args)
        # Set to run something else than a plain server (a sentinel: [conf, "--sentinel"]).
        self.command: list[str] | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        # With aof, every write is fsynced to the append-only file: a restart
        # (even after SIGKILL) comes back with every acknowledged entry.
        self.aof = aof

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        assert self.proc is None
        assert REDIS_SERVER is not None
        self.proc = subprocess.Popen(
            [REDIS_SERVER, *self.command]
            if self.command
            else [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes" if self.aof else "no",
                "--appendfsync",
                "always",
                "--dir",
                self.dir,
                "--loglevel",
                "warning",
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.cli("PING", check=False).strip() == "PONG":
                return
            time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None

    def kill(self) -> None:
        """SIGKILL: no shutdown save, connections reset."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    def cli(self, *args: str, check: bool = True) -> str:
        assert REDIS_CLI is not None
        result = subprocess.run(
            [REDIS_CLI, "-h", "127.0.0.1", "-p", str(self.port), *self.cli_args, *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if check and result.returncode != 0:
            raise RuntimeError(result.stderr)
        return result.stdout

    def publish(self, channel: str, message: str) -> int:
        """PUBLISH with redis-cli (an independent client); returns the receiver count."""
        return int(self.cli("PUBLISH", channel, message).strip())

    def publish_burst(self, channel: str, messages: Sequence[str]) -> int:
        """PUBLISH every message in one pipeline (one write on one raw socket,
        so Redis hands them to its subscribers together); returns the summed
        receiver counts."""
        request = bytearray()
        for message in messages:
            parts = [b"PUBLISH", channel.encode(), message.encode()]
            request += b"*3\r\n" + b"".join(b"$%d\r\n%s\r\n" % (len(x), x) for x in parts)
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            sock.sendall(request)
            replies = b""
            while replies.count(b"\r\n") < len(messages):
                chunk = sock.recv(65536)
                assert chunk, "redis closed the connection"
                replies += chunk
        return sum(int(line[1:]) for line in replies.split(b"\r\n") if line.startswith(b":"))

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(Path(self.dir), ignore_errors=True)
