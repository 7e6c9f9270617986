"""The subscriber session's guarantees on every way a subscriber arrives
(SPEC 3 and 8): SSE over plain HTTP/1.1 (the fast path), SSE over TLS
(HTTP/1.1 on Hypercorn), SSE over HTTP/2, and gRPC.

* A client that stops reading is released, within the write deadline or at
  once when its queue is full, while another subscriber receives every
  event. The stalled clients really stall: raw sockets with a tiny receive
  buffer that are never read again, and raw HTTP/2 connections that grant a
  1 KiB window and never send WINDOW_UPDATE.
* Resume after missed events: in order, no duplicates; gRPC also across a
  second ``Request``.
* The gap notice for an id the history cannot place.

Events are published through ``POST /debug`` and the server is observed
through its metrics port, as an operator would.
"""

from __future__ import annotations

import json
import ssl
from contextlib import asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import trio
import trustme
from httpx_sse import aconnect_sse

from plasma_trio._proto.proto import Payload
from tests.grpc_clients import GrpcioStream
from tests.h2_raw import RawH2, grpc_headers, grpc_request, sse_headers
from tests.helpers import figures_of, running_server, wait_for_figure, wait_until
from tests.redis_server import RedisServer
from tests.server_process import Server, start_server, stop_server
from tests.streams import grpcio_subscribed, open_stalled_sse, read_raw_until, sse_subscribed

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable
    from pathlib import Path

    from plasma_trio.app import Running

WAYS = ["sse", "sse-tls", "sse-h2", "grpc"]
BIG = 64 * 1024


class Harness:
    """One server, reached the way ``way`` names, plus its publisher and metrics."""

    def __init__(self, srv: Running, way: str, ca: trustme.CA) -> None:
        self.srv = srv
        self.way = way
        self.tls = way in ("sse-tls", "sse-h2")
        self.context: ssl.SSLContext | None = None
        if self.tls:
            self.context = ssl.create_default_context()
            ca.configure_trust(self.context)
        scheme = "https" if self.tls else "http"
        self.base = f"{scheme}://localhost:{srv.port}"
        self.transport = "grpc" if way == "grpc" else "sse"

    async def publish(self, client: httpx.AsyncClient, topic: str, data: Any) -> None:
        body = json.dumps({"meta": {"type": topic}, "data": data})
        response = await client.post(f"{self.base}/debug", content=body)
        assert response.status_code == 200, response.text

    async def figures(self, client: httpx.AsyncClient | None = None) -> dict[str, Any]:
        """``/metrics/plasma`` (:func:`figures_of`; ``client`` is not needed)."""
        return await figures_of(self.srv)

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            verify=self.context or True, http2=self.way == "sse-h2", timeout=20
        )


@asynccontextmanager
async def harness(
    way: str, ca: trustme.CA, tls_files: dict[str, str], **overrides: Any
) -> AsyncIterator[Harness]:
    """An in-process server reached the way ``way`` names: with ``tls_files``
    for sse-tls and sse-h2, without for sse and grpc (the suite's one server
    with optional TLS); ``/debug`` on unless ``overrides`` say otherwise."""
    tls = tls_files if way in ("sse-tls", "sse-h2") else {}
    async with running_server(**{"debug": True, **tls, **overrides}) as srv:
        yield Harness(srv, way, ca)


# -- subscribers that read everything ----------------------------------------


