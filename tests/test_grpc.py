"""The gRPC stream (SPEC 3, 8) with independent clients: grpcio (C core) and grpclib."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing, contextmanager
from pathlib import Path

import grpc
import httpx
import trio
from httpx_sse import aconnect_sse

from plasma_trio.app import Running
from plasma_trio.core.events import Event
from plasma_trio.tasks import live_task_count
from tests.grpc_clients import GrpcioStream
from tests.helpers import (
    base_url,
    figures_of,
    running_server,
    wait_for_figure,
    wait_for_task_baseline,
    wait_until,
)
from tests.streams import grpcio_subscribed, next_grpc_payload, next_sse_event, sse_subscribed


async def grpc_connections_are(running: Running, count: int, timeout: float = 10) -> None:
    """Until /metrics/plasma counts ``count`` open gRPC streams."""
    await wait_for_figure(running, "connections_grpc", count, timeout)


def subscribed(running: Running, topic: str) -> bool:
    """In the hub: for a Request that replaces one topic with another, which
    /metrics/plasma's ``topics`` (a count) cannot tell apart."""
    return bool(running.hub.subscribers_of(topic))


@contextmanager
def grpcio_stream(running: Running) -> Iterator[GrpcioStream]:
    stream = GrpcioStream(running.grpc_port)
    try:
        yield stream
    finally:
        stream.close()


async def test_nothing_before_first_request_then_exact_data(server: Running) -> None:
    with trio.fail_after(20), grpcio_stream(server) as stream:
        await grpc_connections_are(server, 1)
        await server.hub.publish(Event("program:1:views", b'"before"'))
        stream.send("program:1", "program")  # overlapping topics: delivered once
        await grpcio_subscribed(stream)
        await server.hub.publish(Event("program:1:views", b'{"a": 1,  "b":[ "x" ]}'))
        await server.hub.publish(Event("program:1", b'"x"'))
        await server.hub.publish(Event("program:1"))
        got = [await next_grpc_payload(stream) for _ in range(3)]
    assert [p.eventType.type for p in got] == ["program:1:views", "program:1", "program:1"]
    # Payload.data is the JSON text exactly as published.
    assert [p.data for p in got] == ['{"a": 1,  "b":[ "x" ]}', '"x"', ""]
    assert [p.id for p in got] == [f"{server.hub.epoch}-{n}" for n in (2, 3, 4)]


async def test_requests_replace_the_set_and_empty_keeps_the_stream(server: Running) -> None:
    with trio.fail_after(20), grpcio_stream(server) as stream:
        stream.send("a")
        await grpcio_subscribed(stream)
        await server.hub.publish(Event("a", b"1"))
        assert (await next_grpc_payload(stream)).data == "1"
        stream.send("b")
        await wait_until(lambda: subscribed(server, "b") and not subscribed(server, "a"))
        await server.hub.publish(Event("a", b"2"))
        await server.hub.publish(Event("b:x", b"3"))
        assert (await next_grpc_payload(stream)).data == "3"
        stream.send()  # empty: unsubscribed, stream stays open
        await wait_for_figure(server, "topics", 0)  # "b" has no subscriber left
        await server.hub.publish(Event("b", b"4"))
        assert (await figures_of(server))["connections_grpc"] == 1
        stream.send("b")
        await wait_for_figure(server, "topics", 1)
        await server.hub.publish(Event("b", b"5"))
        assert (await next_grpc_payload(stream)).data == "5"
        stream.send(force_close=True)
        rest, code = await stream.rest()
    assert rest == []
    assert code == grpc.StatusCode.OK
    await grpc_connections_are(server, 0)


async def test_sse_and_grpc_receive_the_same_event(server: Running) -> None:
    with trio.fail_after(20), grpcio_stream(server) as stream:
        stream.send("shared")
        async with (
            httpx.AsyncClient(base_url=base_url(server)) as client,
            aconnect_sse(client, "GET", "/?eventType=shared") as source,
        ):
            async with aclosing(source.aiter_sse()) as events:
                await sse_subscribed(events)
                await grpcio_subscribed(stream)
                await server.hub.publish(Event("shared:1", b'{"v":1}'))
                payload = await next_grpc_payload(stream)
                sse = await next_sse_event(events)
    assert json.loads(payload.data) == json.loads(sse.data)["data"] == {"v": 1}
    assert payload.id == sse.id


