"""Batched fan-out (issue 23), on every path a subscriber arrives by.

A burst published to Redis in one pipeline is one batch: each subscriber
gets it in one write, which a raw client sees as one read, in order, with
ids. Everything else stays exact per event: order across batch boundaries,
the bound (a slow subscriber inside a batch is cut off alone), a resume
followed by a batch, the live gap notice between two batches.

The clients are raw (a socket, TLS on a socket, the ``h2`` state machine for
HTTP/2 and gRPC), so that what one read brought is visible.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Final

import pytest
import trio

from plasma_trio._proto.proto import Payload
from tests.h2_raw import RawH2, grpc_headers, grpc_request, sse_headers
from tests.helpers import wait_for_figures
from tests.redis_server import RedisServer
from tests.server_process import Server, start_server, stop_server
from tests.streams import open_stalled_sse

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

PATHS: Final = ("sse", "sse-tls", "sse-h2", "grpc")
CHANNEL: Final = "plasma"

# An event as a client sees it: its id (or "gap"), and its data's JSON text.
Item = tuple[str, str]

_FRAME = re.compile(rb"(?:id: ([^\n]+)\n)?(?:event: ([^\n]+)\n)?data: ([^\n]*)\n\n")


def wire(topic: str, n: int, pad: int = 0) -> str:
    return json.dumps({"meta": {"type": topic}, "data": {"n": n, "pad": "x" * pad}})


def parse_sse(buffer: bytes) -> tuple[list[Item], bytes]:
    """The complete SSE events in ``buffer`` (HTTP/1.1 chunk lines between
    them are passed over), and what is left after the last one."""
    items: list[Item] = []
    end = 0
    for match in _FRAME.finditer(buffer):
        id_, kind, data = match.groups()
        end = match.end()
        if kind == b"plasma-gap":
            items.append(("gap", data.decode()))
        elif id_ is not None:
            items.append((id_.decode(), data.decode()))
    return items, buffer[end:]


def numbers(items: list[Item]) -> list[int]:
    return [json.loads(data)["data"]["n"] for id_, data in items if id_ != "gap"]


def seqs(items: list[Item]) -> list[int]:
    return [int(id_.rsplit("-", 1)[1]) for id_, _ in items if id_ != "gap"]


class Client:
    """A raw subscriber on one path: :meth:`read` is one network read, and
    what it completed, parsed (``reads`` keeps every read's items)."""

    def __init__(self) -> None:
        self.reads: list[list[Item]] = []
        self.items: list[Item] = []

    async def read(self) -> list[Item]:
        raise NotImplementedError

    async def aclose(self) -> None:
        raise NotImplementedError

    def record(self, items: list[Item]) -> list[Item]:
        if items:
            self.reads.append(items)
            self.items += items
        return items

    async def read_until(self, count: int, timeout: float = 10) -> list[Item]:
        """Read until ``count`` items arrived in all; all of them."""
        with trio.move_on_after(timeout):
            while len(self.items) < count:
                await self.read()
            return self.items
        pytest.fail(f"{len(self.items)} of {count} items within {timeout} s: {self.items[-3:]}")


class SseClient(Client):
    """HTTP/1.1 SSE on a socket (TLS over it for ``sse-tls``)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        super().__init__()
        self.stream = stream
        self.buffer = b""
        self.subscribed = False

    async def read(self) -> list[Item]:
        data = await self.stream.receive_some(1 << 20)
        if not data:
            raise EOFError("the server closed the stream")
        self.buffer += data
        return self.take()

    def take(self) -> list[Item]:
        """The events completed in the buffer (after the stream's retry block)."""
        if not self.subscribed:
            if b"retry:" not in self.buffer:
                return []
            self.subscribed = True
            self.buffer = self.buffer[self.buffer.index(b"retry:") :]
        items, self.buffer = parse_sse(self.buffer)
        return self.record(items)

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


class H2Client(Client):
    """SSE over HTTP/2 (TLS) or gRPC (plain HTTP/2), with the ``h2`` state machine."""

    def __init__(self, h2: RawH2, stream_id: int, grpc: bool) -> None:
        super().__init__()
        self.h2 = h2
        self.stream_id = stream_id
        self.grpc = grpc
        self.buffer = b""  # SSE: what is not parsed yet
        self.subscribed = grpc  # SSE: once its retry block arrived
        self.taken = 0  # gRPC: messages parsed so far

    async def read(self) -> list[Item]:
        before = len(self.h2.data.get(self.stream_id, b""))
        await self.h2.read_once()
        if self.h2.closed:
            raise EOFError("the server closed the connection")
        data = bytes(self.h2.data.get(self.stream_id, b""))[before:]
        if not self.grpc:
            self.buffer += data
            if not self.subscribed:
                if b"retry:" not in self.buffer:
                    return []
                self.subscribed = True
            items, self.buffer = parse_sse(self.buffer)
            return self.record(items)
        messages = self.h2.messages(self.stream_id)[self.taken :]
        self.taken += len(messages)
        parsed: list[Item] = []
        for message in messages:
            payload = Payload.parse(message)
            if payload.event_type is not None and payload.event_type.type == "plasma-gap":
                parsed.append(("gap", payload.data))
            else:  # (its data as SSE's: the event's data member)
                parsed.append((payload.id, '{"data":' + payload.data + "}"))
        return self.record(parsed)

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.h2.stream)


async def subscribe(
    server: Server, path: str, topic: str, *, last_id: str = "", stalled: bool = False
) -> Client:
    """A subscriber of ``topic`` on ``path``, subscribed when this returns
    (SSE: its retry block arrived; gRPC: its response headers did).
    ``stalled``: one that never reads (a tiny window or receive buffer)."""
    context = server.client_context
    if path in ("sse", "sse-tls"):
        tls = context if path == "sse-tls" else None
        stream = await open_stalled_sse(
            server.ports["main"],
            f"eventType={topic}",
            last_event_id=last_id,
            rcvbuf=4096 if stalled else 1 << 20,
            tls_context=tls,
        )
        client: Client = SseClient(stream)
    else:
        grpc = path == "grpc"
        port = server.ports["grpc" if grpc else "main"]
        window = 1024 if stalled else 1 << 24
        h2 = await RawH2.connect(
            port,
            context=None if grpc else context,
            window=window,
            rcvbuf=4096 if stalled else 1 << 20,
        )
        h2.ack = not stalled
        if not stalled:
            h2.grant((1 << 24) - 65535)  # the connection's window too
        authority = f"localhost:{port}"
        if grpc:
            stream_id = await h2.request(
                "/proto.StreamService/Events",
                grpc_headers(authority),
                grpc_request(topic, last_event_id=last_id),
            )
        else:
            stream_id = await h2.request(f"/?eventType={topic}", sse_headers(authority, last_id))
        client = H2Client(h2, stream_id, grpc)
    if stalled:
        await trio.sleep(0.3)  # (no reads: its subscription is checked by the caller)
        return client
    with trio.fail_after(10):
        if isinstance(client, SseClient):
            while not client.subscribed:
                await client.read()
        else:
            assert isinstance(client, H2Client)
            while not (client.h2.answered(client.stream_id) and client.subscribed):
                await client.read()
    return client


@pytest.fixture(params=PATHS)
def path(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def serve(tmp_path: Path, path: str, redis: RedisServer, **overrides: str) -> Server:
    return start_server(
        tmp_path,
        tls=path in ("sse-tls", "sse-h2"),
        PLASMA_SUBSCRIBER_TYPE="redis",
        PLASMA_SUBSCRIBER_REDIS_ADDR=redis.addr,
        PLASMA_SUBSCRIBER_REDIS_CHANNELS=CHANNEL,
        PLASMA_SUBSCRIBER_REDIS_TIMEOUT="1s",
        PLASMA_SUBSCRIBER_REDIS_RETRY_INTERVAL="100ms",
        PLASMA_SUBSCRIBER_REDIS_OVER_MAX_RETRY_BEHAVIOR="alive",
        **overrides,
    )


@pytest.fixture
async def plain(tmp_path: Path, path: str, redis_server: RedisServer) -> AsyncIterator[Server]:
    server = serve(tmp_path, path, redis_server)
    try:
        yield server
    finally:
        stop_server(server)


async def burst(redis: RedisServer, topic: str, numbers: range, pad: int = 0) -> None:
    messages = [wire(topic, n, pad) for n in numbers]
    await trio.to_thread.run_sync(redis.publish_burst, CHANNEL, messages)


async def test_a_burst_reaches_a_raw_client_in_one_read_in_order(
    plain: Server, path: str, redis_server: RedisServer
) -> None:
    client = await subscribe(plain, path, "burst")
    try:
        await burst(redis_server, "burst", range(50))
        items = await client.read_until(50)
        assert numbers(items) == list(range(50))
        ids = seqs(items)
        assert ids == list(range(ids[0], ids[0] + 50)), "ids in publish order, none missing"
        assert len(client.reads) == 1, [len(r) for r in client.reads]
    finally:
        await client.aclose()


async def test_order_holds_across_batch_boundaries(
    plain: Server, path: str, redis_server: RedisServer
) -> None:
    # 700 events in one pipeline: more than one batch holds (BATCH_EVENTS),
    # so they go out as several, back to back.
    first, second = await subscribe(plain, path, "order"), await subscribe(plain, path, "order:x")
    try:
        await burst(redis_server, "order:x", range(700), pad=100)
        for client in (first, second):
            items = await client.read_until(700)
            assert numbers(items) == list(range(700))
            ids = seqs(items)
            assert ids == list(range(ids[0], ids[0] + 700))
            assert len(client.reads) < 700 // 4, "batched: far fewer reads than events"
    finally:
        await first.aclose()
        await second.aclose()


async def test_a_slow_subscriber_inside_a_batch_is_cut_off_alone(
    tmp_path: Path, path: str, redis_server: RedisServer
) -> None:
    server = serve(tmp_path, path, redis_server, PLASMA_SUBSCRIBER_BUFFER="64")
    transport = "grpc" if path == "grpc" else "sse"
    metrics = server.ports["metrics"]
    try:
        healthy = await subscribe(server, path, "slow")
        stalled = await subscribe(server, path, "slow", stalled=True)
        await wait_for_figures(
            metrics, lambda f: f.get(f"connections_{transport}") == 2, what="both subscribed"
        )
        try:
            # Events of 2 KB: a batch of 40 fills the stalled client's socket
            # (or window) and leaves most of it queued, within the bound of 64.
            await burst(redis_server, "slow", range(40), pad=2000)
            assert numbers(await healthy.read_until(40)) == list(range(40))
            figures = await wait_for_figures(
                metrics, lambda f: f.get("events_queued", 0) >= 80, what="both offered all 40"
            )
            assert figures[f"subscribers_cut_off_{transport}"] == 0
            # The next batch takes the stalled one over the bound inside it.
            await burst(redis_server, "slow", range(40, 80), pad=2000)
            assert numbers(await healthy.read_until(80)) == list(range(80))
            await wait_for_figures(
                metrics,
                lambda f: (
                    f.get(f"subscribers_cut_off_{transport}") == 1
                    and f.get(f"connections_{transport}") == 1
                ),
                what="the stalled subscriber cut off, the other still connected",
            )
            # The healthy one goes on.
            await burst(redis_server, "slow", range(80, 90))
            assert numbers(await healthy.read_until(90)) == list(range(90))
        finally:
            await healthy.aclose()
            await stalled.aclose()
    finally:
        stop_server(server)


async def test_a_resume_then_a_burst(plain: Server, path: str, redis_server: RedisServer) -> None:
    first = await subscribe(plain, path, "resume")
    try:
        await burst(redis_server, "resume", range(10))
        seen = await first.read_until(10)
    finally:
        await first.aclose()
    # Resume after the fourth; a burst follows at once.
    client = await subscribe(plain, path, "resume", last_id=seen[3][0])
    try:
        await burst(redis_server, "resume", range(10, 60))
        items = await client.read_until(56)
        assert numbers(items) == list(range(4, 60)), "the replay, then the burst, nothing twice"
        assert "gap" not in [id_ for id_, _ in items]
    finally:
        await client.aclose()


async def test_the_gap_notice_between_two_bursts(
    plain: Server, path: str, redis_server: RedisServer
) -> None:
    client = await subscribe(plain, path, "gap")
    try:
        await burst(redis_server, "gap", range(20))
        before = await client.read_until(20)
        redis_server.stop()  # an outage: pub/sub loses what is published meanwhile
        redis_server.start()
        await wait_for_figures(
            plain.ports["metrics"],
            lambda f: f.get("source_losses", 0) >= 1,
            what="the source's loss announced",
        )
        await burst(redis_server, "gap", range(20, 40))
        items = await client.read_until(41)
        assert numbers(items) == list(range(40))
        notice = items[20]
        assert notice[0] == "gap", items[18:23]
        gap = json.loads(notice[1])
        assert gap["requested"] == before[19][0]
        assert gap["oldest"] == items[21][0]
    finally:
        await client.aclose()
