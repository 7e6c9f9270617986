"""A real ``plasma-trio serve`` process for tests that watch it from outside
(its exit, its RSS, every line it logs)."""

from __future__ import annotations

import itertools
import json
import resource
import signal
import ssl
import subprocess
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import trustme

from tests.helpers import PYTHON, free_port, plasma_env

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

__all__ = ["Server", "start_server", "stop_server"]


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    ports: dict[str, int]
    tls_ports: frozenset[str]
    client_context: ssl.SSLContext | None
    ca: trustme.CA | None
    log_file: Path
    baseline_rss: int = 0
    topics: Iterator[int] = field(default_factory=itertools.count)

    @property
    def url(self) -> str:
        scheme = "https" if self.client_context else "http"
        return f"{scheme}://localhost:{self.ports['main']}"

    def rss(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")


def start_server(tmp: Path, *, tls: bool, nofile: int | None = None, **overrides: str) -> Server:
    """A real ``plasma-trio serve`` process on free ports (debug on, quiet mock);
    ``nofile``: its open-file limit, soft and hard."""
    ports = {name: free_port() for name in ("main", "grpc", "metrics", "pprof")}
    env = {
        "PLASMA_PORT": str(ports["main"]),
        "PLASMA_GRPC_PORT": str(ports["grpc"]),
        "PLASMA_METRICS_PORT": str(ports["metrics"]),
        "PLASMA_PPROF_PORT": str(ports["pprof"]),
        "PLASMA_PPROF_HOST": "127.0.0.1",
        "PLASMA_DEBUG": "true",
        "PLASMA_SUBSCRIBER_MOCK_INTERVAL": "1h",
        "PLASMA_ERROR_LOG_OUT": str(tmp / "error.log"),
        "PLASMA_ERROR_LOG_LEVEL": "debug",
        "PLASMA_ACCESS_LOG_OUT": str(tmp / "access.log"),
        "PLASMA_SHUTDOWN_TIMEOUT": "5s",
        **overrides,
    }
    ca = client_context = None
    if tls:
        ca = trustme.CA()
        cert = ca.issue_cert("localhost", "127.0.0.1")
        cert.private_key_and_cert_chain_pem.write_to_path(str(tmp / "cert.pem"))
        cert.private_key_pem.write_to_path(str(tmp / "key.pem"))
        env["PLASMA_TLS_CERT_FILE"] = str(tmp / "cert.pem")
        env["PLASMA_TLS_KEY_FILE"] = str(tmp / "key.pem")
        client_context = ssl.create_default_context()
        ca.configure_trust(client_context)

    def limit() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    proc = subprocess.Popen(
        [PYTHON, "-m", "plasma_trio", "serve"],
        env=plasma_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=limit if nofile is not None else None,
    )
    server = Server(
        proc=proc,
        ports=ports,
        tls_ports=frozenset({"main", "grpc"} if tls else ()),
        client_context=client_context,
        ca=ca,
        log_file=tmp / "error.log",
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            verify: Any = client_context or True
            if httpx.get(f"{server.url}/hc", verify=verify, timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"server did not start: {proc.communicate()}")


def stop_server(server: Server) -> list[dict[str, Any]]:
    """SIGTERM: the server must exit 0 promptly, and every line it wrote be
    JSON (returned, parsed: stdout, stderr, then the error log file)."""
    server.proc.send_signal(signal.SIGTERM)
    try:
        out, err = server.proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        out, err = server.proc.communicate()
        pytest.fail("server did not stop within 20 s of SIGTERM")
    lines = [*out.decode().splitlines(), *err.decode().splitlines()]
    if server.log_file.exists():
        lines += server.log_file.read_text().splitlines()
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))  # every line one JSON object
        except ValueError:
            pytest.fail(f"a line that is not JSON: {line!r}")
    assert server.proc.returncode == 0, lines[-20:]
    fatal = [
        r
        for r in parsed
        if r.get("level") == "CRITICAL" or str(r.get("msg", "")).startswith("fatal")
    ]
    assert not fatal, fatal
    return parsed
