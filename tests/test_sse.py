"""SSE over real sockets (SPEC 2, 8): bytes, headers, errors, heartbeats, replay,
slow consumers, churn, resets, and clients that vanish while idle."""

from __future__ import annotations

import json
import socket
import struct
from contextlib import AsyncExitStack, aclosing
from typing import TYPE_CHECKING

import httpx
import pytest
import trio
from httpx_sse import EventSource, ServerSentEvent, aconnect_sse

from plasma_trio.core.events import Event
from plasma_trio.tasks import live_task_count
from tests import helpers
from tests.helpers import (
    SSE_HEADERS,
    base_url,
    figures_of,
    first_chunk,
    running_server,
    wait_for_figure,
    wait_for_task_baseline,
)
from tests.streams import next_sse_event, open_stalled_sse, sse_subscribed

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from plasma_trio.app import Running


async def dispatched(source: EventSource) -> AsyncIterator[ServerSentEvent]:
    """What a browser's EventSource would dispatch: blocks with data."""
    async with aclosing(source.aiter_sse()) as events:
        async for sse in events:
            if sse.data:
                yield sse


@pytest.fixture(autouse=True, params=["fast-path", "quart-path"])
def sse_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test here runs on the fast path and on the Quart/Hypercorn path."""
    monkeypatch.setitem(helpers.DEFAULTS, "sse_fast_path", request.param == "fast-path")
    return str(request.param)


async def raw_request(
    port: int, target: str, headers: dict[str, str] | None = None
) -> trio.SocketStream:
    """Open a plain socket and send one SSE request head (no client library)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    lines = [f"GET {target} HTTP/1.1", "Host: test", "Accept: text/event-stream"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode())
    return stream


async def read_until(stream: trio.SocketStream, marker: bytes, limit: int = 1 << 20) -> bytes:
    buf = b""
    while marker not in buf:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise EOFError(buf)
        buf += chunk
        assert len(buf) < limit
    return buf


def dechunk(body: bytes) -> bytes:
    """Decode an HTTP/1.1 chunked body prefix (complete chunks only)."""
    out = b""
    while body:
        size_line, sep, rest = body.partition(b"\r\n")
        if not sep:
            break
        size = int(size_line, 16)
        if size == 0 or len(rest) < size + 2:
            break
        out += rest[:size]
        body = rest[size + 2 :]
    return out


async def test_wire_bytes_headers_and_retry_first(server: Running) -> None:
    with trio.fail_after(10):
        stream = await raw_request(server.port, "/?eventType=program:1234")
        head = await read_until(stream, b"retry: 2000\n\n")  # subscribed
        await server.hub.publish(Event("program:1234:views", b'{"views": 10}'))
        await server.hub.publish(Event("program:9:views", b"1"))  # not subscribed
        await server.hub.publish(Event("program:1234", b'"x"'))
        raw = head + await read_until(stream, b'"data":"x"}\n\n')
        await stream.aclose()
    header_block, _, body = raw.partition(b"\r\n\r\n")
    headers = header_block.decode().lower().split("\r\n")
    assert headers[0].startswith("http/1.1 200")
    assert "content-type: text/event-stream" in headers
    assert "cache-control: no-cache" in headers
    assert "x-accel-buffering: no" in headers
    assert not any(h.startswith("access-control-allow-origin") for h in headers)
    epoch = server.hub.epoch
    assert dechunk(body) == (
        b"retry: 2000\n\n"
        + f"id: {epoch}-1\n".encode()
        + b'data: {"meta":{"type":"program:1234:views"},"data":{"views":10}}\n\n'
        + f"id: {epoch}-3\n".encode()
        + b'data: {"meta":{"type":"program:1234"},"data":"x"}\n\n'
    )


async def test_origin_and_retry_and_query_name_settings() -> None:
    with trio.fail_after(10):
        async with (
            running_server(
                origin="https://app.example", sse_retry=1234, sse_eventquery="topics"
            ) as srv,
            httpx.AsyncClient(base_url=base_url(srv)) as client,
        ):
            async with client.stream("GET", "/?topics=a", headers=SSE_HEADERS) as resp:
                assert resp.status_code == 200
                assert resp.headers["access-control-allow-origin"] == "https://app.example"
                first = await first_chunk(resp)
                assert first == b"retry: 1234\n\n"
            resp = await client.get("/?eventType=a", headers=SSE_HEADERS)
            assert resp.status_code == 400
            assert "'topics'" in resp.text


@pytest.mark.parametrize(
    "target",
    ["/", "/?eventType=", "/?eventType=,,", "/?other=a", "/?eventType=%20"],
)
async def test_missing_or_empty_topics_are_400(client: httpx.AsyncClient, target: str) -> None:
    with trio.fail_after(10):
        resp = await client.get(target, headers=SSE_HEADERS)
    assert resp.status_code == 400
    assert resp.headers["content-type"].startswith("text/plain")
    assert "eventType" in resp.text


