"""Connection-storm benchmark: N SSE clients connecting at R per second (issue 22).

Starts ``plasma-trio serve`` (mock mode unless ``--env`` says otherwise)
pinned to one core (``--server-core``), waits until it is idle, then runs
``--generators`` copies of ``loadgen`` pinned to the other core, each opening
``--clients`` connections at ``--rate`` per second spread over ``--sources``
loopback addresses (127.0.0.1, 127.0.0.2, ...: one address's ephemeral ports
would run out past about 28,000). ``--head-delay`` sends each request head
that long after its TCP connect (a slow TLS handshake on a mobile link).
``--mode sse-tls`` (with a throwaway certificate) and ``--mode grpc`` (one
Events stream per connection, connected at its response headers) use
``storm_load`` (Go, built like ``grpc_load``), as does ``--client go``.

Reported per pass, one JSON line: the time until every client was connected
(a ``200`` and the SSE response head) or had failed, connect-time percentiles
(connect to response head, as the client saw it), the server's CPU over the
storm divided by the clients it served (CPU per connect), the failures by
kind (refused, timed out, closed before any response, ``503``), and the
server's own counts of what it dropped or refused
(``plasma_connections_dropped_total``, ``plasma_streams_refused_total``).
``/livez`` and ``/hc`` on the main port, and ``/metrics`` and ``/livez`` on
the metrics port, are asked every 0.2 s during the storm (``--probes``: their
own cost, about 1.5 ms each, is then in the server's CPU);
``probe_failures`` counts the ones that got no answer within 1 s.

    python bench/connect_storm.py --server X/bin/plasma-trio --clients 15000 --rate 10000
    python bench/connect_storm.py --server ... --clients 25000 --rate 5000 --generators 2
    python bench/connect_storm.py --server ... --clients 3000 --rate 20000 --head-delay 0.5

``--command`` replaces the server command (another server to compare, e.g.
``--command 'taskset -c 0 ./plasma'``; then ``--port`` names its port and the
probes and server counts are skipped).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from fanout import BIN, HERE, build_tools, cpu_seconds, free_port, rss_kib, wait_port


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def scrape(port: int) -> dict[str, float]:
    """The server's Prometheus text as {series: value} (the counters we report)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(("plasma_connections_dropped_total", "plasma_streams_refused_total")):
            name, _, value = line.rpartition(" ")
            if float(value):
                out[name] = float(value)
    return out


class Prober(threading.Thread):
    """Asks the probes every 0.2 s; counts the answers that did not come within 1 s."""

    def __init__(self, urls: list[str]) -> None:
        super().__init__(daemon=True)
        self.urls = urls
        self.asked = 0
        self.failed: dict[str, int] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.2):
            for url in self.urls:
                self.asked += 1
                try:
                    with urllib.request.urlopen(url, timeout=1) as response:
                        response.read()
                except Exception:
                    self.failed[url] = self.failed.get(url, 0) + 1


def tls_pair(directory: str) -> dict[str, str]:
    """A throwaway self-signed certificate for localhost (openssl)."""
    cert, key = f"{directory}/cert.pem", f"{directory}/key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", key, "-out", cert, "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return {"PLASMA_TLS_CERT_FILE": cert, "PLASMA_TLS_KEY_FILE": key}


def generator(args: argparse.Namespace, port: int, ready: Path) -> list[str]:
    """The load generator's command: the C loadgen (plain SSE), or storm_load (Go)."""
    common = ["taskset", "-c", args.load_core]
    if args.mode == "sse" and args.client == "loadgen":
        return [
            *common, str(BIN / "loadgen"),
            "-p", str(port), "-u", f"/?eventType={args.topic}",
            "-n", str(args.clients), "-r", str(args.rate),
            "-b", str(args.sources), "-w", str(args.head_delay),
            "-t", str(args.timeout), "-d", str(args.timeout + 60), "-f", str(ready),
        ]  # fmt: skip
    return [
        *common, str(BIN / "storm_load"), "-m", args.mode,
        "-p", str(port), "-t", args.topic, "-n", str(args.clients), "-r", str(args.rate),
        "-b", str(args.sources), "-timeout", str(args.timeout), "-f", str(ready),
    ]  # fmt: skip


def normalized(report: dict[str, Any]) -> dict[str, Any]:
    """loadgen's and storm_load's reports in one shape."""
    if report.get("tool") == "storm_load":
        return {
            "established": report["connected"],
            "connect_ms": {k: report["connect_ms"][k] for k in ("p50", "p90", "p99")},
            "connect_ms_mean": report["connect_ms"]["mean"],
            "failed": report["failed"],
        }
    return {
        "established": report["established"],
        "connect_ms": report["conn_setup_ms"],
        "connect_ms_mean": report["conn_setup_ms_mean"],
        "failed": {
            key: report[f"failed_{key}"]
            for key in ("refused", "timeout", "early_close", "503", "status")
            if report[f"failed_{key}"]
        },
    }


