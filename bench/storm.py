"""Reconnect-storm benchmark (redis-streams): N clients each resume M missed events at once.

The server (redis-streams source, pinned to one core) reads the stream
``storm``; M events are appended (``publish -m xadd``) after an anchor entry;
then ``loadgen`` opens N SSE connections at once, each with
``lastEventId=<anchor>`` (the query parameter EventSource polyfills send, same
path as the ``Last-Event-ID`` header), so each must be replayed the M events
it missed. Reported per pass: time until every client has every event
(N x M events counted by loadgen), the server's CPU over that time, its RSS
before and its peak RSS (VmHWM) after.

    python bench/storm.py --server .nox/tests/bin/plasma-trio --redis 127.0.0.1:6379 --passes 3
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from fanout import BIN, build_tools, cpu_seconds, free_port, rss_kib, wait_port


def vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def redis_cli(addr: str, *args: str) -> str:
    host, _, port = addr.rpartition(":")
    return subprocess.run(
        ["redis-cli", "-h", host, "-p", port, *args], capture_output=True, text=True, check=True
    ).stdout.strip()


def one_pass(args: argparse.Namespace) -> dict[str, Any]:
    redis_cli(args.redis, "DEL", "storm")
    port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PLASMA_")},
        "PLASMA_PORT": str(port),
        "PLASMA_GRPC_PORT": str(grpc_port),
        "PLASMA_METRICS_PORT": str(metrics_port),
        "PLASMA_ACCESS_LOG_OUT": args.access_log,
        "PLASMA_ERROR_LOG_LEVEL": "warn",
        "PLASMA_SUBSCRIBER_TYPE": "redis-streams",
        "PLASMA_SUBSCRIBER_REDIS_ADDR": args.redis,
        "PLASMA_SUBSCRIBER_REDIS_STREAMS": "storm",
        "PLASMA_HISTORY_SIZE": str(args.history if args.history is not None else args.missed),
    }
    server = subprocess.Popen(["taskset", "-c", args.server_core, args.server, "serve"], env=env)
    try:
        wait_port(port)
        anchor = redis_cli(args.redis, "XADD", "storm", "*", "event", '{"meta":{"type":"storm"}}')
        subprocess.run(
            [
                "taskset", "-c", args.load_core, str(BIN / "publish"),
                "-m", "xadd", "-H", args.redis.rpartition(":")[0],
                "-p", args.redis.rpartition(":")[2], "-c", "storm", "-t", "storm",
                "-r", str(args.missed * 10), "-d", "0.1", "-s", str(args.pad),
            ],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        last = redis_cli(args.redis, "XREVRANGE", "storm", "+", "-", "COUNT", "1").split()[0]
        assert int(redis_cli(args.redis, "XLEN", "storm")) == args.missed + 1
        metrics = f"http://127.0.0.1:{metrics_port}/metrics/plasma"
        while json.load(urllib.request.urlopen(metrics))["last_event_id"] != last:
            time.sleep(0.05)
        rss_before = rss_kib(server.pid)
        ready = Path(tempfile.mkdtemp()) / "ready"
        cpu0, t0 = cpu_seconds(server.pid), time.monotonic()
        load = subprocess.Popen(
            [
                "taskset", "-c", args.load_core, str(BIN / "loadgen"),
                "-p", str(port), "-u", f"/?eventType=storm&lastEventId={anchor}",
                "-n", str(args.clients), "-r", "1000000", "-d", "120", "-f", str(ready),
            ],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert load.stdout is not None
        want, got = args.clients * args.missed, 0
        report: dict[str, Any] = {}
        while got < want and time.monotonic() - t0 < args.timeout:
            time.sleep(0.05)
            load.send_signal(signal.SIGUSR1)
            report = json.loads(load.stdout.readline())
            got += report["events"]
        elapsed = time.monotonic() - t0
        cpu = cpu_seconds(server.pid) - cpu0
        figures = json.load(urllib.request.urlopen(metrics))
        load.terminate()
        load.wait()
        return {
            "clients": args.clients,
            "missed": args.missed,
            "events_expected": want,
            "events_received": got,
            "catch_up_s": round(elapsed, 2),
            "server_cpu_s": round(cpu, 2),
            "server_cpu_frac": round(cpu / elapsed, 2),
            "events_per_s": round(got / elapsed),
            "rss_before_mib": round(rss_before / 1024, 1),
            "peak_rss_mib": round(vm_hwm_kib(server.pid) / 1024, 1),
            "connections_sse": figures["connections_sse"],
            "cut_off": figures.get("cut_off_sse"),
            "established": report.get("established"),
            "failed": report.get("failed"),
            "open": report.get("open"),
        }
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--server", default="plasma-trio")
    ap.add_argument("--redis", default="127.0.0.1:6379")
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--missed", type=int, default=1000)
    ap.add_argument("--pad", type=int, default=100, help="padding bytes per event")
    ap.add_argument(
        "--history",
        type=int,
        default=None,
        help="PLASMA_HISTORY_SIZE (default: --missed, the replay from memory;"
        " below it, the clients are older than the window: replayed from Redis)",
    )
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--access-log", default="discard", help="PLASMA_ACCESS_LOG_OUT of the server")
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--server-core", default="1")
    ap.add_argument("--load-core", default="0")
    args = ap.parse_args()
    build_tools("sse")
    results = []
    for _ in range(args.passes):
        result = one_pass(args)
        print(json.dumps(result), flush=True)
        results.append(result)
    print()
    print("| pass | clients x missed | received | catch-up s | CPU s | CPU frac | peak RSS |")
    print("|---|---|---|---|---|---|---|")
    for n, r in enumerate(results, 1):
        print(
            f"| {n} | {r['clients']} x {r['missed']} | {r['events_received']} | {r['catch_up_s']} "
            f"| {r['server_cpu_s']} | {r['server_cpu_frac']} | {r['peak_rss_mib']} |"
        )


if __name__ == "__main__":
    main()
