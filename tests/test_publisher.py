"""Publishing (SPEC 5): `plasma-trio publish` and plasma_trio.publisher, to Redis
and to a server's /publish, under trio and asyncio."""

from __future__ import annotations

import asyncio
import json
import subprocess

import pytest
import trio

from plasma_trio.publisher import PublishError, RedisPublisher, build_event, publish_http
from tests.helpers import (
    PYTHON,
    base_url,
    figures_of,
    free_port,
    plasma_env,
    running_server,
    wait_for_figure,
)
from tests.redis_server import REDIS_CLI, RedisServer


async def cli_publish(*args: str, **env: str) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(
        [PYTHON, "-m", "plasma_trio", "publish", *args],
        env=plasma_env(**env),
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )


async def test_cli_publishes_to_redis_and_rejects_invalid_json(redis_server: RedisServer) -> None:
    settings = {
        "subscriber_type": "redis",
        "subscriber_redis_addr": redis_server.addr,
        "subscriber_redis_channels": ("events",),
    }
    env = {
        "PLASMA_SUBSCRIBER_REDIS_ADDR": redis_server.addr,
        "PLASMA_SUBSCRIBER_REDIS_CHANNELS": "events",
    }
    with trio.fail_after(30):
        async with running_server(**settings) as srv:
            await wait_for_figure(srv, "redis_connected", True)
            bad = await cli_publish("program:1", "{not json", **env)
            assert bad.returncode == 2
            assert len(bad.stderr.decode().strip().splitlines()) == 1
            assert b"invalid event" in bad.stderr
            ok = await cli_publish("program:1", '{"views": 7}', **env)
            assert ok.returncode == 0, ok.stderr
            assert b"1 receivers" in ok.stdout
            await wait_for_figure(srv, "events_received", 1)
            # --channel overrides the configured channel (nobody listens there).
            other = await cli_publish("--channel", "elsewhere", "x", "1", **env)
            assert other.returncode == 0
            assert b"(0 receivers)" in other.stdout
            assert (await figures_of(srv))["events_received"] == 1
            assert (await figures_of(srv))["events_invalid"] == 0


async def test_cli_unreachable_redis_exits_1() -> None:
    with trio.fail_after(20):
        result = await cli_publish(
            "--subscriber-redis-timeout",
            "300ms",
            "t",
            "1",
            PLASMA_SUBSCRIBER_REDIS_ADDR=f"127.0.0.1:{free_port()}",
            PLASMA_SUBSCRIBER_REDIS_CHANNELS="c",
        )
    assert result.returncode == 1
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1
    assert "redis publish failed" in lines[0]


async def test_cli_without_channel_exits_non_zero() -> None:
    with trio.fail_after(20):
        result = await cli_publish("t", "1")
    assert result.returncode == 1
    assert b"no channel" in result.stderr


async def test_cli_and_library_post_to_publish_endpoint() -> None:
    with trio.fail_after(30):
        async with running_server(publish_token="tok") as srv:
            url = base_url(srv)
            ok = await cli_publish("--url", url, "--token", "tok", "a:b", '"hello"')
            assert ok.returncode == 0, ok.stderr
            bad_token = await cli_publish("--url", url, "a:b", "1", PLASMA_PUBLISH_TOKEN="nope")
            assert bad_token.returncode == 1
            assert b"401" in bad_token.stderr
            assert await publish_http(url, "tok", "a:c", {"n": 1}) == {
                "status": "ok",
                "type": "a:c",
                "id": (await figures_of(srv))["last_event_id"],
            }
            with pytest.raises(PublishError, match="401"):
                await publish_http(url, "wrong", "a:c", 1)
            assert (await figures_of(srv))["events_received"] == 2
        with pytest.raises(PublishError, match="cannot reach"):
            await publish_http(f"http://127.0.0.1:{free_port()}", "tok", "a", 1)


def test_library_from_asyncio_reaches_an_independent_subscriber(redis_server: RedisServer) -> None:
    assert REDIS_CLI is not None
    sub = subprocess.Popen(
        [REDIS_CLI, "-p", str(redis_server.port), "--csv", "SUBSCRIBE", "chan"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert sub.stdout is not None
        while "subscribe" not in sub.stdout.readline():
            pass

        async def main() -> int:
            async with RedisPublisher(redis_server.addr, channel="chan") as publisher:
                return await publisher.publish("program:9", {"k": [1, 2]})

        assert asyncio.run(main()) == 1
        line = sub.stdout.readline().strip()
        assert line.startswith('"message","chan",')
        payload = json.loads(json.loads("[" + line + "]")[2])
        assert payload == {"meta": {"type": "program:9"}, "data": {"k": [1, 2]}}
    finally:
        sub.kill()
        sub.communicate()


def test_build_event_validation() -> None:
    assert build_event("a", {"x": 1}).to_wire() == b'{"meta":{"type":"a"},"data":{"x":1}}'
    assert build_event("a", data_json='"s"').data == b'"s"'
    with pytest.raises(PublishError, match="empty"):
        build_event("", 1)
    with pytest.raises(PublishError, match="JSON-serialisable"):
        build_event("a", {1, 2})
    with pytest.raises(PublishError, match="not valid JSON"):
        build_event("a", data_json="{x")
