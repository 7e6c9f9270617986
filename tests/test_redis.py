"""The redis source (SPEC 4, 5) against real redis-server processes, with
redis-cli as the independent publisher."""

from __future__ import annotations

import json
import subprocess
from contextlib import AsyncExitStack, aclosing
from typing import TYPE_CHECKING

import httpx
import pytest
import trio
from httpx_sse import ServerSentEvent, aconnect_sse

from tests.grpc_clients import GrpcioStream
from tests.helpers import (
    PYTHON,
    base_url,
    figures_of,
    free_port,
    plasma_env,
    running_server,
    wait_for_figure,
)
from tests.redis_server import RedisServer
from tests.streams import grpcio_subscribed

if TYPE_CHECKING:
    from collections.abc import AsyncIterator


def redis_settings(redis: RedisServer, **extra: object) -> dict[str, object]:
    return {
        "subscriber_type": "redis",
        "subscriber_redis_addr": redis.addr,
        "subscriber_redis_channels": ("c1", "c2"),
        "subscriber_redis_timeout": 0.5,
        "subscriber_redis_retry_interval": 0.1,
        **extra,
    }


async def publish(redis: RedisServer, channel: str, message: str) -> int:
    return await trio.to_thread.run_sync(redis.publish, channel, message)


async def sse_events(
    client: httpx.AsyncClient, stack: AsyncExitStack, topics: str
) -> AsyncIterator[ServerSentEvent]:
    source = await stack.enter_async_context(aconnect_sse(client, "GET", f"/?eventType={topics}"))

    async def gen() -> AsyncIterator[ServerSentEvent]:
        async with aclosing(source.aiter_sse()) as events:
            async for sse in events:
                if sse.data:
                    yield sse

    return await stack.enter_async_context(aclosing(gen()))


def wire(event_type: str, data: object) -> str:
    return json.dumps({"meta": {"type": event_type}, "data": data})


async def test_multiple_channels_in_order_and_garbage_dropped(redis_server: RedisServer) -> None:
    with trio.fail_after(20):
        async with (
            running_server(**redis_settings(redis_server)) as srv,
            httpx.AsyncClient(base_url=base_url(srv)) as client,
            AsyncExitStack() as stack,
        ):
            events = await sse_events(client, stack, "a")
            await wait_for_figure(srv, "connections_sse", 1)
            assert await publish(redis_server, "c1", "not json") == 1
            assert await publish(redis_server, "c2", '{"meta":{"type":""}}') == 1
            for n in range(5):
                await publish(redis_server, "c1" if n % 2 else "c2", wire("a:b", n))
            got = [json.loads((await anext(events)).data)["data"] for _ in range(5)]
            assert got == [0, 1, 2, 3, 4]
            figures = await figures_of(srv)
            assert figures["events_invalid"] == 2
            assert figures["events_received"] == 5


async def test_outage_keeps_subscribers_and_resumes(redis_server: RedisServer) -> None:
    with trio.fail_after(30):
        async with (
            running_server(
                **redis_settings(redis_server, subscriber_redis_over_max_retry_behavior="alive")
            ) as srv,
            httpx.AsyncClient(base_url=base_url(srv)) as client,
            AsyncExitStack() as stack,
        ):
            events = await sse_events(client, stack, "x")
            grpc_stream = GrpcioStream(srv.grpc_port)
            stack.callback(grpc_stream.close)
            grpc_stream.send("x")
            await wait_for_figure(srv, "connections_sse", 1)
            await grpcio_subscribed(grpc_stream)
            assert (await client.get("/hc")).status_code == 200
            await publish(redis_server, "c1", wire("x", "before"))
            assert json.loads((await anext(events)).data)["data"] == "before"
            assert (await grpc_stream.receive()).data == '"before"'

            assert (await client.get("/livez")).status_code == 200
            assert (await client.get("/readyz")).status_code == 200
            redis_server.stop()
            await wait_for_figure(srv, "redis_connected", False, 10)  # outage noticed
            assert (await client.get("/hc")).status_code == 500
            # Alive (a liveness probe must not restart it), not ready.
            assert (await client.get("/livez")).status_code == 200
            assert (await client.get("/readyz")).status_code == 503
            figures = await figures_of(srv)
            assert (figures["connections_sse"], figures["connections_grpc"]) == (1, 1)

            redis_server.start()  # same port
            await wait_for_figure(srv, "redis_connected", True, 10)  # reconnected
            assert (await client.get("/hc")).status_code == 200
            assert (await client.get("/readyz")).status_code == 200
            await publish(redis_server, "c2", wire("x", "after"))
            # What was published meanwhile is gone: the live gap notice first.
            notice = await anext(events)
            assert notice.event == "plasma-gap"
            assert (await grpc_stream.receive()).eventType.type == "plasma-gap"
            assert json.loads((await anext(events)).data)["data"] == "after"
            assert (await grpc_stream.receive()).data == '"after"'


