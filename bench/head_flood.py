"""Slow-header flood memory: what connections stuck before their request head cost.

Starts ``plasma-trio serve`` (mock mode; TLS with a throwaway certificate
unless ``--plain``), then ``--floods`` times opens ``--count`` connections to
one port that never finish: half a TLS ClientHello (``--tls``), or plain half
an HTTP/1.1 head (main port) or half the HTTP/2 preface (gRPC port). It waits
until the header timeout has closed them all, and reports the server's RSS
over its idle RSS while they are open and after each flood, plus the drops
counted in ``plasma_connections_dropped_total``.

    python bench/head_flood.py --server .nox/tests/bin/plasma-trio --port grpc --floods 5

Needs ``trustme`` for the certificate (it is in the test extras).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from fanout import free_port, rss_kib, wait_port

HALF_HEAD = b"GET /?eventType=a HTTP/1.1\r\nHost: localhost\r\nAccept: text/event-stream\r\n"
HALF_PREFACE = b"PRI * HTTP/2.0\r\n"
HALF_CLIENT_HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"


def drops(metrics_port: int) -> dict[str, float]:
    """``plasma_connections_dropped_total`` samples that are not zero, by port and reason."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    found = {}
    for line in text.splitlines():
        if line.startswith("plasma_connections_dropped_total{"):
            labels, _, value = line.rpartition(" ")
            if float(value):
                found[labels.removeprefix("plasma_connections_dropped_total")] = float(value)
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--server", default="plasma-trio")
    ap.add_argument("--port", choices=["main", "grpc"], default="main")
    ap.add_argument("--plain", action="store_true", help="no TLS")
    ap.add_argument("--count", type=int, default=500, help="stuck connections per flood")
    ap.add_argument("--floods", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=2.0, help="PLASMA_HEADER_TIMEOUT, s")
    args = ap.parse_args()

    ports = {name: free_port() for name in ("main", "grpc", "metrics")}
    env = {
        **os.environ,
        "PLASMA_PORT": str(ports["main"]),
        "PLASMA_GRPC_PORT": str(ports["grpc"]),
        "PLASMA_METRICS_PORT": str(ports["metrics"]),
        "PLASMA_PPROF_PORT": "0",
        "PLASMA_HEADER_TIMEOUT": f"{args.timeout}s",
        "PLASMA_SUBSCRIBER_MOCK_INTERVAL": "1h",
        "PLASMA_ERROR_LOG_LEVEL": "error",
        "PLASMA_ACCESS_LOG_OUT": "discard",
    }
    if not args.plain:
        import trustme

        tmp = Path(tempfile.mkdtemp())
        cert = trustme.CA().issue_cert("localhost", "127.0.0.1")
        cert.private_key_and_cert_chain_pem.write_to_path(str(tmp / "cert.pem"))
        cert.private_key_pem.write_to_path(str(tmp / "key.pem"))
        env["PLASMA_TLS_CERT_FILE"] = str(tmp / "cert.pem")
        env["PLASMA_TLS_KEY_FILE"] = str(tmp / "key.pem")
    server = subprocess.Popen([args.server, "serve"], env=env)
    try:
        wait_port(ports["metrics"])
        time.sleep(1.0)
        idle = rss_kib(server.pid)
        if args.plain:
            first = HALF_HEAD if args.port == "main" else HALF_PREFACE
        else:
            first = HALF_CLIENT_HELLO
        while_open, after = [], []
        for _ in range(args.floods):
            socks = []
            for _ in range(args.count):
                sock = socket.create_connection(("127.0.0.1", ports[args.port]))
                sock.sendall(first)
                socks.append(sock)
            time.sleep(min(1.0, args.timeout / 2))
            while_open.append((rss_kib(server.pid) - idle) / 1024)
            time.sleep(args.timeout + 0.6)
            for sock in socks:
                sock.close()
            time.sleep(0.3)
            after.append((rss_kib(server.pid) - idle) / 1024)
        result = {
            "port": args.port,
            "tls": not args.plain,
            "count": args.count,
            "idle_rss_mib": round(idle / 1024, 1),
            "growth_while_open_mib": [round(v, 1) for v in while_open],
            "growth_after_flood_mib": [round(v, 1) for v in after],
            "first_flood_kib_per_connection": round(while_open[0] * 1024 / args.count, 1),
            "dropped": drops(ports["metrics"]),
        }
        print(json.dumps(result))
    finally:
        server.terminate()
        server.wait(timeout=20)


if __name__ == "__main__":
    main()
