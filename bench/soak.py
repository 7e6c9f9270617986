"""Soak: a steady load with churn for a long time; RSS, descriptors and tasks must stay flat.

Starts ``plasma-trio serve`` on a Redis pub/sub source (``--redis``) pinned to
one core, then, on the other core:

* ``loadgen`` holds ``--held`` SSE subscribers of the topic ``soak`` for the
  whole run;
* the churner (this script, with trio) keeps ``--churned`` more subscribers
  open and every second closes ``--churn`` of them at random and opens as
  many new ones (some with ``Last-Event-ID``, so they are replayed what they
  missed), which is ``--churn`` / (held + churned) of the connections per
  second;
* ``publish`` sends ``--rate`` events/s to the channel (``--rate`` is chosen
  so that the server uses about half a core).

Every ``--every`` seconds one JSON line gives the server's RSS, open
descriptors, live trio tasks, open streams and CPU use since the last line;
at the end a summary compares the first and the last tenth of the run
(``rss_growth_kib``, ``fds_growth``, ``tasks_growth``) and the churner's
failures (connections not answered ``200``).

    python bench/soak.py --server .nox/tests/bin/plasma-trio --redis 127.0.0.1:6379 --minutes 30
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import time
import urllib.request
from typing import Any

import trio
from fanout import BIN, build_tools, cpu_seconds, free_port, rss_kib, wait_port


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(
            ("plasma_trio_tasks ", "plasma_connections{", "plasma_descriptors_open ")
        ):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


class Churner:
    def __init__(self, port: int, count: int, churn: int) -> None:
        self.port = port
        self.count = count
        self.churn = churn
        self.streams: list[trio.SocketStream] = []
        self.opened = 0
        self.failed = 0
        self.last_id = ""
        self.readers: trio.Nursery

    async def open_one(self) -> None:
        head = "GET /?eventType=soak HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n"
        if self.last_id and random.random() < 0.5:
            head += f"Last-Event-ID: {self.last_id}\r\n"
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", self.port)
            await stream.send_all((head + "\r\n").encode())
            received = b""
            with trio.fail_after(10):
                while b"\r\n\r\n" not in received:
                    data = await stream.receive_some(65536)
                    if not data:
                        raise EOFError
                    received += data
        except (OSError, EOFError, trio.TooSlowError, trio.BrokenResourceError):
            self.failed += 1
            return
        if b" 200 " not in received.split(b"\r\n", 1)[0]:
            self.failed += 1
            await stream.aclose()
            return
        for line in received.split(b"\n"):
            if line.startswith(b"id: "):
                self.last_id = line[4:].decode().strip()
        self.opened += 1
        self.streams.append(stream)
        self.readers.start_soon(self.read, stream)

    async def read(self, stream: trio.SocketStream) -> None:
        """Read what a stream gets (so that none stalls), keeping a recent id."""
        try:
            while data := await stream.receive_some(65536):
                at = data.rfind(b"id: ")
                if at >= 0:
                    self.last_id = data[at + 4 :].split(b"\n", 1)[0].decode().strip()
        except (trio.ClosedResourceError, trio.BrokenResourceError, OSError):
            pass

    async def run(self, seconds: float) -> None:
        async with trio.open_nursery() as nursery:
            self.readers = nursery
            async with trio.open_nursery() as openers:
                for _ in range(self.count):
                    openers.start_soon(self.open_one)
            end = trio.current_time() + seconds
            while trio.current_time() < end:
                tick = trio.current_time()
                random.shuffle(self.streams)
                closing, self.streams = self.streams[: self.churn], self.streams[self.churn :]
                for stream in closing:
                    await trio.aclose_forcefully(stream)
                async with trio.open_nursery() as openers:
                    for _ in range(len(closing)):
                        openers.start_soon(self.open_one)
                await trio.sleep_until(tick + 1.0)
            nursery.cancel_scope.cancel()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--server", default=".nox/tests/bin/plasma-trio")
    ap.add_argument("--redis", default="127.0.0.1:6379")
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--held", type=int, default=4000)
    ap.add_argument("--churned", type=int, default=1000)
    ap.add_argument("--churn", type=int, default=50, help="connections replaced per second")
    ap.add_argument("--rate", type=float, default=10, help="events/s")
    ap.add_argument("--every", type=float, default=30)
    ap.add_argument("--server-core", default="0")
    ap.add_argument("--load-core", default="1")
    args = ap.parse_args()
    build_tools("sse")
    os.sched_setaffinity(0, {int(args.load_core)})
    port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    host, _, redis_port = args.redis.rpartition(":")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PLASMA_")},
        "PLASMA_PORT": str(port),
        "PLASMA_GRPC_PORT": str(grpc_port),
        "PLASMA_METRICS_PORT": str(metrics_port),
        "PLASMA_ERROR_LOG_LEVEL": "warn",
        "PLASMA_ACCESS_LOG_OUT": "discard",
        "PLASMA_SUBSCRIBER_TYPE": "redis",
        "PLASMA_SUBSCRIBER_REDIS_ADDR": args.redis,
        "PLASMA_SUBSCRIBER_REDIS_CHANNELS": "soak",
    }
    seconds = args.minutes * 60
    server = subprocess.Popen(["taskset", "-c", args.server_core, args.server, "serve"], env=env)
    try:
        wait_port(port)
        held = subprocess.Popen(
            [
                str(BIN / "loadgen"),
                "-p",
                str(port),
                "-u",
                "/?eventType=soak",
                "-n",
                str(args.held),
                "-r",
                "2000",
                "-d",
                str(seconds + 120),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        time.sleep(args.held / 2000 + 2)
        publisher = subprocess.Popen(
            [
                str(BIN / "publish"),
                "-m",
                "redis",
                "-H",
                host,
                "-p",
                redis_port,
                "-c",
                "soak",
                "-t",
                "soak",
                "-r",
                str(args.rate),
                "-d",
                str(seconds + 60),
            ],
            stdout=subprocess.DEVNULL,
        )
        churner = Churner(port, args.churned, args.churn)
        samples: list[dict[str, Any]] = []
        start = time.monotonic()

        def sample(cpu_before: float, at: float) -> float:
            cpu = cpu_seconds(server.pid)
            row = {
                "t_s": round(time.monotonic() - start, 1),
                "rss_kib": rss_kib(server.pid),
                "fds": len(os.listdir(f"/proc/{server.pid}/fd")),
                **scrape(metrics_port),
                "cpu_frac": round((cpu - cpu_before) / max(1e-9, time.monotonic() - at), 3),
                "churned": churner.opened,
                "churn_failed": churner.failed,
            }
            samples.append(row)
            print(json.dumps(row), flush=True)
            return cpu

        async def sampler() -> None:
            cpu, at = cpu_seconds(server.pid), time.monotonic()
            while True:
                await trio.sleep(args.every)
                cpu = await trio.to_thread.run_sync(sample, cpu, at)
                at = time.monotonic()

        async def soak() -> None:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sampler)
                await churner.run(seconds)
                nursery.cancel_scope.cancel()

        trio.run(soak)
        publisher.terminate()
        held.send_signal(signal.SIGTERM)
        report = json.loads(held.communicate(timeout=30)[0].strip().splitlines()[-1])
        tenth = max(1, len(samples) // 10)
        first, last = samples[:tenth], samples[-tenth:]

        def mean(rows: list[dict[str, Any]], key: str) -> float:
            return sum(float(r.get(key, 0)) for r in rows) / len(rows)

        print(
            json.dumps(
                {
                    "summary": True,
                    "minutes": args.minutes,
                    "connections": args.held + args.churned,
                    "churn_per_s": args.churn,
                    "rate": args.rate,
                    "cpu_frac_mean": round(mean(samples, "cpu_frac"), 3),
                    "rss_growth_kib": round(mean(last, "rss_kib") - mean(first, "rss_kib")),
                    "fds_growth": round(mean(last, "fds") - mean(first, "fds"), 1),
                    "tasks_growth": round(
                        mean(last, "plasma_trio_tasks") - mean(first, "plasma_trio_tasks"), 1
                    ),
                    "churned": churner.opened,
                    "churn_failed": churner.failed,
                    "held_established": report["established"],
                    "held_disconnected": report["disconnected"],
                    "held_events": report["events"],
                }
            ),
            flush=True,
        )
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    main()
