"""Metrics port, reporters and diagnostics (SPEC 6) over real sockets."""

from __future__ import annotations

import json
import socket
import time
from contextlib import AsyncExitStack, aclosing

import httpx
import trio
from httpx_sse import aconnect_sse
from prometheus_client.parser import text_string_to_metric_families

from plasma_trio.core.events import Event
from plasma_trio.reporters import LDATE, LMICROSECONDS, LMSGPREFIX, LUTC, format_go_log
from tests.grpc_clients import GrpcioStream
from tests.h2_raw import RawH2, grpc_headers, grpc_request
from tests.helpers import running_server, wait_until
from tests.redis_server import RedisServer
from tests.streams import grpcio_subscribed, next_grpc_payload, next_sse_event, sse_subscribed


def metrics_url(srv: object, path: str) -> str:
    return f"http://127.0.0.1:{srv.metrics_port}{path}"  # type: ignore[attr-defined]


async def test_plasma_json_and_prometheus_agree_after_traffic() -> None:
    with trio.fail_after(30):
        async with (
            running_server(subscriber_buffer=2, debug=True) as srv,
            httpx.AsyncClient() as client,
        ):
            grpc_stream = GrpcioStream(srv.grpc_port)
            try:
                grpc_stream.send("m")
                async with AsyncExitStack() as stack:
                    source = await stack.enter_async_context(
                        aconnect_sse(client, "GET", f"http://127.0.0.1:{srv.port}/?eventType=m")
                    )
                    events = await stack.enter_async_context(aclosing(source.aiter_sse()))
                    await sse_subscribed(events)
                    await grpcio_subscribed(grpc_stream)
                    await srv.hub.publish(Event("m", b"1"))
                    assert json.loads((await next_sse_event(events)).data)["data"] == 1
                    assert (await next_grpc_payload(grpc_stream)).data == "1"
                    await client.post(f"http://127.0.0.1:{srv.port}/debug", content=b"garbage")

                    plasma = (await client.get(metrics_url(srv, "/metrics/plasma"))).json()
                    assert plasma["connections"] == 2
                    assert plasma["connections_sse"] == 1
                    assert plasma["connections_grpc"] == 1
                    assert plasma["events_received"] == 1
                    assert plasma["events_delivered"] == 2
                    assert plasma["events_invalid"] == 1
                    assert plasma["redis_connected"] is None
                    assert abs(plasma["time"] - time.time_ns()) < 10**10

                    resp = await client.get(metrics_url(srv, "/metrics"))
                    assert resp.headers["content-type"].startswith("text/plain; version=0.0.4")
                    families = {f.name: f for f in text_string_to_metric_families(resp.text)}
                    samples = {
                        (s.name, tuple(sorted(s.labels.items()))): s.value
                        for f in families.values()
                        for s in f.samples
                    }
                    assert samples[("plasma_connections", (("transport", "sse"),))] == 1
                    assert samples[("plasma_connections", (("transport", "grpc"),))] == 1
                    assert samples[("plasma_events_received_total", ())] == 1
                    assert samples[("plasma_events_delivered_total", (("transport", "grpc"),))] == 1
                    assert samples[("plasma_events_invalid_total", ())] == 1
                    assert (
                        samples[("plasma_subscribers_cut_off_total", (("transport", "sse"),))] == 0
                    )
                    assert "process_resident_memory_bytes" in families
                    assert "plasma_redis_connected" not in families  # no Redis in mock mode

                    om = await client.get(
                        metrics_url(srv, "/metrics"),
                        headers={"Accept": "application/openmetrics-text"},
                    )
                    assert om.headers["content-type"].startswith("application/openmetrics-text")
                    assert om.text.rstrip().endswith("# EOF")
            finally:
                grpc_stream.close()