def one_pass(args: argparse.Namespace) -> dict[str, Any]:
    port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    certificates = tempfile.mkdtemp()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PLASMA_")},
        "PLASMA_PORT": str(port),
        "PLASMA_GRPC_PORT": str(grpc_port),
        "PLASMA_METRICS_PORT": str(metrics_port),
        "PLASMA_ERROR_LOG_LEVEL": "warn",
        **(tls_pair(certificates) if args.mode == "sse-tls" else {}),
        **dict(item.split("=", 1) for item in args.env),
    }
    if args.command:
        port = args.port
        command = shlex.split(args.command)
    else:
        command = ["taskset", "-c", args.server_core, args.server, "serve"]
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
    try:
        wait_port(port)
        time.sleep(args.settle)
        cpu0, fds0, rss0 = cpu_seconds(server.pid), fd_count(server.pid), rss_kib(server.pid)
        prober = None
        if args.probes and not args.command:
            prober = Prober(
                [
                    f"http://127.0.0.1:{port}/livez",
                    f"http://127.0.0.1:{port}/hc",
                    f"http://127.0.0.1:{metrics_port}/metrics",
                    f"http://127.0.0.1:{metrics_port}/livez",
                ]
            )
            prober.start()
        started = time.monotonic()
        with tempfile.TemporaryDirectory() as tmp:
            generators = []
            for i in range(args.generators):
                ready = Path(tmp) / f"ready{i}"
                generators.append(
                    (
                        ready,
                        subprocess.Popen(
                            generator(args, grpc_port if args.mode == "grpc" else port, ready),
                            stdout=subprocess.PIPE,
                            text=True,
                        ),
                    )
                )
            while not all(ready.exists() for ready, _ in generators):
                if any(g.poll() is not None for _, g in generators):
                    break
                time.sleep(0.01)
            all_s = time.monotonic() - started
            cpu = cpu_seconds(server.pid) - cpu0
            fds, rss = fd_count(server.pid), rss_kib(server.pid)
            reports = []
            for _, g in generators:
                g.send_signal(signal.SIGTERM)
                out, _ = g.communicate(timeout=30)
                reports.append(normalized(json.loads(out.strip().splitlines()[-1])))
        if prober is not None:
            prober.stop.set()
            prober.join()
        served = sum(r["established"] for r in reports)
        result: dict[str, Any] = {
            "clients": args.clients * args.generators,
            "rate": args.rate * args.generators,
            "head_delay_s": args.head_delay,
            "served": served,
            "all_connected_s": round(all_s, 3),
            "mode": args.mode,
            "client": "loadgen"
            if args.mode == "sse" and args.client == "loadgen"
            else "storm_load",
            "connect_ms": [r["connect_ms"] for r in reports],
            "connect_ms_mean": [round(r["connect_ms_mean"], 3) for r in reports],
            "server_cpu_s": round(cpu, 3),
            "server_cpu_us_per_connect": round(cpu / served * 1e6, 1) if served else None,
            "failed": {
                key: sum(r["failed"].get(key, 0) for r in reports)
                for key in sorted({k for r in reports for k in r["failed"]})
            },
            "server_fds": [fds0, fds],
            "server_rss_kib": [rss0, rss],
        }
        if prober is not None:
            result["probes_asked"] = prober.asked
            result["probe_failures"] = prober.failed
            result["server_counts"] = scrape(metrics_port)
        return result
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--server", default=".nox/tests/bin/plasma-trio")
    ap.add_argument("--command", help="another server's command (with --port)")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--env", action="append", default=[], help="NAME=VALUE for the server")
    ap.add_argument("--mode", choices=("sse", "sse-tls", "grpc"), default="sse")
    ap.add_argument("--client", choices=("loadgen", "go"), default="loadgen", help="for plain SSE")
    ap.add_argument("--clients", type=int, default=15000, help="per generator")
    ap.add_argument("--rate", type=float, default=10000, help="connects/s per generator")
    ap.add_argument("--generators", type=int, default=1)
    ap.add_argument("--sources", type=int, default=4, help="loopback source addresses")
    ap.add_argument("--head-delay", type=float, default=0.0)
    ap.add_argument("--timeout", type=float, default=30.0, help="per client, connect to head")
    ap.add_argument("--topic", default="storm")
    ap.add_argument("--passes", type=int, default=1)
    ap.add_argument(
        "--probes", action="store_true", help="ask the probes during the storm (costs server CPU)"
    )
    ap.add_argument("--settle", type=float, default=1.0)
    ap.add_argument("--server-core", default="0")
    ap.add_argument("--load-core", default="1")
    args = ap.parse_args()
    build_tools("sse")
    if args.mode != "sse" or args.client == "go":
        out = BIN / "storm_load"
        if not out.exists() or out.stat().st_mtime < (HERE / "storm_load.go").stat().st_mtime:
            # Needs: apt-get install -y golang-go golang-google-grpc-dev
            build = [str(HERE / "build_grpc_load.sh"), str(out), "storm_load.go"]
            subprocess.run(["sh", *build], check=True)
    for n in range(args.passes):
        for attempt in range(3):  # noqa: B007 (reported)
            try:
                result = one_pass(args)
                break
            except SystemExit as exc:  # (a port taken meanwhile: free_port races)
                print(f"pass {n + 1}: {exc}; again", file=sys.stderr, flush=True)
        else:
            raise SystemExit("the server did not start three times")
        print(json.dumps({"pass": n + 1, "attempts": attempt + 1, **result}), flush=True)


if __name__ == "__main__":
    main()
