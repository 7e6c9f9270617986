"""``serve --workers N`` (SPEC 9): real processes, real sockets, seen from outside."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import time
from contextlib import suppress
from typing import TYPE_CHECKING, Any

import grpc
import httpx
import pytest
import trio
from httpx_sse import aconnect_sse

from tests.grpc_clients import GrpcioStream, StreamEnded
from tests.helpers import PYTHON, free_port, free_port_pair, plasma_env, wait_for_figures
from tests.server_process import Server, start_server, stop_server

if TYPE_CHECKING:
    from pathlib import Path

    from tests.redis_server import RedisServer


def figures(server: Server) -> dict[str, Any]:
    url = f"http://127.0.0.1:{server.ports['metrics']}/metrics/plasma"
    result: dict[str, Any] = httpx.get(url, timeout=5).json()
    return result


def wait_for_workers(server: Server, count: int, timeout: float = 30) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers = figures(server)["workers"]
        if len(workers) == count:
            return list(workers)
        time.sleep(0.05)
    pytest.fail(f"{count} workers did not come up")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class Subscribers:
    """SSE and gRPC subscribers of one topic, opened until both workers have some."""

    def __init__(self, server: Server, topic: str) -> None:
        self.server = server
        self.topic = topic
        self.got: list[list[str]] = []
        self.grpc: list[GrpcioStream] = []

    async def sse(self, nursery: trio.Nursery, client: httpx.AsyncClient) -> None:
        got: list[str] = []
        self.got.append(got)

        async def read(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            url = f"{self.server.url}/?eventType={self.topic}"
            # A worker that dies takes its connections along: a reader ends then.
            with suppress(httpx.RemoteProtocolError, httpx.ReadError):
                async with aconnect_sse(client, "GET", url) as source:
                    task_status.started()
                    async for sse in source.aiter_sse():
                        if sse.data:
                            got.append(json.loads(sse.data)["data"])  # noqa: PERF401

        await nursery.start(read)

    async def grpc_stream(self, nursery: trio.Nursery) -> None:
        got: list[str] = []
        self.got.append(got)
        stream = GrpcioStream(self.server.ports["grpc"])
        self.grpc.append(stream)
        stream.send(self.topic)

        async def read() -> None:
            with suppress(StreamEnded, grpc.RpcError):
                while True:
                    got.append(json.loads((await stream.receive()).data))

        nursery.start_soon(read)

    def close(self) -> None:
        for stream in self.grpc:
            stream.close()


async def spread(
    subs: Subscribers, nursery: trio.Nursery, client: httpx.AsyncClient, at_least: int
) -> list[dict[str, Any]]:
    """Open subscribers (SSE, and a gRPC stream every fourth) until every
    worker holds some; SO_REUSEPORT decides where each lands."""
    n = 0
    while True:
        if n % 4 == 3:
            await subs.grpc_stream(nursery)
        else:
            await subs.sse(nursery, client)
        n += 1
        await trio.sleep(0.02)
        workers = await trio.to_thread.run_sync(figures, subs.server)
        if n >= at_least and all(w["connections"] > 0 for w in workers["workers"]):
            total = workers["connections"]
            if total == n:
                return list(workers["workers"])
        assert n < 200, "connections never reached both workers"


async def test_two_workers_share_the_ports_and_deliver_every_event_once(tmp_path: Path) -> None:
    """Connections land on both workers; events posted to whichever worker
    takes the POST reach every subscriber on every worker, once, in order;
    the supervisor's metrics sum the workers'."""
    pprof = free_port_pair()
    server = start_server(tmp_path, tls=False, PLASMA_WORKERS="2", PLASMA_PPROF_PORT=str(pprof))
    subs = Subscribers(server, "w")
    try:
        wait_for_workers(server, 2)
        with trio.fail_after(60):
            async with httpx.AsyncClient(timeout=10) as client, trio.open_nursery() as nursery:
                workers = await spread(subs, nursery, client, at_least=8)
                # Then an end marker: the supervisor passes events on in one
                # order, so what a subscriber has before it is all it gets.
                for n in [0, 1, 2, 3, 4, "end"]:
                    body = json.dumps({"meta": {"type": "w"}, "data": n})
                    response = await client.post(f"{server.url}/debug", content=body)
                    assert response.status_code == 200
                while not all(got and got[-1] == "end" for got in subs.got):
                    await trio.sleep(0.05)
                total = await trio.to_thread.run_sync(figures, server)
                nursery.cancel_scope.cancel()
        assert all(got == [0, 1, 2, 3, 4, "end"] for got in subs.got), subs.got
        assert len(workers) == 2
        assert {w["pid"] for w in workers} == {w["pid"] for w in total["workers"]}
        # Each worker's diagnostics port: PLASMA_PPROF_PORT plus its index.
        for port in (pprof, pprof + 1):
            dump = httpx.get(f"http://127.0.0.1:{port}/debug/pprof/goroutine", timeout=5)
            assert dump.status_code == 200
            assert "serve_frontdoor" in dump.text, dump.text[:500]
        assert total["connections"] == len(subs.got)
        assert total["events_delivered"] == 6 * len(subs.got)  # 5 events and the marker
        assert total["events_received"] == 12  # each worker published each event
        # Not amounts: the worst worker's lag and queue, not their sum.
        for key in ("delivery_lag_p99_s", "subscriber_queue_depth_max"):
            own = [w[key] for w in total["workers"] if w[key] is not None]
            assert total[key] == max(own, default=None), (key, total)
        prometheus = httpx.get(f"http://127.0.0.1:{server.ports['metrics']}/metrics").text
        assert "plasma_workers 2" in prometheus
        # The probes on the supervisor's metrics port (no listen backlog shared
        # with the subscribers): alive while a worker is, ready while all are.
        for probe in ("/livez", "/readyz"):
            answer = httpx.get(f"http://127.0.0.1:{server.ports['metrics']}{probe}", timeout=5)
            assert (answer.status_code, answer.text) == (200, "ok\n"), probe
        started = [
            float(line.split()[-1])
            for line in prometheus.splitlines()
            if line.startswith("process_start_time_seconds ")
        ]
        assert len(started) == 1
        assert time.time() - 120 < started[0] <= time.time(), started
        assert any(
            line.startswith("python_info{") and line.endswith(" 1")
            for line in prometheus.splitlines()
        ), prometheus
        assert (
            f'plasma_events_delivered_total{{transport="sse"}} {total["events_delivered_sse"]}'
            in prometheus
        )
        # Each worker's open-file budget: its limit, not the workers' sum.
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        limits = [
            float(line.split()[-1])
            for line in prometheus.splitlines()
            if line.startswith("plasma_descriptors_limit ")
        ]
        assert limits == [limit], limits
    finally:
        subs.close()
        stop_server(server)


async def test_a_killed_worker_is_replaced_and_sigterm_stops_all(tmp_path: Path) -> None:
    """SIGKILL one worker: its clients are cut (theirs alone), the other
    worker's keep streaming, and a new worker takes its place and serves new
    connections. SIGTERM to the supervisor then stops everything, streams
    open, within the shutdown timeout, with status 0, no process left."""
    server = start_server(tmp_path, tls=False, PLASMA_WORKERS="2", PLASMA_PPROF_PORT="0")
    subs = Subscribers(server, "k")
    fresh = Subscribers(server, "k")
    try:
        before = wait_for_workers(server, 2)
        with trio.fail_after(60):
            async with httpx.AsyncClient(timeout=10) as client, trio.open_nursery() as nursery:
                await spread(subs, nursery, client, at_least=4)
                victim = before[0]["pid"]
                os.kill(victim, signal.SIGKILL)
                replaced = await wait_for_figures(
                    server.ports["metrics"],
                    lambda f: (
                        len(f["workers"]) == 2 and victim not in {w["pid"] for w in f["workers"]}
                    ),
                    30,
                    "the killed worker replaced",
                )
                workers = replaced["workers"]
                survivors = next(w["connections"] for w in workers if w["pid"] == before[1]["pid"])
                body = json.dumps({"meta": {"type": "k"}, "data": "after"})
                assert (await client.post(f"{server.url}/debug", content=body)).status_code == 200
                while sum("after" in got for got in subs.got) < survivors:
                    await trio.sleep(0.05)
                # The replacement takes new connections and delivers to them.
                replacement = next(w["pid"] for w in workers if w["pid"] != before[1]["pid"])
                for _ in range(200):
                    await fresh.sse(nursery, client)
                    await trio.sleep(0.02)
                    now = (await trio.to_thread.run_sync(figures, server))["workers"]
                    if any(w["pid"] == replacement and w["connections"] for w in now):
                        break
                else:
                    pytest.fail("no new connection reached the replacement worker")
                body = json.dumps({"meta": {"type": "k"}, "data": "fresh"})
                assert (await client.post(f"{server.url}/debug", content=body)).status_code == 200
                while not all("fresh" in got for got in fresh.got):
                    await trio.sleep(0.05)
                # SIGTERM with streams still open on both workers: everything
                # stops within PLASMA_SHUTDOWN_TIMEOUT (5 s), status 0.
                pids = [w["pid"] for w in now]
                sent = time.monotonic()
                await trio.to_thread.run_sync(stop_server, server)
                stopped_in = time.monotonic() - sent
                nursery.cancel_scope.cancel()
        assert survivors > 0
        assert stopped_in < 5 + 2, stopped_in
        assert not any(alive(pid) for pid in pids)
    finally:
        subs.close()
        if server.proc.poll() is None:
            server.proc.kill()


async def test_workers_in_redis_mode_each_subscribe(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """In the redis mode every worker subscribes: a PUBLISH reaches every
    subscriber on both workers once."""
    server = start_server(
        tmp_path,
        tls=False,
        PLASMA_WORKERS="2",
        PLASMA_PPROF_PORT="0",
        PLASMA_SUBSCRIBER_TYPE="redis",
        PLASMA_SUBSCRIBER_REDIS_ADDR=redis_server.addr,
        PLASMA_SUBSCRIBER_REDIS_CHANNELS="plasma",
    )
    subs = Subscribers(server, "r")
    try:
        wait_for_workers(server, 2)
        with trio.fail_after(60):
            async with httpx.AsyncClient(timeout=10) as client, trio.open_nursery() as nursery:
                await spread(subs, nursery, client, at_least=4)
                receivers = await trio.to_thread.run_sync(
                    redis_server.publish, "plasma", json.dumps({"meta": {"type": "r"}, "data": 1})
                )
                # An end marker on the same channel: what comes before it is all.
                end = json.dumps({"meta": {"type": "r"}, "data": "end"})
                await trio.to_thread.run_sync(redis_server.publish, "plasma", end)
                while not all(got and got[-1] == "end" for got in subs.got):
                    await trio.sleep(0.05)
                nursery.cancel_scope.cancel()
        assert receivers == 2  # one subscription per worker
        assert all(got == [1, "end"] for got in subs.got), subs.got
    finally:
        subs.close()
        stop_server(server)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: no supervisor to see")
def test_zero_workers_means_one_per_core(tmp_path: Path) -> None:
    """PLASMA_WORKERS=0: as many workers as the machine has cores."""
    server = start_server(tmp_path, tls=False, PLASMA_WORKERS="0", PLASMA_PPROF_PORT="0")
    try:
        workers = wait_for_workers(server, os.cpu_count() or 1)
        assert len({w["pid"] for w in workers}) == os.cpu_count()
    finally:
        stop_server(server)


def test_workers_need_fixed_ports_and_a_free_port() -> None:
    """Port 0 cannot be shared; a port in use stops the supervisor with 2."""
    base = {
        "PLASMA_WORKERS": "2",
        "PLASMA_METRICS_PORT": str(free_port()),
        "PLASMA_PPROF_PORT": "0",
        "PLASMA_SHUTDOWN_TIMEOUT": "2s",
    }
    result = subprocess.run(
        [PYTHON, "-m", "plasma_trio", "serve"],
        env=plasma_env(**base, PLASMA_PORT="0"),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "PLASMA_WORKERS" in result.stderr

    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [PYTHON, "-m", "plasma_trio", "serve"],
            env=plasma_env(**base, PLASMA_PORT=str(port), PLASMA_GRPC_PORT=str(free_port())),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 2, result.stderr
    assert "PLASMA_PORT" in result.stderr


def test_summed_counters_never_go_backwards() -> None:
    """A worker that misses a scrape counts with its last figures; a restarted
    worker's counters start from 0 but what the old process counted stays;
    gauges are summed from the workers that answer."""
    from plasma_trio.workers_metrics import CounterMemory, sum_figures, sum_prometheus

    def text(delivered: int, connections: int) -> str:
        return (
            "# HELP plasma_events_delivered_total Events.\n"
            "# TYPE plasma_events_delivered_total counter\n"
            f'plasma_events_delivered_total{{transport="sse"}} {delivered}\n'
            "# HELP plasma_connections Open.\n# TYPE plasma_connections gauge\n"
            f'plasma_connections{{transport="sse"}} {connections}\n'
        )

    memory: CounterMemory[Any] = CounterMemory()
    first = sum_prometheus([(0, 100, text(10, 1)), (1, 200, text(5, 2))], 2, memory)
    assert 'plasma_events_delivered_total{transport="sse"} 15' in first
    assert "# TYPE plasma_events_delivered_total counter" in first
    assert 'plasma_connections{transport="sse"} 3' in first
    # Worker 1 misses a scrape; worker 0 restarted (new pid, counters from 0).
    second = sum_prometheus([(0, 101, text(2, 1))], 1, memory)
    assert 'plasma_events_delivered_total{transport="sse"} 17' in second  # 10 + 2 + 5
    assert 'plasma_connections{transport="sse"} 1' in second

    plasma: CounterMemory[str] = CounterMemory()
    a = sum_figures([(0, 1, {"events_delivered": 7, "connections": 2, "time": 5})], plasma)
    b = sum_figures([(0, 2, {"events_delivered": 1, "connections": 1, "time": 6})], plasma)
    assert (a["events_delivered"], a["connections"], a["time"]) == (7, 2, 5)
    assert (b["events_delivered"], b["connections"], b["time"]) == (8, 1, 6)


def test_figures_that_are_not_amounts_are_not_added() -> None:
    """Quantiles and maxima: the worst worker's; Redis connected only if every
    worker is; a process's start time the earliest; the cumulative lag
    histogram monotonic over a restart, the queue-depth snapshot summed."""
    from plasma_trio.workers_metrics import CounterMemory, sum_figures, sum_prometheus

    plasma: CounterMemory[str] = CounterMemory()
    one = {
        "delivery_lag_p99_s": 0.05,
        "delivery_lag_p50_s": None,
        "subscriber_queue_depth_max": 3,
        "subscriber_queue_depth_total": 3,
        "redis_connected": True,
        "delivery_lag_samples": 10,
        "last_event_id": "a",
    }
    two = {
        "delivery_lag_p99_s": 0.02,
        "delivery_lag_p50_s": 0.01,
        "subscriber_queue_depth_max": 7,
        "subscriber_queue_depth_total": 9,
        "redis_connected": False,
        "delivery_lag_samples": 5,
        "last_event_id": "b",
    }
    total = sum_figures([(0, 1, one), (1, 2, two)], plasma)
    assert total["delivery_lag_p99_s"] == 0.05
    assert total["delivery_lag_p50_s"] == 0.01
    assert total["subscriber_queue_depth_max"] == 7
    assert total["subscriber_queue_depth_total"] == 12
    assert total["redis_connected"] is False
    assert total["delivery_lag_samples"] == 15
    assert total["last_event_id"] == "a"
    # Worker 1 restarted: its samples start again from 0, the sum does not drop.
    again = sum_figures([(0, 1, one), (1, 3, {**two, "delivery_lag_samples": 1})], plasma)
    assert again["delivery_lag_samples"] == 16
    assert (
        sum_figures([(0, 1, {"redis_connected": None})], CounterMemory())["redis_connected"] is None
    )

    def text(lag_count: int, depth_count: int, started: float, connected: int) -> str:
        return (
            "# HELP plasma_delivery_lag_seconds Lag.\n"
            "# TYPE plasma_delivery_lag_seconds histogram\n"
            f'plasma_delivery_lag_seconds_bucket{{le="+Inf"}} {lag_count}\n'
            f"plasma_delivery_lag_seconds_count {lag_count}\n"
            f"plasma_delivery_lag_seconds_sum {lag_count / 100}\n"
            "# HELP plasma_subscriber_queue_depth Depth.\n"
            "# TYPE plasma_subscriber_queue_depth histogram\n"
            f'plasma_subscriber_queue_depth_bucket{{le="+Inf"}} {depth_count}\n'
            f"plasma_subscriber_queue_depth_count {depth_count}\n"
            f"plasma_subscriber_queue_depth_sum {depth_count}\n"
            "# HELP process_start_time_seconds Start.\n"
            "# TYPE process_start_time_seconds gauge\n"
            f"process_start_time_seconds {started}\n"
            "# HELP plasma_redis_connected Connected.\n"
            "# TYPE plasma_redis_connected gauge\n"
            f"plasma_redis_connected {connected}\n"
            "# HELP python_info Info.\n# TYPE python_info gauge\n"
            'python_info{version="3"} 1.0\n'
        )

    memory: CounterMemory[Any] = CounterMemory()
    first = sum_prometheus(
        [(0, 100, text(40, 2, 1000.0, 1)), (1, 200, text(60, 3, 900.0, 0))], 2, memory
    )
    assert 'plasma_delivery_lag_seconds_bucket{le="+Inf"} 100' in first
    assert "plasma_delivery_lag_seconds_count 100" in first
    assert "plasma_subscriber_queue_depth_count 5" in first
    assert "process_start_time_seconds 900" in first
    assert "plasma_redis_connected 0" in first
    assert 'python_info{version="3"} 1' in first
    # Worker 1 restarted (new pid): its lag counts start again, the sums hold;
    # the depth snapshot is what the queues hold now.
    second = sum_prometheus(
        [(0, 100, text(41, 0, 1000.0, 1)), (1, 201, text(1, 1, 1100.0, 1))], 2, memory
    )
    assert 'plasma_delivery_lag_seconds_bucket{le="+Inf"} 102' in second
    assert "plasma_delivery_lag_seconds_count 102" in second
    assert "plasma_subscriber_queue_depth_count 1" in second
    assert "process_start_time_seconds 1000" in second
    assert "plasma_redis_connected 1" in second