async def test_a_cut_off_is_counted_in_both_formats() -> None:
    """A gRPC client that stops reading (1 KiB window, no WINDOW_UPDATE) with a
    buffer of 2: it is cut off, and both the JSON and Prometheus say so."""
    with trio.fail_after(30):
        async with (
            running_server(subscriber_buffer=2, debug=True) as srv,
            httpx.AsyncClient() as client,
        ):
            h2 = await RawH2.connect(srv.grpc_port)
            try:
                stream_id = await h2.request(
                    "/proto.StreamService/Events",
                    grpc_headers(f"localhost:{srv.grpc_port}"),
                    grpc_request("c"),
                )
                while not h2.answered(stream_id):  # subscribed
                    await h2.read_once()
                    assert not h2.closed
                body = json.dumps({"meta": {"type": "c"}, "data": "z" * 4096})
                for _ in range(6):
                    response = await client.post(f"http://127.0.0.1:{srv.port}/debug", content=body)
                    assert response.status_code == 200
                plasma = (await client.get(metrics_url(srv, "/metrics/plasma"))).json()
                assert plasma["subscribers_cut_off"] == plasma["subscribers_cut_off_grpc"] == 1
                assert plasma["events_dropped"] >= 1
                text = (await client.get(metrics_url(srv, "/metrics"))).text
                samples = {
                    (s.name, tuple(sorted(s.labels.items()))): s.value
                    for f in text_string_to_metric_families(text)
                    for s in f.samples
                }
                assert samples[("plasma_subscribers_cut_off_total", (("transport", "grpc"),))] == 1
                assert samples[("plasma_events_dropped_total", ())] == plasma["events_dropped"]
            finally:
                await h2.aclose()


async def test_python_runtime_figures() -> None:
    with trio.fail_after(20):
        async with running_server() as srv, httpx.AsyncClient() as client:
            figures = (await client.get(metrics_url(srv, "/metrics/python"))).json()
    for key in (
        "python_version",
        "os",
        "arch",
        "cpu_num",
        "threads",
        "gc_counts",
        "gc_pause_total_s",
    ):
        assert key in figures
    assert figures["trio_tasks"] > 5
    assert figures["memory_rss"] > 1_000_000
    assert figures["memory_max_rss"] >= figures["memory_rss"]
    assert len(figures["gc_collections"]) == 3


async def test_peak_rss_follows_a_spike() -> None:
    """The server runs in this process: 64 MiB touched and freed show in the
    peak, which never reads below the current RSS."""
    with trio.fail_after(20):
        async with running_server() as srv, httpx.AsyncClient() as client:
            url = metrics_url(srv, "/metrics/python")
            before = (await client.get(url)).json()
            spike = bytearray(64 << 20)
            for at in range(0, len(spike), 4096):
                spike[at] = 1
            during = (await client.get(url)).json()
            del spike
            after = (await client.get(url)).json()
    assert during["memory_rss"] >= before["memory_rss"] + (60 << 20)
    for figures in (before, during, after):
        assert figures["memory_max_rss"] >= figures["memory_rss"]
    assert after["memory_max_rss"] >= during["memory_rss"]


async def test_redis_connected_gauge(redis_server: RedisServer) -> None:
    settings = {
        "subscriber_type": "redis",
        "subscriber_redis_addr": redis_server.addr,
        "subscriber_redis_channels": ("c",),
        "subscriber_redis_timeout": 0.5,
        "subscriber_redis_retry_interval": 0.1,
        "subscriber_redis_over_max_retry_behavior": "alive",
    }
    with trio.fail_after(30):
        async with running_server(**settings) as srv, httpx.AsyncClient() as client:

            async def state() -> bool | None:
                return (await client.get(metrics_url(srv, "/metrics/plasma"))).json()[
                    "redis_connected"
                ]

            await wait_until(lambda: getattr(srv.source, "connected", False))
            assert await state() is True
            text = (await client.get(metrics_url(srv, "/metrics"))).text
            assert "plasma_redis_connected 1.0" in text
            redis_server.stop()
            await wait_until(lambda: not getattr(srv.source, "connected", True))
            assert await state() is False
            assert (
                "plasma_redis_connected 0.0"
                in (await client.get(metrics_url(srv, "/metrics"))).text
            )