async def read_all(
    h: Harness,
    topic: str,
    got: list[tuple[str, str]],
    *,
    last_event_id: str = "",
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Append (id, data) of every event received, forever (cancel to stop).
    A gap notice is recorded as ("plasma-gap", data). Started once the
    stream is subscribed (its retry block, or its gRPC response headers)."""
    if h.way == "grpc":
        stream = GrpcioStream(h.srv.grpc_port)
        try:
            stream.send(topic, last_event_id=last_event_id)
            await grpcio_subscribed(stream)
            task_status.started()
            while True:
                payload = await stream.receive()
                if payload.eventType.type == "plasma-gap":
                    got.append(("plasma-gap", payload.data))
                else:
                    got.append((payload.id, payload.data))
        finally:
            stream.close()
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    async with (
        h.client() as client,
        aconnect_sse(client, "GET", f"{h.base}/?eventType={topic}", headers=headers) as source,
    ):
        assert source.response.status_code == 200
        assert source.response.http_version == ("HTTP/2" if h.way == "sse-h2" else "HTTP/1.1")
        events = source.aiter_sse()
        await sse_subscribed(events)
        task_status.started()
        async for sse in events:
            if sse.event == "plasma-gap":
                got.append(("plasma-gap", sse.data))
            elif sse.data:
                got.append((sse.id, json.dumps(json.loads(sse.data)["data"])))


# -- a subscriber that stops reading -----------------------------------------


class Stalled:
    """Subscribes, reads until it has seen ``warm``, then never reads again."""

    def __init__(self, h: Harness, topic: str) -> None:
        self.h = h
        self.topic = topic
        self.h2: RawH2 | None = None
        self.stream_id = 0
        self.socket: trio.abc.Stream | None = None
        self.seen = bytearray()

    async def open(self) -> None:
        h = self.h
        if h.way in ("sse-h2", "grpc"):
            self.h2 = await RawH2.connect(
                h.srv.port if h.way == "sse-h2" else h.srv.grpc_port, context=h.context
            )
            if h.way == "grpc":
                self.stream_id = await self.h2.request(
                    "/proto.StreamService/Events",
                    grpc_headers(f"localhost:{h.srv.grpc_port}"),
                    grpc_request(self.topic),
                )
            else:
                self.stream_id = await self.h2.request(
                    f"/?eventType={self.topic}", sse_headers(f"localhost:{h.srv.port}")
                )
            return
        self.socket = await open_stalled_sse(
            h.srv.port, f"eventType={self.topic}", tls_context=h.context
        )

    async def read_until(self, marker: bytes) -> None:
        while marker not in self.seen:
            if self.h2 is not None:
                h2 = self.h2
                assert not h2.closed, f"the connection ended before {marker!r}"
                assert h2.ended(self.stream_id) is None, f"the stream ended before {marker!r}"
                await h2.read_once()
                self.seen = h2.data.get(self.stream_id, bytearray())
            else:
                assert self.socket is not None
                data = await self.socket.receive_some(1024)
                assert data, f"closed before {marker!r}"
                self.seen += data

    async def aclose(self) -> None:
        if self.h2 is not None:
            await self.h2.aclose()
        if self.socket is not None:
            await self.socket.aclose()


async def warm_up(
    h: Harness, client: httpx.AsyncClient, topic: str, ready: list[Callable[[], bool]]
) -> None:
    """Publish small events until every subscriber in ``ready`` has one."""
    with trio.fail_after(10):
        while not all(check() for check in ready):
            await h.publish(client, topic, "warm")
            await trio.sleep(0.05)


async def stall_and_check_release(h: Harness, *, events: int, within: float) -> None:
    """A stalled client and a healthy one on one topic; the healthy one gets
    every event, the stalled one is released (its slot given back) in time."""
    topic = "stall"
    got: list[tuple[str, str]] = []
    stalled = Stalled(h, topic)
    async with h.client() as client, trio.open_nursery() as nursery:
        await nursery.start(read_all, h, topic, got)
        await stalled.open()
        stalled_ready: list[bool] = []

        async def stalled_reader() -> None:
            await stalled.read_until(b"warm")
            stalled_ready.append(True)

        nursery.start_soon(stalled_reader)
        await warm_up(h, client, topic, [lambda: bool(got), lambda: bool(stalled_ready)])
        await wait_until(lambda: bool(stalled_ready), 10, "the stalled client's warm-up")
        warm = len(got)
        # From here on the stalled client reads nothing.
        payload = "x" * BIG
        for n in range(events):
            await h.publish(client, topic, {"n": n, "pad": payload})
            await trio.sleep(0.002)
        stalled_at = trio.current_time()
        with trio.fail_after(20):
            while len(got) < warm + events:
                await trio.sleep(0.01)
        # The healthy subscriber received every event, in order.
        assert [json.loads(data)["n"] for _, data in got[warm:]] == list(range(events))
        # The stalled one is cut off and its slot released.
        transport = h.transport
        figures = await wait_for_figure(h.srv, f"connections_{transport}", 1, within + 5)
        assert trio.current_time() - stalled_at <= within + 5
        assert figures[f"subscribers_cut_off_{transport}"] == 1
        # The client is told, once it reads again: RST_STREAM (HTTP/2, gRPC
        # after its RESOURCE_EXHAUSTED trailers) or the end of the connection.
        if stalled.h2 is not None:
            with trio.fail_after(10):
                while stalled.h2.ended(stalled.stream_id) is None and not stalled.h2.closed:
                    await stalled.h2.read_once()
            if h.way == "grpc" and not stalled.h2.closed:
                assert stalled.h2.trailers(stalled.stream_id).get("grpc-status") == "8"
        else:
            assert stalled.socket is not None
            with trio.fail_after(10):
                try:
                    while await stalled.socket.receive_some(65536):
                        pass
                except (trio.BrokenResourceError, OSError):
                    pass  # a reset is an end too
        await stalled.aclose()
        nursery.cancel_scope.cancel()


# What releases a stalled client, and the settings that make only that act.
RELEASES = {
    # The queue holds every event: only the write deadline can release it.
    "write-deadline": ({"subscriber_buffer": 1000, "subscriber_write_timeout": 1.0}, 1.25),
    # The deadline is far away: the full queue must release it at once.
    "queue-events": ({"subscriber_buffer": 16, "subscriber_write_timeout": 60.0}, 0.0),
    # 1,000 events may queue, but not 512 KiB of them: the byte bound acts.
    "queue-bytes": (
        {
            "subscriber_buffer": 1000,
            "subscriber_buffer_bytes": 512 * 1024,
            "subscriber_write_timeout": 60.0,
        },
        0.0,
    ),
}


@pytest.mark.parametrize("release", list(RELEASES))
@pytest.mark.parametrize("way", WAYS)
async def test_stalled_client_is_released(
    way: str, release: str, ca: trustme.CA, tls_files: dict[str, str]
) -> None:
    settings, within = RELEASES[release]
    with trio.fail_after(60):
        async with harness(way, ca, tls_files, **settings) as h:
            await stall_and_check_release(h, events=120, within=within)


@pytest.mark.parametrize("way", ["sse", "sse-tls", "sse-h2"])
async def test_idle_sse_stream_gets_heartbeats(
    way: str, ca: trustme.CA, tls_files: dict[str, str]
) -> None:
    """One heartbeat clock for every SSE path: an idle stream gets ``:heartbeat``."""
    with trio.fail_after(20):
        async with harness(way, ca, tls_files, sse_heartbeat_interval=0.3) as h:
            client = Stalled(h, "idle")
            await client.open()
            started = trio.current_time()
            await client.read_until(b":heartbeat\n\n")
            assert trio.current_time() - started >= 0.25
            await client.aclose()


async def _last_id(h: Harness, client: httpx.AsyncClient) -> str:
    figures = await h.figures(client)
    last: str = figures["last_event_id"]
    return last


@pytest.mark.parametrize("way", WAYS)
async def test_resume_sends_what_was_missed_in_order_then_live(
    way: str, ca: trustme.CA, tls_files: dict[str, str]
) -> None:
    with trio.fail_after(30):
        async with harness(way, ca, tls_files) as h, h.client() as client:
            await h.publish(client, "r", 0)
            first = await _last_id(h, client)
            ids = []
            for n in range(1, 6):
                await h.publish(client, "r:sub", n)
                ids.append(await _last_id(h, client))
                await h.publish(client, "other", -n)  # not subscribed: never sent
            got: list[tuple[str, str]] = []
            async with trio.open_nursery() as nursery:
                await nursery.start(partial_read(h, "r", got, first))
                await wait_until(lambda: len(got) >= 5, 10, "the replay")
                await h.publish(client, "r", 6)
                await h.publish(client, "r", "end")  # what comes before it is all
                await wait_until(lambda: bool(got) and got[-1][1] == '"end"', 10, "the marker")
                nursery.cancel_scope.cancel()
            assert got.pop() == (await _last_id(h, client), '"end"')
            assert [data for _, data in got] == ["1", "2", "3", "4", "5", "6"]
            assert [event_id for event_id, _ in got[:5]] == ids
            assert len({event_id for event_id, _ in got}) == 6  # no duplicates


def partial_read(h: Harness, topic: str, got: list[tuple[str, str]], last_id: str) -> Any:
    async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await read_all(h, topic, got, last_event_id=last_id, task_status=task_status)

    return run


@pytest.mark.parametrize("way", WAYS)
async def test_gap_notice_for_an_id_the_history_cannot_place(
    way: str, ca: trustme.CA, tls_files: dict[str, str]
) -> None:
    with trio.fail_after(30):
        async with harness(way, ca, tls_files, history_size=3) as h, h.client() as client:
            for n in range(5):
                await h.publish(client, "g", n)
            newest = await _last_id(h, client)
            epoch, _, seq = newest.partition("-")
            oldest = f"{epoch}-{int(seq) - 2}"
            got: list[tuple[str, str]] = []
            async with trio.open_nursery() as nursery:
                # Too old for a history of 3: the gap, then the 3 held, then live.
                await nursery.start(partial_read(h, "g", got, f"{epoch}-1"))
                await wait_until(lambda: len(got) >= 4, 10, "gap and replay")
                await h.publish(client, "g", 5)
                await wait_until(lambda: len(got) >= 5, 10, "live")
                nursery.cancel_scope.cancel()
            assert got[0][0] == "plasma-gap"
            assert json.loads(got[0][1]) == {"requested": f"{epoch}-1", "oldest": oldest}
            assert [data for _, data in got[1:]] == ["2", "3", "4", "5"]
            got.clear()
            async with trio.open_nursery() as nursery:
                # An id from another run: the gap and nothing replayed.
                await nursery.start(partial_read(h, "g", got, "1-1"))
                await wait_until(lambda: len(got) >= 1, 10, "gap")
                await h.publish(client, "g", 6)
                await wait_until(lambda: len(got) >= 2, 10, "live")
                nursery.cancel_scope.cancel()
            assert got[0][0] == "plasma-gap"
            assert json.loads(got[0][1])["requested"] == "1-1"
            assert got[1][1] == "6"


async def test_grpc_second_request_never_repeats_an_event(
    ca: trustme.CA, tls_files: dict[str, str]
) -> None:
    """A later Request with lastEventId replays what matches its topics and
    was not sent yet on this stream; what was sent is never sent again."""
    with trio.fail_after(30):
        async with harness("grpc", ca, tls_files) as h, h.client() as client:
            await h.publish(client, "a", 0)
            start = await _last_id(h, client)
            await h.publish(client, "a", 1)
            await h.publish(client, "b", 2)
            await h.publish(client, "a", 3)
            stream = GrpcioStream(h.srv.grpc_port)
            try:
                stream.send("a", last_event_id=start)
                got = [(await stream.receive()).data for _ in range(2)]
                assert got == ["1", "3"]
                # Now a and b, from the same id: only b's event is new.
                stream.send("a", "b", last_event_id=start)
                assert (await stream.receive()).data == "2"
                await h.publish(client, "a", 4)
                await h.publish(client, "b", 5)
                assert [(await stream.receive()).data for _ in range(2)] == ["4", "5"]
                # Once more, from the very start: everything was sent already.
                stream.send("a", "b", last_event_id=start)
                await h.publish(client, "b", 6)
                assert (await stream.receive()).data == "6"
            finally:
                stream.close()


async def test_gap_payload_shape_over_grpc(ca: trustme.CA, tls_files: dict[str, str]) -> None:
    """The gap notice is a Payload of type plasma-gap, with an empty id (SPEC 3)."""
    async with harness("grpc", ca, tls_files) as h, h.client() as client:
        await h.publish(client, "z", 1)
        h2 = await RawH2.connect(h.srv.grpc_port, window=65535)
        try:
            stream_id = await h2.request(
                "/proto.StreamService/Events",
                grpc_headers(f"localhost:{h.srv.grpc_port}"),
                grpc_request("z", last_event_id="7-7"),
            )
            with trio.fail_after(10):
                while len(h2.data.get(stream_id, b"")) < 5:
                    await h2.read_once()
                data = bytes(h2.data[stream_id])
                length = int.from_bytes(data[1:5], "big")
                while len(h2.data[stream_id]) < 5 + length:
                    await h2.read_once()
            payload = Payload.parse(bytes(h2.data[stream_id])[5 : 5 + length])
            assert payload.event_type.type == "plasma-gap"
            assert payload.id == ""
            assert json.loads(payload.data)["requested"] == "7-7"
        finally:
            await h2.aclose()


# -- a resume storm ------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("way", WAYS)
async def test_resume_storm_keeps_memory_bounded(way: str, tmp_path: Path) -> None:
    """300 clients resume 2,000 missed events of 4 KB each (8 MB of history)
    and then read nothing: the replay is streamed as each client drains, so
    the server holds a small batch per client, not a copy of the history per
    client (that would be 2.4 GB). /hc keeps answering meanwhile."""
    clients, events, size = 300, 2000, 4096
    server = start_server(
        tmp_path,
        tls=way in ("sse-tls", "sse-h2"),
        PLASMA_HISTORY_SIZE=str(events),
        PLASMA_SUBSCRIBER_WRITE_TIMEOUT="10m",
    )
    context = server.client_context
    opened: list[Any] = []
    try:
        with trio.fail_after(120):
            async with httpx.AsyncClient(verify=context or True, timeout=20) as client:
                pad = "y" * size
                first = ""
                for n in range(events):
                    body = json.dumps({"meta": {"type": "storm"}, "data": {"n": n, "pad": pad}})
                    response = await client.post(f"{server.url}/debug", content=body)
                    assert response.status_code == 200
                    if not first:
                        metrics = f"http://127.0.0.1:{server.ports['metrics']}/metrics/plasma"
                        first = (await client.get(metrics)).json()["last_event_id"]
                baseline = server.rss()
                for _ in range(clients):
                    opened.append(await _resume_stalled(server, way, first))  # noqa: PERF401
                # Every replay has started (each client saw its first event).
                response = await client.get(f"{server.url}/hc", timeout=1)
                assert response.status_code == 200
                metrics = f"http://127.0.0.1:{server.ports['metrics']}/metrics/plasma"
                figures = (await client.get(metrics)).json()
                transport = "grpc" if way == "grpc" else "sse"
                assert figures[f"connections_{transport}"] == clients
                grown = server.rss() - baseline
                # Measured on 2 cores: sse 23 MB, sse-tls 105 MB (TLS and
                # Quart per connection), sse-h2 64 MB, grpc 18 MB. A copy of
                # the history per client would be 300 x 8 MB = 2.4 GB.
                assert grown < 200 * 1024 * 1024, grown
    finally:
        for conn in opened:
            await conn.aclose()
        stop_server(server)


async def _resume_stalled(server: Server, way: str, last_id: str) -> Any:
    """One client that resumes from ``last_id``, reads until its replay has
    begun (the start of its first event), then reads nothing more."""
    context = server.client_context
    if context is not None:
        # ALPN decides the protocol: HTTP/2 for sse-h2, HTTP/1.1 for sse-tls.
        context.set_alpn_protocols(["h2"] if way == "sse-h2" else ["http/1.1"])
    if way in ("sse-h2", "grpc"):
        port = server.ports["main" if way == "sse-h2" else "grpc"]
        h2 = await RawH2.connect(port, context=context)
        if way == "grpc":
            stream_id = await h2.request(
                "/proto.StreamService/Events",
                grpc_headers(f"localhost:{port}"),
                grpc_request("storm", last_event_id=last_id),
            )
        else:
            stream_id = await h2.request(
                "/?eventType=storm", sse_headers(f"localhost:{port}", last_event_id=last_id)
            )
        marker = b"" if way == "grpc" else b"data:"
        with trio.fail_after(30):
            while not (h2.data.get(stream_id) and marker in h2.data[stream_id]):
                await h2.read_once()
                assert not h2.closed, "closed before the replay began"
        return h2
    stream = await open_stalled_sse(
        server.ports["main"], "eventType=storm", last_event_id=last_id, tls_context=context
    )
    await read_raw_until(stream, b"data:", timeout=30)
    return stream


@pytest.mark.parametrize("way", WAYS)
async def test_live_gap_notice_after_a_redis_outage(
    way: str, ca: trustme.CA, tls_files: dict[str, str], redis_server: RedisServer
) -> None:
    """Redis restarts under connected subscribers: what was published while
    the server was not subscribed is gone, so every subscriber is told once
    (the id it last got, the id of the next event), before the next event,
    on every way; then delivery goes on."""
    settings = {
        "subscriber_type": "redis",
        "subscriber_redis_addr": redis_server.addr,
        "subscriber_redis_channels": ("loss",),
        "subscriber_redis_timeout": 0.5,
        "subscriber_redis_retry_interval": 0.1,
        "subscriber_redis_over_max_retry_behavior": "alive",
    }
    got: list[tuple[str, str]] = []
    with trio.fail_after(60):
        async with (
            harness(way, ca, tls_files, **settings) as h,
            h.client() as client,
            trio.open_nursery() as nursery,
        ):
            await nursery.start(read_all, h, "topic", got)  # subscribed
            await h.publish(client, "topic", "warm")
            await wait_until(lambda: len(got) == 1, 10, "the warm-up event")
            before = len(got)
            last_id = got[-1][0]

            async def redis_connected() -> bool:
                return bool((await h.figures(client))["redis_connected"])

            redis_server.stop()
            while await redis_connected():
                await trio.sleep(0.05)
            redis_server.start()
            while not await redis_connected() or (await h.figures(client))["source_losses"] < 1:
                await trio.sleep(0.05)
            await h.publish(client, "topic", "after")
            await h.publish(client, "topic", "end")  # what comes before it is all
            await wait_until(lambda: got[-1][1] == '"end"', 10, "the notice and the events")
            # A client that left before the outage and resumes now missed
            # what it lost too: the gap notice, then what is held after it.
            resumed: list[tuple[str, str]] = []
            await nursery.start(partial(read_all, h, "topic", resumed, last_event_id=last_id))
            await wait_until(lambda: bool(resumed) and resumed[-1][1] == '"end"', 10, "the resume")
            nursery.cancel_scope.cancel()
    assert [kind for kind, _ in resumed] == ["plasma-gap", *(event_id for event_id, _ in got[-2:])]
    figures_after = got[before:-1]
    assert len(figures_after) == 2, figures_after
    (kind, notice), (next_id, data) = figures_after
    assert kind == "plasma-gap"
    assert json.loads(notice) == {"requested": last_id, "oldest": next_id}
    assert json.loads(data) == "after"