async def test_debug_and_publish_go_through_redis_to_every_instance(
    redis_server: RedisServer,
) -> None:
    settings = redis_settings(redis_server, debug=True, publish_token="tok")
    with trio.fail_after(20):
        async with (
            running_server(**settings) as a,
            running_server(**settings) as b,
            httpx.AsyncClient(base_url=base_url(b)) as client_b,
            httpx.AsyncClient(base_url=base_url(a)) as client_a,
            AsyncExitStack() as stack,
        ):
            await wait_for_figure(a, "redis_connected", True)
            await wait_for_figure(b, "redis_connected", True)
            events = await sse_events(client_b, stack, "p")
            await wait_for_figure(b, "connections_sse", 1)
            resp = await client_a.post("/debug", content=wire("p:1", {"k": 1}))
            assert resp.status_code == 200
            assert json.loads((await anext(events)).data) == {
                "meta": {"type": "p:1"},
                "data": {"k": 1},
            }
            resp = await client_a.post(
                "/publish", content=wire("p:2", "s"), headers={"Authorization": "Bearer tok"}
            )
            assert resp.status_code == 200
            assert json.loads((await anext(events)).data)["data"] == "s"
            # Both instances received both events (through Redis, not directly).
            assert (await figures_of(a))["events_received"] == 2
            assert (await figures_of(b))["events_received"] == 2

            redis_server.stop()
            resp = await client_a.post("/debug", content=wire("p:3", 1))
            assert resp.status_code == 500
            assert "publish failed" in resp.text or "not connected" in resp.text


async def test_alive_keeps_serving_through_a_long_outage() -> None:
    redis = RedisServer()  # not started: Redis is down from the beginning
    try:
        with trio.fail_after(30):
            settings = redis_settings(
                redis,
                subscriber_redis_max_retry=2,
                subscriber_redis_over_max_retry_behavior="alive",
            )
            async with (
                running_server(**settings) as srv,
                httpx.AsyncClient(base_url=base_url(srv)) as client,
            ):
                await trio.sleep(1.0)  # many more failures than max_retry
                assert (await client.get("/hc")).status_code == 500
                redis.start()
                await wait_for_figure(srv, "redis_connected", True, 10)  # once Redis is up
                assert (await client.get("/hc")).status_code == 200
    finally:
        redis.cleanup()