async def test_replay_with_last_event_id(server: Running) -> None:
    hub = server.hub
    for n in range(5):
        await hub.publish(Event("r", str(n).encode()))
    with trio.fail_after(20), grpcio_stream(server) as stream:
        stream.send("r", last_event_id=f"{hub.epoch}-2")
        got = [(await next_grpc_payload(stream)).data for _ in range(3)]
        assert got == ["2", "3", "4"]
        await hub.publish(Event("r", b"5"))
        assert (await next_grpc_payload(stream)).data == "5"


async def test_limits_and_unavailable() -> None:
    with trio.fail_after(20):
        async with running_server(max_connections=1, max_topics=2) as srv:
            with grpcio_stream(srv) as first:
                first.send("a", "b", "c")
                _, code = await first.rest()
                assert code == grpc.StatusCode.INVALID_ARGUMENT
            await grpc_connections_are(srv, 0)
            with grpcio_stream(srv) as first:
                first.send("a")
                await grpcio_subscribed(first)
                with grpcio_stream(srv) as second:
                    second.send("a")
                    _, code = await second.rest()
                    assert code == grpc.StatusCode.UNAVAILABLE


async def test_no_topic_limit_admits_ten_thousand_topics() -> None:
    """PLASMA_MAX_TOPICS=0 (unlimited): one gRPC Request with 10,000 topics
    and an SSE subscription with 1,500 (as many as a 16 KiB head holds) are
    admitted and receive events of any of their topics."""
    topics = [f"t{n}" for n in range(10_000)]
    with trio.fail_after(30):
        async with running_server(max_topics=0) as srv:
            with grpcio_stream(srv) as stream:
                stream.send(*topics)
                await grpcio_subscribed(stream)  # (all 10,000 topics set at once)
                url = f"{base_url(srv)}/?eventType={','.join(topics[:1500])}"
                async with (
                    httpx.AsyncClient(timeout=10) as client,
                    aconnect_sse(client, "GET", url) as source,
                    aclosing(source.aiter_sse()) as events,
                ):
                    assert source.response.status_code == 200
                    await sse_subscribed(events)
                    await srv.hub.publish(Event("t1499:x", b'"both"'))
                    await srv.hub.publish(Event("t9999", b'"grpc only"'))
                    assert (await next_grpc_payload(stream)).data == '"both"'
                    assert (await next_grpc_payload(stream)).data == '"grpc only"'
                    sse = await next_sse_event(events, what="the event of topic t1499")
                    assert json.loads(sse.data)["data"] == "both"


async def test_200_streams_opened_and_dropped_leave_no_trace(server: Running) -> None:
    with trio.fail_after(60):
        with grpcio_stream(server) as warm:
            warm.send("w")
            await grpcio_subscribed(warm)
        await grpc_connections_are(server, 0)
        baseline = live_task_count()
        streams = [GrpcioStream(server.grpc_port) for _ in range(200)]
        try:
            for n, s in enumerate(streams):
                s.send(f"churn:{n % 5}")
            await grpc_connections_are(server, 200, 20)
            await server.hub.publish(Event("churn:1", b"1"))
        finally:
            for s in streams:
                s.close()
        await grpc_connections_are(server, 0, 20)
        await wait_for_task_baseline(baseline)
        assert (await figures_of(server))["topics"] == 0


async def test_shutdown_ends_streams_with_ok() -> None:
    with trio.fail_after(20):
        async with running_server() as srv:
            stream = GrpcioStream(srv.grpc_port)
            stream.send("s")
            await grpcio_subscribed(stream)
            await srv.hub.publish(Event("s", b"1"))
            # Queued before the shutdown: it must arrive, then status OK.
            srv.shutdown.set()
            received, code = await stream.rest()
            stream.close()
    assert [p.data for p in received] == ["1"]
    assert code == grpc.StatusCode.OK


PROBE = """
import json, sys
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha, reflection_pb2_grpc as v1alpha_grpc

with grpc.insecure_channel(sys.argv[1]) as channel:
    health = health_pb2_grpc.HealthStub(channel)
    out = {"health": {}}
    for service in ("", "proto.StreamService"):
        out["health"][service] = health.Check(health_pb2.HealthCheckRequest(service=service)).status
    for name in ("v1alpha", "v1"):
        # grpcio-reflection ships v1alpha stubs; v1's messages are the same on
        # the wire, so a generic call reaches the v1 service with them.
        info = channel.stream_stream(
            f"/grpc.reflection.{name}.ServerReflection/ServerReflectionInfo",
            request_serializer=v1alpha.ServerReflectionRequest.SerializeToString,
            response_deserializer=v1alpha.ServerReflectionResponse.FromString,
        )
        first = next(info(iter([v1alpha.ServerReflectionRequest(list_services="")])))
        files = next(info(iter([
            v1alpha.ServerReflectionRequest(file_containing_symbol="proto.StreamService")
        ])))
        out[name] = {
            "services": sorted(s.name for s in first.list_services_response.service),
            "files": len(files.file_descriptor_response.file_descriptor_proto),
        }
print(json.dumps(out))
"""