async def test_topic_limits_are_400() -> None:
    with trio.fail_after(10):
        async with running_server(max_topics=2, max_topic_length=5) as srv:
            async with httpx.AsyncClient(base_url=base_url(srv)) as client:
                resp = await client.get("/?eventType=a,b,c", headers=SSE_HEADERS)
                assert resp.status_code == 400
                assert "more than 2 topics" in resp.text
                resp = await client.get("/?eventType=abcdef", headers=SSE_HEADERS)
                assert resp.status_code == 400
                assert "exceeds the limit" in resp.text


async def test_without_event_stream_accept_is_not_sse(client: httpx.AsyncClient) -> None:
    with trio.fail_after(10):
        for accept in ("*/*", "text/html", "text/event-stream;q=0"):
            resp = await client.get("/?eventType=a", headers={"Accept": accept})
            assert resp.status_code == 404
        accept = {"Accept": "text/html;q=0.9, text/event-stream;q=0.1"}
        async with client.stream("GET", "/?eventType=a", headers=accept) as resp:
            assert resp.status_code == 200
            assert await first_chunk(resp) == b"retry: 2000\n\n"


async def test_events_with_httpx_sse_and_overlapping_topics_once(
    server: Running, client: httpx.AsyncClient
) -> None:
    received: list[tuple[str, dict[str, object]]] = []
    with trio.fail_after(10):
        async with aconnect_sse(
            client, "GET", "/?eventType=program,program:1234,program:1234:views"
        ) as source:
            async with aclosing(source.aiter_sse()) as events:
                await sse_subscribed(events)
                await server.hub.publish(
                    Event("program:1234:views", b'{"a":[1,"line\\nbreak","\\u00e9\xc3\xa9"]}')
                )
                await server.hub.publish(Event("program:1234:views"))
                await server.hub.publish(Event("done"))
                await server.hub.publish(Event("program", b'"end"'))
                for n in range(3):
                    sse = await next_sse_event(events, what=f"event {n + 1} of 3")
                    received.append((sse.id, json.loads(sse.data)))
    epoch = server.hub.epoch
    assert received == [
        (
            f"{epoch}-1",
            {"meta": {"type": "program:1234:views"}, "data": {"a": [1, "line\nbreak", "éé"]}},
        ),
        (f"{epoch}-2", {"meta": {"type": "program:1234:views"}, "data": None}),
        (f"{epoch}-4", {"meta": {"type": "program"}, "data": "end"}),
    ]


async def test_heartbeat_to_idle_clients_only() -> None:
    with trio.fail_after(10):
        async with running_server(sse_heartbeat_interval=0.3) as srv:
            stream = await raw_request(srv.port, "/?eventType=a")
            await read_until(stream, b"retry:")
            t0 = trio.current_time()
            await read_until(stream, b":heartbeat\n\n")
            assert trio.current_time() - t0 >= 0.25
            # Events reset the idle timer: while events flow, no heartbeat.
            buf = b""
            for _ in range(8):
                await srv.hub.publish(Event("a", b"1"))
                await trio.sleep(0.1)
                buf += await stream.receive_some(65536)
            assert b":heartbeat" not in dechunk(buf) or buf.count(b":heartbeat") == 0
            await stream.aclose()


async def test_replay_with_last_event_id_and_gap() -> None:
    with trio.fail_after(10):
        async with running_server(history_size=3) as srv:
            hub = srv.hub
            for n in range(5):
                await hub.publish(Event("t", str(n).encode()))
            async with httpx.AsyncClient(base_url=base_url(srv)) as client:
                # In the window: exactly the missed events, then live ones.
                headers = {"Last-Event-ID": f"{hub.epoch}-3"}
                async with AsyncExitStack() as stack:
                    source = await stack.enter_async_context(
                        aconnect_sse(client, "GET", "/?eventType=t", headers=headers)
                    )
                    it = await stack.enter_async_context(aclosing(dispatched(source)))
                    assert [(await anext(it)).data for _ in range(2)] == [
                        '{"meta":{"type":"t"},"data":3}',
                        '{"meta":{"type":"t"},"data":4}',
                    ]
                    await hub.publish(Event("t", b"5"))
                    live = await anext(it)
                    assert live.id == f"{hub.epoch}-6"
                # Too old for the window: a plasma-gap event first, then what is held.
                async with AsyncExitStack() as stack:
                    source = await stack.enter_async_context(
                        aconnect_sse(client, "GET", f"/?eventType=t&lastEventId={hub.epoch}-1")
                    )
                    it = await stack.enter_async_context(aclosing(dispatched(source)))
                    gap = await anext(it)
                    assert gap.event == "plasma-gap"
                    assert json.loads(gap.data) == {
                        "requested": f"{hub.epoch}-1",
                        "oldest": f"{hub.epoch}-4",
                    }
                    assert [(await anext(it)).id for _ in range(3)] == [
                        f"{hub.epoch}-{n}" for n in (4, 5, 6)
                    ]