def test_die_exits_non_zero_in_bounded_time() -> None:
    redis_port = free_port()  # nothing listens there
    env = plasma_env(
        PLASMA_PORT=str(free_port()),
        PLASMA_SUBSCRIBER_TYPE="redis",
        PLASMA_SUBSCRIBER_REDIS_ADDR=f"127.0.0.1:{redis_port}",
        PLASMA_SUBSCRIBER_REDIS_CHANNELS="c",
        PLASMA_SUBSCRIBER_REDIS_MAX_RETRY="3",
        PLASMA_SUBSCRIBER_REDIS_RETRY_INTERVAL="100ms",
        PLASMA_SUBSCRIBER_REDIS_TIMEOUT="200ms",
    )
    result = subprocess.run(
        [PYTHON, "-m", "plasma_trio", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 1
    assert "unreachable after 3 retries" in result.stderr
    warnings = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert [w["failures"] for w in warnings if w["msg"] == "redis connection failed"] == [1, 2, 3]


@pytest.mark.parametrize("password", ["", "s3cret"])
async def test_password_and_db(password: str) -> None:
    redis = RedisServer()
    redis.start()
    try:
        if password:
            redis.cli("CONFIG", "SET", "requirepass", password)
        with trio.fail_after(20):
            settings = redis_settings(
                redis, subscriber_redis_password=password, subscriber_redis_db=3
            )
            async with running_server(**settings) as srv:
                await wait_for_figure(srv, "redis_connected", True, 10)
                args = ["-a", password, "--no-auth-warning"] if password else []
                out = await trio.to_thread.run_sync(
                    lambda: redis.cli(*args, "PUBLISH", "c1", wire("z", 1))
                )
                assert out.strip() == "1"
                await wait_for_figure(srv, "events_received", 1)
                # Pub/sub ignores the DB number, so check the connections
                # themselves: plasma-trio's have selected DB 3.
                clients = await trio.to_thread.run_sync(lambda: redis.cli(*args, "CLIENT", "LIST"))
                dbs = {
                    field.split("=")[1]
                    for line in clients.splitlines()
                    for field in line.split()
                    if field.startswith("db=") and "cmd=client" not in line
                }
                assert dbs == {"3"}, clients
    finally:
        redis.cleanup()


async def test_hung_redis_is_noticed_and_recovered(redis_server: RedisServer) -> None:
    """SIGSTOP freezes redis-server while the kernel keeps its connections open
    (as with a hung Redis or a half-open connection): the idle PING notices."""
    import os
    import signal

    settings = redis_settings(redis_server, subscriber_redis_over_max_retry_behavior="alive")
    with trio.fail_after(30):
        async with running_server(**settings) as srv:
            await wait_for_figure(srv, "redis_connected", True, 10)
            assert redis_server.proc is not None
            os.kill(redis_server.proc.pid, signal.SIGSTOP)
            try:
                await wait_for_figure(srv, "redis_connected", False, 5)  # hung Redis noticed
            finally:
                os.kill(redis_server.proc.pid, signal.SIGCONT)
            await wait_for_figure(srv, "redis_connected", True, 10)  # reconnected
            await publish(redis_server, "c1", wire("z", 1))
            await wait_for_figure(srv, "events_received", 1)


async def test_health_follows_the_subscription_not_only_the_connection(
    redis_server: RedisServer,
) -> None:
    """The pub/sub connection is killed and may not subscribe again (an ACL)
    while plain commands still work: /hc is 500 until delivery is possible
    again, then 200, and subscribers get the live gap notice."""
    settings = redis_settings(redis_server, subscriber_redis_over_max_retry_behavior="alive")
    with trio.fail_after(30):
        async with (
            running_server(**settings) as srv,
            httpx.AsyncClient(base_url=base_url(srv)) as client,
            AsyncExitStack() as stack,
        ):
            events = await sse_events(client, stack, "h")
            await wait_for_figure(srv, "connections_sse", 1)
            assert (await client.get("/hc")).status_code == 200
            redis_server.cli("ACL", "SETUSER", "default", "-subscribe")
            try:
                redis_server.cli("CLIENT", "KILL", "TYPE", "pubsub")
                await wait_for_figure(srv, "redis_connected", False, 10)  # subscription lost
                for _ in range(5):  # retries keep failing; PING keeps working
                    assert (await client.get("/hc")).status_code == 500
                    await trio.sleep(0.1)
                assert redis_server.cli("PING").strip() == "PONG"
            finally:
                redis_server.cli("ACL", "SETUSER", "default", "+subscribe")
            await wait_for_figure(srv, "redis_connected", True, 10)  # subscribed again
            assert (await client.get("/hc")).status_code == 200
            await publish(redis_server, "c1", wire("h", "back"))
            assert (await anext(events)).event == "plasma-gap"
            assert json.loads((await anext(events)).data)["data"] == "back"


HEALTH_PROBE = """
import sys, grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
with grpc.insecure_channel(sys.argv[1]) as channel:
    print(health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service="proto.StreamService")).status)
"""


async def test_grpc_health_follows_redis(redis_server: RedisServer) -> None:
    import sys

    settings = redis_settings(redis_server, subscriber_redis_over_max_retry_behavior="alive")

    async def health(port: int) -> int:
        # A separate process: grpcio's health module and grpclib's register
        # the same protobuf file.
        result = await trio.run_process(
            [sys.executable, "-c", HEALTH_PROBE, f"127.0.0.1:{port}"], capture_stdout=True
        )
        return int(result.stdout)

    serving, not_serving = 1, 2
    with trio.fail_after(40):
        async with running_server(**settings) as srv:
            await wait_for_figure(srv, "redis_connected", True, 10)
            assert await health(srv.grpc_port) == serving
            redis_server.stop()
            with trio.fail_after(10):
                while await health(srv.grpc_port) != not_serving:
                    await trio.sleep(0.2)
            redis_server.start()
            with trio.fail_after(15):
                while await health(srv.grpc_port) != serving:
                    await trio.sleep(0.2)