async def test_health_and_reflection(server: Running) -> None:
    # A separate process: grpcio's health/reflection modules register the same
    # protobuf files as grpclib's, which one descriptor pool cannot hold twice.
    with trio.fail_after(30):
        result = await trio.run_process(
            [sys.executable, "-c", PROBE, f"127.0.0.1:{server.grpc_port}"], capture_stdout=True
        )
    out = json.loads(result.stdout)
    serving = 1  # grpc.health.v1.HealthCheckResponse.SERVING
    assert out["health"] == {"": serving, "proto.StreamService": serving}
    for version in ("v1alpha", "v1"):
        assert {"proto.StreamService", "grpc.health.v1.Health"} <= set(out[version]["services"])
        assert out[version]["files"] >= 1


async def test_grpclib_client_with_the_betterproto2_stub(server: Running) -> None:
    from grpclib.client import Channel

    from plasma_trio._proto.proto import EventType, Request, StreamServiceStub

    port = server.grpc_port

    async def client() -> list[str]:
        got: list[str] = []
        first = asyncio.Event()

        async def requests() -> AsyncIterator[Request]:
            yield Request(events=[EventType(type="gl")])
            await first.wait()
            yield Request(force_close=True)

        async with Channel("127.0.0.1", port) as channel:
            async for payload in StreamServiceStub(channel).events(requests()):
                got.append(payload.data)
                first.set()
        return got

    async def publisher() -> None:
        await wait_for_figure(server, "topics", 1)  # "gl"
        await server.hub.publish(Event("gl:1", b'"hello"'))

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(publisher)
            got = await trio.to_thread.run_sync(asyncio.run, client())
    assert got == ['"hello"']


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    """plasma_trio/_proto must be what `nox -s proto` generates from proto/."""
    root = Path(__file__).resolve().parent.parent
    plugin = Path(sys.executable).parent / "protoc-gen-python_betterproto2"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{root / 'proto'}",
            f"--plugin=protoc-gen-python_betterproto2={plugin}",
            f"--python_betterproto2_out={tmp_path}",
            "--python_betterproto2_opt=client_generation=async,server_generation=async",
            f"--descriptor_set_out={tmp_path / 'stream.desc'}",
            str(root / "proto" / "stream.proto"),
        ],
        capture_output=True,
        text=True,
        check=False,
        # The compiler formats its output with the `ruff` of this environment.
        env={**os.environ, "PATH": f"{plugin.parent}{os.pathsep}{os.environ.get('PATH', '')}"},
    )
    assert result.returncode == 0, result.stderr
    generated = {
        p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()
    }
    committed_dir = root / "plasma_trio" / "_proto"
    committed = {
        p.relative_to(committed_dir): p.read_bytes()
        for p in committed_dir.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert generated.keys() == committed.keys()
    stale = [str(name) for name in generated if generated[name] != committed[name]]
    assert not stale, f"stale generated code, run `nox -s proto`: {stale}"


async def test_replay_is_outside_the_bound_and_happens_once() -> None:
    with trio.fail_after(20):
        async with running_server(subscriber_buffer=4, history_size=100) as srv:
            hub = srv.hub
            for n in range(50):
                await hub.publish(Event("r", str(n).encode()))
            with grpcio_stream(srv) as stream:
                stream.send("r", last_event_id=f"{hub.epoch}-1")
                got = [(await next_grpc_payload(stream)).data for _ in range(49)]
                assert got == [str(n) for n in range(1, 50)]
                assert (await figures_of(srv))["subscribers_cut_off_grpc"] == 0
                # Changing topics while re-sending the same lastEventId replays nothing again.
                stream.send("r", "s", last_event_id=f"{hub.epoch}-1")
                await wait_for_figure(srv, "topics", 2)  # "r" and "s"
                await hub.publish(Event("s", b'"live"'))
                assert (await next_grpc_payload(stream)).data == '"live"'