async def test_diagnostics_dump_shows_the_task_tree() -> None:
    with trio.fail_after(20):
        async with running_server() as srv, httpx.AsyncClient() as client:
            for path in ("/", "/debug/pprof/", "/debug/pprof/goroutine"):
                resp = await client.get(f"http://127.0.0.1:{srv.pprof_port}{path}")
                assert resp.status_code == 200
                assert resp.text.split("\n", 1)[0].endswith("trio tasks")
                assert "plasma_trio.app.serve" in resp.text
                assert "app.py:" in resp.text  # stacks carry file:line


def test_go_log_format() -> None:
    now = 1_700_000_000.123456
    assert (
        format_go_log("m", prefix="metrics", flags=LMICROSECONDS | LUTC, now=now)
        == "metrics22:13:20.123456 m\n"
    )
    assert (
        format_go_log("m", prefix="p ", flags=LDATE | LMICROSECONDS | LUTC | LMSGPREFIX, now=now)
        == "2023/11/14 22:13:20.123456 p m\n"
    )
    assert format_go_log("m", prefix="x", flags=0, now=now) == "xm\n"


async def test_log_reporter_writes_figures(tmp_path: object) -> None:
    path = f"{tmp_path}/metrics.log"
    with trio.fail_after(20):
        async with running_server(
            metrics_type="log",
            metrics_log_out=path,
            metrics_log_interval=0.1,
            metrics_log_prefix="metrics ",
        ):
            await wait_until(lambda: _lines(path) >= 2)
    with open(path) as f:
        first = f.read().splitlines()[0]
    prefix, _, payload = first.partition("{")
    assert prefix.startswith("metrics ")
    figures = json.loads("{" + payload)
    assert figures["connections"] == 0
    assert "trio_tasks" in figures


def _lines(path: str) -> int:
    try:
        with open(path) as f:
            return len(f.read().splitlines())
    except FileNotFoundError:
        return 0


async def test_syslog_reporter_over_udp() -> None:
    receiver = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await receiver.bind(("127.0.0.1", 0))
    port = receiver.getsockname()[1]
    with trio.fail_after(20):
        async with running_server(
            metrics_type="syslog",
            metrics_syslog_network="udp",
            metrics_syslog_addr=f"127.0.0.1:{port}",
            metrics_syslog_interval=0.1,
            metrics_syslog_tag="plasma",
            metrics_syslog_facility=16,  # local0
            metrics_syslog_severity=6,  # info
        ):
            datagram = (await receiver.recv(65536)).decode()
    receiver.close()
    assert datagram.startswith(f"<{16 * 8 + 6}>plasma[")
    figures = json.loads(datagram[datagram.index("{") :])
    assert figures["connections"] == 0


def _listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as the kernel writes them) listening on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            next(rows)
            for row in rows:
                local, state = row.split()[1], row.split()[3]
                address, _, hex_port = local.partition(":")
                if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                    found.add(address)
    return found


async def test_diagnostics_port_listens_on_loopback_by_default() -> None:
    """The task dump exposes the server's internals: loopback only unless
    PLASMA_PPROF_HOST says otherwise (a deliberate difference from plasma)."""
    from plasma_trio.config import Config

    assert Config().pprof_host == "127.0.0.1"
    with trio.fail_after(20):
        async with running_server(pprof_host=Config().pprof_host) as srv:
            # 0100007F: 127.0.0.1 in the kernel's byte order; nothing on 0.0.0.0 or ::.
            assert _listening_addresses(srv.pprof_port) == {"0100007F"}
            assert _listening_addresses(srv.metrics_port) != {"0100007F"}
