"""Fan-out benchmark (SSE or gRPC): the load generator runs outside the server process.

The server is pinned to one core and the tools to the other. ``loadgen`` (C,
SSE) or ``grpc_load`` (Go, gRPC) holds N subscriptions of one topic;
``publish`` (C) POSTs events carrying a send timestamp at a fixed rate to
``/debug`` (or PUBLISHes them to Redis with ``--redis``); each step reports
deliveries/s seen by the subscribers, publish-to-receive latency percentiles
and the server's CPU per delivery (from /proc).

    python bench/fanout.py --subscribers 1000 --rates 10,20,50,100 --seconds 10
    python bench/fanout.py --transport grpc --subscribers 200 --rates 50,100,200 --seconds 10

Prints one JSON line per step and a Markdown table at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
NCHAN_PORT = 18280  # bench/nchan.conf's
BIN = HERE / "bin"


def build_tools(transport: str) -> None:
    BIN.mkdir(exist_ok=True)
    for name in ("loadgen", "publish"):
        src, out = HERE / f"{name}.c", BIN / name
        if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
            subprocess.run(["gcc", "-O2", "-o", str(out), str(src)], check=True)
    go = {"grpc": "grpc_load", "sse-tls": "sse_load", "sse-h2": "sse_load"}.get(transport)
    if go is not None:
        out = BIN / go
        if not out.exists() or out.stat().st_mtime < (HERE / f"{go}.go").stat().st_mtime:
            # Needs: apt-get install -y golang-go golang-google-grpc-dev
            subprocess.run(
                ["sh", str(HERE / "build_grpc_load.sh"), str(out), f"{go}.go"], check=True
            )


def certificate(directory: Path) -> dict[str, str]:
    """A throwaway self-signed certificate for localhost, as server settings."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
        ],
        check=True,
        capture_output=True,
    )
    return {"PLASMA_TLS_CERT_FILE": str(cert), "PLASMA_TLS_KEY_FILE": str(key)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants (a --workers supervisor and its workers)."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            with contextlib.suppress(OSError):
                todo.extend(int(c) for c in (task / "children").read_text().split())
    return pids


def cpu_seconds(pid: int) -> float:
    """CPU time of ``pid`` and its descendants (workers included)."""
    total = 0.0
    for p in tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def rss_kib(pid: int) -> int:
    """RSS of ``pid`` and its descendants."""
    return sum(_rss_one(p) for p in tree(pid))


def _rss_one(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"server did not listen on {port}")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--subscribers", type=int, default=1000)
    ap.add_argument("--rates", default="10,20,50,100", help="events/s, comma-separated")
    ap.add_argument("--seconds", type=float, default=10.0, help="per step")
    ap.add_argument("--pad", type=int, default=100, help="padding bytes per event")
    ap.add_argument("--server-core", default="1")
    ap.add_argument("--load-core", default="0")
    ap.add_argument("--server", default=shutil.which("plasma-trio") or "plasma-trio")
    ap.add_argument(
        "--transport",
        choices=["sse", "sse-tls", "sse-h2", "grpc"],
        default="sse",
        help="sse: plain HTTP/1.1 (loadgen); sse-tls, sse-h2: SSE over TLS, HTTP/1.1 or "
        "HTTP/2 (sse_load, Go; the server gets a throwaway certificate); grpc (grpc_load)",
    )
    ap.add_argument(
        "--per-connection",
        type=int,
        default=50,
        help="gRPC and sse-h2: streams per HTTP/2 connection",
    )
    ap.add_argument(
        "--buffer", type=int, default=0, help="PLASMA_SUBSCRIBER_BUFFER (default: the server's)"
    )
    ap.add_argument("--redis", metavar="HOST:PORT", help="redis mode: publish through this Redis")
    ap.add_argument(
        "--workers", type=int, default=1, help="PLASMA_WORKERS (a supervisor and N workers)"
    )
    ap.add_argument(
        "--auth",
        action="store_true",
        help="SSE: access control on (PLASMA_AUTH_JWT_KEY), each subscriber with a token",
    )
    ap.add_argument(
        "--streams",
        choices=["no", "yes", "both"],
        default="no",
        help="with --redis: redis-streams source (XADD to the stream 'bench'); "
        "both: a pub/sub pass then a streams pass, and their ratio",
    )
    ap.add_argument(
        "--quart", action="store_true", help="SSE through Quart/Hypercorn (fast path off)"
    )
    ap.add_argument(
        "--anchor",
        choices=["nchan"],
        help="SSE: run the same steps against nginx+nchan (bench/nchan.conf, publishing "
        "over HTTP to its /pub; needs apt-get install -y nginx-light libnginx-mod-nchan)",
    )
    ap.add_argument(
        "--compare",
        action="store_true",
        help="SSE: run the same steps on the fast path and on the Quart path, print the ratio",
    )
    args = ap.parse_args()
    build_tools(args.transport)
    if args.streams == "both":
        args.streams = "no"
        pubsub = run_pass(args)
        args.streams = "yes"
        streams = run_pass(args)
        print_table(pubsub + streams)
        print()
        print("| events/s | pub/sub deliveries/s | streams deliveries/s | streams/pub-sub |")
        print("|---|---|---|---|")
        for p, q in zip(pubsub, streams, strict=True):
            ratio = q["deliveries_per_s"] / p["deliveries_per_s"] if p["deliveries_per_s"] else 0
            print(
                f"| {p['rate']:g} | {p['deliveries_per_s']} | {q['deliveries_per_s']} "
                f"| {ratio:.2f} |"
            )
        return
    if not args.compare:
        print_table(run_pass(args))
        return
    args.quart = False
    fast = run_pass(args)
    args.quart = True
    quart = run_pass(args)
    print_table(fast + quart)
    print()
    print("| events/s | fast us/delivery | quart us/delivery | CPU ratio (quart/fast) |")
    print("|---|---|---|---|")
    for f, q in zip(fast, quart, strict=True):
        if f["server_us_per_delivery"] and q["server_us_per_delivery"]:
            ratio = q["server_us_per_delivery"] / f["server_us_per_delivery"]
            print(
                f"| {f['rate']:g} | {f['server_us_per_delivery']} | {q['server_us_per_delivery']} "
                f"| {ratio:.1f}x |"
            )


def run_pass(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Start a server, hold the subscribers, publish at each rate; one result per rate."""
    port, grpc_port = free_port(), free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PLASMA_")},
        "PLASMA_PORT": str(port),
        "PLASMA_GRPC_PORT": str(grpc_port),
        "PLASMA_DEBUG": "true",
        "PLASMA_SUBSCRIBER_MOCK_INTERVAL": "1h",
        "PLASMA_ACCESS_LOG_OUT": "discard",
        "PLASMA_ERROR_LOG_LEVEL": "warn",
        "PLASMA_SSE_FAST_PATH": "false" if args.quart else "true",
        "PLASMA_WORKERS": str(args.workers),
        "PLASMA_METRICS_PORT": str(free_port()),
        "PLASMA_PPROF_PORT": "0",
    }
    if args.transport in ("sse-tls", "sse-h2"):
        env.update(certificate(Path(tempfile.mkdtemp())))
    if args.buffer:
        env["PLASMA_SUBSCRIBER_BUFFER"] = str(args.buffer)  # else the server's default
    query = ""
    if args.auth:
        import jwt  # the server's dependency: run the driver with its venv's python

        secret = "bench-secret-bench-secret-bench-secret"
        env["PLASMA_AUTH_JWT_KEY"] = secret
        claims = {"sub": "bench", "exp": int(time.time()) + 3600, "plasma.subscribe": ["bench"]}
        query = "&token=" + jwt.encode(claims, secret, algorithm="HS256")
    if args.redis and args.streams == "yes":
        env.update(
            PLASMA_SUBSCRIBER_TYPE="redis-streams",
            PLASMA_SUBSCRIBER_REDIS_ADDR=args.redis,
            PLASMA_SUBSCRIBER_REDIS_STREAMS="bench",
        )
    elif args.redis:
        env.update(
            PLASMA_SUBSCRIBER_TYPE="redis",
            PLASMA_SUBSCRIBER_REDIS_ADDR=args.redis,
            PLASMA_SUBSCRIBER_REDIS_CHANNELS="bench",
        )
    if args.anchor == "nchan":
        # nginx + nchan, one worker pinned like the server (bench/nchan.conf).
        port = NCHAN_PORT
        Path("/tmp/nchan").mkdir(exist_ok=True)
        command = ["nginx", "-c", str(HERE / "nchan.conf")]
    else:
        command = [args.server, "serve"]
    server = subprocess.Popen(["taskset", "-c", args.server_core, *command], env=env)
    results: list[dict[str, Any]] = []
    try:
        wait_port(port)
        if args.workers != 1:
            time.sleep(3)  # every worker up (the first answers the port)
        rss_before = rss_kib(server.pid)
        ready = Path(tempfile.mkdtemp()) / "ready"
        cpu0 = cpu_seconds(server.pid)
        if args.transport in ("sse-tls", "sse-h2"):
            # SSE over TLS: HTTP/1.1 (a connection per stream) or HTTP/2
            # (--per-connection streams per connection), from Go's client.
            load_command = [
                str(BIN / "sse_load"),
                "-p",
                str(port),
                "-n",
                str(args.subscribers),
                "-c",
                str(args.per_connection),
                "-t",
                "bench",
                "-r",
                "2000",
                "-d",
                "100000",
                "-f",
                str(ready),
                *(["-h2"] if args.transport == "sse-h2" else []),
            ]
        elif args.transport == "grpc":
            # The gRPC load: N bidirectional streams on the gRPC port, one
            # Request each, --per-connection streams per HTTP/2 connection.
            load_command = [
                str(BIN / "grpc_load"),
                "-p",
                str(grpc_port),
                "-n",
                str(args.subscribers),
                "-c",
                str(args.per_connection),
                "-t",
                "bench",
                "-r",
                "2000",
                "-d",
                "100000",
                "-f",
                str(ready),
            ]
        else:
            load_command = [
                str(BIN / "loadgen"),
                "-p",
                str(port),
                "-u",
                "/?eventType=bench" + query,
                "-n",
                str(args.subscribers),
                "-r",
                "2000",
                "-d",
                "100000",
                "-f",
                str(ready),
            ]
        load = subprocess.Popen(
            ["taskset", "-c", args.load_core, *load_command],
            stdout=subprocess.PIPE,
            text=True,
        )
        while not ready.exists():
            time.sleep(0.1)
        time.sleep(1)
        connect_cpu = cpu_seconds(server.pid) - cpu0
        rss_after = rss_kib(server.pid)
        idle = {
            "subscribers": args.subscribers,
            "rss_per_connection_kib": round((rss_after - rss_before) / args.subscribers, 2),
            "connect_cpu_us_per_connection": round(connect_cpu / args.subscribers * 1e6, 1),
        }
        print(
            json.dumps({"step": "idle", "quart": args.quart, "auth": args.auth, **idle}), flush=True
        )
        assert load.stdout is not None
        if args.redis:
            host, _, redis_port = args.redis.rpartition(":")
            mode = "xadd" if args.streams == "yes" else "redis"
            publish_target = ["-m", mode, "-H", host, "-p", redis_port, "-c", "bench"]
        elif args.anchor == "nchan":
            publish_target = ["-m", "http", "-p", str(port), "-u", "/pub?eventType=bench"]
        else:
            publish_target = ["-m", "http", "-p", str(port), "-u", "/debug"]
        for rate in [float(r) for r in args.rates.split(",")]:
            load.send_signal(signal.SIGUSR1)  # reset the interval counters
            load.stdout.readline()
            c0, t0 = cpu_seconds(server.pid), time.monotonic()
            pub = subprocess.run(
                [
                    "taskset",
                    "-c",
                    args.load_core,
                    str(BIN / "publish"),
                    *publish_target,
                    "-t",
                    "bench",
                    "-r",
                    str(rate),
                    "-d",
                    str(args.seconds),
                    "-s",
                    str(args.pad),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            time.sleep(1.0)  # let the tail of the step arrive
            cpu, wall = cpu_seconds(server.pid) - c0, time.monotonic() - t0
            load.send_signal(signal.SIGUSR1)
            rep = json.loads(load.stdout.readline())
            published = json.loads(pub.stdout.strip().splitlines()[-1])
            delivered = rep["events_ts"]
            expected = int(published.get("sent", published.get("published", 0))) * args.subscribers
            step = {
                "step": "fanout",
                "transport": (f"{args.anchor}/" if args.anchor else "")
                + args.transport
                + (f"/{args.workers}w" if args.workers != 1 else "")
                + ("/auth" if args.auth else "")
                + ("/quart" if args.quart and args.transport == "sse" else "")
                + ("/streams" if args.redis and args.streams == "yes" else ""),
                "subscribers": args.subscribers,
                "rate": rate,
                "published_per_s": published["rate_actual"],
                "publish_max_lag_ms": published["max_lag_ms"],
                "deliveries_per_s": round(rep.get("events_per_s_span") or rep["events_per_s"]),
                "delivered": delivered,
                "expected": expected,
                "p50_ms": rep["lat_ms"]["p50"] if rep["lat_ms"] else None,
                "p99_ms": rep["lat_ms"]["p99"] if rep["lat_ms"] else None,
                "server_cpu_frac": round(cpu / wall, 3),
                "server_us_per_delivery": round(cpu / delivered * 1e6, 2) if delivered else None,
                "loadgen_cpu_frac": rep["loadgen_cpu_frac"],
                # gRPC: streams still open (the others were cut off or failed).
                "open": rep.get("open"),
            }
            results.append(step)
            print(json.dumps(step), flush=True)
        load.terminate()
        load.communicate(timeout=10)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    return results


def print_table(results: list[dict[str, Any]]) -> None:
    columns = [
        ("transport", "transport"),
        ("subscribers", "subscribers"),
        ("rate", "events/s"),
        ("deliveries_per_s", "deliveries/s"),
        ("delivered", "delivered"),
        ("expected", "expected"),
        ("p50_ms", "p50 ms"),
        ("p99_ms", "p99 ms"),
        ("server_cpu_frac", "server CPU"),
        ("server_us_per_delivery", "us/delivery"),
    ]
    if any(r.get("open") is not None for r in results):
        columns.append(("open", "streams open"))
    print("| " + " | ".join(title for _, title in columns) + " |")
    print("|" + "---|" * len(columns))
    for r in results:
        print("| " + " | ".join(str(r[key]) for key, _ in columns) + " |")


if __name__ == "__main__":
    sys.exit(main())
