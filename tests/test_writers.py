"""Each writer on its own, behind a real Session and Hub, with no server.

The socket writer's own test is in test_frontdoor.py (a trickling reader on a
socketpair reaches the bound); here the Hypercorn response writer (its body
driven as Quart would drive it, one step at a time) and the gRPC stream
writer before its stream is attached (what waits in the session's outbox).
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import trio

from plasma_trio.core.events import Event
from plasma_trio.hub import Hub
from plasma_trio.session import Ask, Ending, Outbox, Phase, Session, admit
from plasma_trio.transports.grpc import grpc_status
from plasma_trio.transports.grpc_writer import GrpcWriter
from plasma_trio.transports.sse_hypercorn import ResponseWriter
from plasma_trio.transports.wire import sse_status
from tests.helpers import make_config


def sse_session(hub: Hub, **overrides: Any) -> Session:
    return admit(hub, make_config(**overrides), Ask("sse", sse_status, ("t",)))


def outbox(session: Session) -> Outbox:
    assert session.out is not None
    return session.out


async def step(body: Any) -> bytes:
    """One write of the body: what Hypercorn would send next."""
    with trio.fail_after(5):
        data: bytes = await body.__anext__()
    return data


async def test_the_response_body_writes_retry_then_batches_live_events() -> None:
    hub = Hub(transports=("sse",))
    session = sse_session(hub)
    writer = ResponseWriter(session, None, {})
    body = writer.body(make_config())
    assert await step(body) == b"retry: 2000\n\n"  # subscribed from here on
    for n in range(3):
        await hub.publish(Event("t", str(n).encode()))
    assert session.queue_depth == 3
    batch = await step(body)  # one write for everything queued
    assert batch.count(b"data: ") == 3
    assert batch.index(b'"data":0') < batch.index(b'"data":1') < batch.index(b'"data":2')
    assert hub.statistics().events_delivered["sse"] == 0  # not until Hypercorn took it
    session.heartbeat()  # idle: the watcher's heartbeat
    assert await step(body) == b":heartbeat\n\n"
    assert hub.statistics().events_delivered["sse"] == 3
    await body.aclose()
    assert hub.statistics().connections["sse"] == 0


async def test_the_response_body_puts_the_live_gap_notice_in_order() -> None:
    hub = Hub(epoch=9)
    session = sse_session(hub)
    writer = ResponseWriter(session, None, {})
    body = writer.body(make_config())
    await step(body)
    await hub.publish(Event("t"))  # 9-1
    await hub.announce_loss()
    await hub.publish(Event("t"))  # 9-2
    batch = await step(body)
    first, notice, second = (
        batch.index(b"id: 9-1"),
        batch.index(b"plasma-gap"),
        batch.index(b"id: 9-2"),
    )
    assert first < notice < second
    assert b'"requested":"9-1"' in batch
    await body.aclose()


async def test_a_cut_off_response_stops_at_its_next_step() -> None:
    hub = Hub()
    session = sse_session(hub, subscriber_buffer=2)
    writer = ResponseWriter(session, None, {})
    body = writer.body(make_config())
    await step(body)
    for _ in range(3):  # the third is over the bound: the hub cuts it off
        await hub.publish(Event("t"))
    assert outbox(session).phase is Phase.CUT_OFF
    assert session.ending is Ending.CUT_OFF
    with pytest.raises(StopAsyncIteration):
        await step(body)  # nothing of what was queued: the client is behind
    assert hub.statistics().cut_off["sse"] == 1


async def test_at_shutdown_the_response_sends_what_is_queued_then_ends() -> None:
    hub = Hub()
    session = sse_session(hub)
    writer = ResponseWriter(session, None, {})
    body = writer.body(make_config())
    await step(body)
    await hub.publish(Event("t", b"1"))
    hub.close()
    assert outbox(session).phase is Phase.ENDING
    assert b'"data":1' in await step(body)
    with pytest.raises(StopAsyncIteration):
        await step(body)
    assert session.ending is Ending.SHUTDOWN


async def test_shutdown_between_head_and_body_ends_an_empty_200_logged_as_such(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Quart has sent the head (200) when the body starts: if shutdown began
    since admission, the stream ends empty, and the access-log line says 200
    (what the client saw) with the refusal as the ending."""
    caplog.set_level(logging.INFO, logger="plasma_trio.access")
    hub = Hub()
    session = sse_session(hub)
    body = ResponseWriter(session, None, {}).body(make_config())
    hub.close()
    with pytest.raises(StopAsyncIteration):
        await step(body)
    [line] = [r for r in caplog.records if r.name == "plasma_trio.access"]
    assert line.__dict__["status"] == 200
    assert line.__dict__["ending"] == "refused: server is shutting down"


def grpc_writer(hub: Hub, **overrides: Any) -> tuple[Session, GrpcWriter]:
    ask = Ask("grpc", grpc_status, require_topics=False)
    session = admit(hub, make_config(**overrides), ask)
    return session, GrpcWriter(session)


async def test_the_grpc_writer_before_its_headers_queues_under_the_bound() -> None:
    """Before its headers went out nothing is written: the outbox holds it,
    under the bound (events and notices count); over it the stream is cut off
    and, its bytes waiting for the client, released at once."""
    hub = Hub()
    session, writer = grpc_writer(hub, subscriber_buffer=3)
    released: list[bool] = []
    writer.release = lambda: released.append(True)
    with session.subscribed(writer):
        session.set_topics(frozenset({"t"}))
        await hub.publish(Event("t"))
        await hub.publish(Event("t"))
        await hub.announce_loss()
        assert session.queue_depth == 3
        assert session.stalled_since is not None
        assert released == []
        await hub.publish(Event("t"))  # over the bound
        assert session.ending is Ending.CUT_OFF
        assert outbox(session).phase is Phase.CUT_OFF
        assert released == [True]
    assert grpc_status(Ending.CUT_OFF, None) == "RESOURCE_EXHAUSTED"


async def test_the_grpc_writer_at_shutdown_keeps_what_is_queued() -> None:
    hub = Hub()
    session, writer = grpc_writer(hub)
    released: list[bool] = []
    writer.release = lambda: released.append(True)
    with session.subscribed(writer):
        session.set_topics(frozenset({"t"}))
        await hub.publish(Event("t"))
        hub.close()
        assert outbox(session).phase is Phase.ENDING
        assert session.queue_depth == 1  # still to be written, then the trailers
    assert released == []  # shutdown ends after what is queued: nothing released
    assert grpc_status(Ending.SHUTDOWN, None) == "OK"


async def test_a_grpc_stream_with_no_topics_gets_no_gap_notice() -> None:
    hub = Hub()
    session, writer = grpc_writer(hub)
    with session.subscribed(writer):
        await hub.announce_loss()  # before its first Request: nothing is sent
        assert session.queue_depth == 0