async def test_slow_client_is_cut_off_while_fast_client_keeps_receiving() -> None:
    total = 120
    payload = b'"' + b"x" * 65536 + b'"'
    with trio.fail_after(30):
        async with running_server(subscriber_buffer=4) as srv:
            # The slow client: a tiny receive buffer, and it never reads.
            slow = await open_stalled_sse(srv.port, "eventType=t")
            async with httpx.AsyncClient(base_url=base_url(srv)) as client:
                async with AsyncExitStack() as stack:
                    source = await stack.enter_async_context(
                        aconnect_sse(client, "GET", "/?eventType=t")
                    )
                    it = await stack.enter_async_context(aclosing(source.aiter_sse()))
                    await sse_subscribed(it)
                    await wait_for_figure(srv, "connections_sse", 2)  # the slow one too
                    ids = []
                    for n in range(total):
                        await srv.hub.publish(Event("t", payload))
                        ids.append((await next_sse_event(it, what=f"event {n + 1}")).id)
                    assert ids == [f"{srv.hub.epoch}-{n}" for n in range(1, total + 1)]
                    figures = await figures_of(srv)
                    assert figures["subscribers_cut_off_sse"] == 1
                    assert figures["events_delivered_sse"] >= total
            await slow.aclose()
            await wait_for_figure(srv, "connections_sse", 0)


async def test_churn_returns_to_baseline(server: Running) -> None:
    cycles = 1000
    async with httpx.AsyncClient(
        base_url=base_url(server), limits=httpx.Limits(max_connections=50)
    ) as client:
        # Warm up, then measure the baseline with the client pool idle.
        async with client.stream("GET", "/?eventType=a", headers=SSE_HEADERS) as resp:
            await first_chunk(resp)
        await wait_for_figure(server, "connections_sse", 0)
        baseline = live_task_count()

        async def one(n: int) -> None:
            async with client.stream("GET", f"/?eventType=t{n % 7},x", headers=SSE_HEADERS) as resp:
                assert resp.status_code == 200
                await first_chunk(resp)

        with trio.fail_after(120):
            for start in range(0, cycles, 50):
                async with trio.open_nursery() as nursery:
                    for n in range(start, start + 50):
                        nursery.start_soon(one, n)
            await server.hub.publish(Event("x"))  # reaches nobody, but must not fail
            await wait_for_figure(server, "connections_sse", 0)
    await wait_for_task_baseline(baseline, 10)
    assert (await figures_of(server))["topics"] == 0


async def test_reset_mid_stream_is_noticed_and_harmless(server: Running) -> None:
    with trio.fail_after(20):
        baseline = live_task_count()
        for _ in range(20):
            sock = trio.socket.socket()
            await sock.connect(("127.0.0.1", server.port))
            await sock.send(
                b"GET /?eventType=t HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n"
            )
            await sock.recv(4096)
            for _ in range(50):
                await server.hub.publish(Event("t", b'"' + b"y" * 4096 + b'"'))
            # SO_LINGER 0: close sends a RST instead of a FIN.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
            for _ in range(50):
                await server.hub.publish(Event("t", b"1"))
            await trio.sleep(0)
        await wait_for_figure(server, "connections_sse", 0)
        await wait_for_task_baseline(baseline)
        # The server is still fine.
        async with httpx.AsyncClient(base_url=base_url(server)) as client:
            assert (await client.get("/hc")).status_code == 200


async def test_client_vanishing_while_idle_is_forgotten_at_once(server: Running) -> None:
    with trio.fail_after(10):
        baseline = live_task_count()
        streams = [await raw_request(server.port, "/?eventType=idle") for _ in range(10)]
        for s in streams:
            await read_until(s, b"retry:")
        assert (await figures_of(server))["connections_sse"] == 10
        for s in streams:
            await s.aclose()  # no event is flowing
        await wait_for_figure(server, "connections_sse", 0, 2)  # idle clients forgotten
        await wait_for_task_baseline(baseline)
    assert (await figures_of(server))["topics"] == 0


async def test_connection_limit_gives_503() -> None:
    with trio.fail_after(10):
        async with running_server(max_connections=1) as srv:
            first = await raw_request(srv.port, "/?eventType=a")
            await read_until(first, b"retry:")
            async with httpx.AsyncClient(base_url=base_url(srv)) as client:
                second = await client.get("/?eventType=a", headers=SSE_HEADERS)
                assert second.status_code == 503
                assert "limit of 1" in second.text
                await first.aclose()
                await wait_for_figure(srv, "connections_sse", 0)
                async with client.stream("GET", "/?eventType=a", headers=SSE_HEADERS) as third:
                    assert third.status_code == 200
