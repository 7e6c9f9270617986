"""The gRPC fast path (``transports/grpc_direct.py``) on real sockets.

The client is the ``h2`` state machine on a trio socket (``tests/h2_raw.py``):
it checks every frame the server sends, flow control included (a DATA frame
beyond a window it granted is a ``FlowControlError``), and it controls
exactly when windows open and when it reads. Each test compares every
stream's received bytes with the expected gRPC messages, byte for byte: every
event once, in order, nothing else, whichever way (direct or through the
stream's own task) each message went.
"""

from __future__ import annotations

import json
import socket
import ssl as ssl_module
import struct
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import h2.errors
import h2.events
import pytest
import trio

from plasma_trio._proto.proto import EventType, Payload
from plasma_trio.core.events import Event
from tests.h2_raw import RawH2, grpc_headers, grpc_request
from tests.helpers import figures_of, running_server, wait_for_figure
from tests.test_session import harness

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    import trustme

    from plasma_trio.app import Running
    from plasma_trio.hub import StampedEvent

PATH = "/proto.StreamService/Events"
BIG_WINDOW = 1 << 24


def expected(events: list[StampedEvent]) -> bytes:
    """The gRPC messages a subscriber of these events must receive, in order
    (built here with betterproto2, independently of the server's framing)."""
    out = bytearray()
    for stamped in events:
        data = stamped.event.data
        payload = bytes(
            Payload(
                event_type=EventType(type=stamped.event.type),
                data=data.decode() if data is not None else "",
                id=stamped.id,
            )
        )
        out += struct.pack(">BI", 0, len(payload)) + payload
    return bytes(out)


async def open_streams(srv: Running, client: RawH2, topic: str, count: int) -> list[int]:
    """``count`` streams subscribed to ``topic`` (their response headers read)."""
    ids = [
        await client.request(PATH, grpc_headers(f"localhost:{srv.grpc_port}"), grpc_request(topic))
        for _ in range(count)
    ]
    await read_until(client, lambda: all(client.answered(i) for i in ids), 10)
    return ids


async def read_until(client: RawH2, done: Any, timeout: float = 20) -> None:
    with trio.fail_after(timeout):
        while not done():
            await client.read_once()
            assert not client.closed, "the server closed the connection"


async def publish(srv: Running, topic: str, count: int, pad: int = 50) -> list[StampedEvent]:
    out = []
    for n in range(count):
        data = json.dumps({"n": n, "pad": "x" * pad}).encode()
        out.append(await srv.hub.publish(Event(topic, data)))
    return out


@asynccontextmanager
async def tls_or_plain(
    tls: bool, ca: trustme.CA, tls_files: dict[str, str]
) -> AsyncIterator[tuple[Running, ssl_module.SSLContext | None]]:
    """The server, and the context that trusts it (``None`` without TLS)."""
    async with harness("sse-tls" if tls else "sse", ca, tls_files, debug=False) as h:
        yield h.srv, h.context


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
async def test_many_streams_on_two_connections_get_every_event_once_in_order(
    tls: bool, ca: trustme.CA, tls_files: dict[str, str]
) -> None:
    """100 streams on one connection and 1 on another, one topic: each event's
    frames for a connection go out together; every stream gets every event."""
    with trio.fail_after(60):
        async with tls_or_plain(tls, ca, tls_files) as (srv, context):
            many = await RawH2.connect(
                srv.grpc_port, context=context, window=BIG_WINDOW, rcvbuf=1 << 20
            )
            one = await RawH2.connect(srv.grpc_port, context=context, window=BIG_WINDOW)
            for client in (many, one):
                client.ack = True
                client.grant(BIG_WINDOW)
            streams = await open_streams(srv, many, "t", 100)
            single = await open_streams(srv, one, "t", 1)
            events = await publish(srv, "t", 200)
            want = expected(events)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    read_until,
                    many,
                    lambda: all(len(many.data.get(s, b"")) >= len(want) for s in streams),
                )
                nursery.start_soon(
                    read_until, one, lambda: len(one.data.get(single[0], b"")) >= len(want)
                )
            for s in streams:
                assert bytes(many.data[s]) == want
            assert bytes(one.data[single[0]]) == want
            assert (await figures_of(srv))["subscribers_cut_off_grpc"] == 0
            await many.aclose()
            await one.aclose()


async def test_stream_window_closes_mid_event_and_reopens(server: Running) -> None:
    """Stream windows of 500 bytes, never renewed at first: a message is cut
    at the window's edge (the stream's own task takes over), the rest waits;
    when the client opens the windows, everything follows, once, in order,
    and later events go direct again."""
    srv = server
    with trio.fail_after(30):
        client = await RawH2.connect(srv.grpc_port, window=500)
        client.grant(BIG_WINDOW)  # only the streams' windows are small
        streams = await open_streams(srv, client, "w", 3)
        events = await publish(srv, "w", 20)
        want = expected(events)
        assert len(want) > 500
        assert 500 % (len(want) // 20)  # the window's edge falls inside a message
        # (A byte beyond the window would fail in h2's flow control.)
        await read_until(client, lambda: all(len(client.data.get(s, b"")) >= 500 for s in streams))
        for s in streams:
            # Exactly the window: the server never overran it (h2 would have
            # raised), and used all of it.
            assert bytes(client.data[s]) == want[:500]
        client.ack = True
        for s in streams:
            client.grant(BIG_WINDOW, s)
        await client.flush()
        await read_until(client, lambda: all(len(client.data[s]) >= len(want) for s in streams))
        more = await publish(srv, "w", 20)
        want += expected(more)
        await read_until(client, lambda: all(len(client.data[s]) >= len(want) for s in streams))
        for s in streams:
            assert bytes(client.data[s]) == want
        assert (await figures_of(srv))["subscribers_cut_off_grpc"] == 0
        await client.aclose()


async def test_connection_window_closes_and_reopens(server: Running) -> None:
    """The connection's window (65,535 bytes, the HTTP/2 default) shared by 10
    streams with large windows of their own: the server stops within one
    message of the connection window, never beyond it, then delivers
    everything once the client renews it."""
    srv = server
    with trio.fail_after(30):
        client = await RawH2.connect(srv.grpc_port, window=BIG_WINDOW, rcvbuf=1 << 20)
        streams = await open_streams(srv, client, "c", 10)
        events = await publish(srv, "c", 60, pad=1000)
        want = expected(events)

        def received() -> int:
            return sum(len(client.data.get(s, b"")) for s in streams)

        # Whole messages while the window lasts: at least to one message short
        # of it (a byte beyond it would fail in h2's flow control).
        await read_until(client, lambda: received() > 65_535 - len(want) // 60)
        assert received() <= 65_535
        for s in streams:
            assert want.startswith(bytes(client.data.get(s, b"")))
        # A grant smaller than the next message: the server sends that much
        # of it (in pieces, through the stream's task) rather than waiting
        # for a grant the client may never make.
        client.grant(200)
        await client.flush()
        await read_until(client, lambda: received() == 65_535 + 200)
        client.ack = True
        client.grant(BIG_WINDOW)
        for s in streams:
            # What was read before acknowledging counts against the window too.
            client.conn.acknowledge_received_data(len(client.data.get(s, b"")), s)
        await client.flush()
        await read_until(client, lambda: all(len(client.data[s]) >= len(want) for s in streams))
        for s in streams:
            assert bytes(client.data[s]) == want
        assert (await figures_of(srv))["subscribers_cut_off_grpc"] == 0
        await client.aclose()


async def test_full_socket_then_drained(server: Running) -> None:
    """A client with a small receive buffer that stops reading: the server's
    socket buffer fills, writes are partial, the streams fall back to their
    own tasks; when the client reads again, every byte arrives, in order."""
    srv = server
    with trio.fail_after(40):
        # (A receive buffer below the loopback MSS would stall TCP itself:
        # the sender waits for zero-window probes, whatever the server.)
        client = await RawH2.connect(srv.grpc_port, window=BIG_WINDOW, rcvbuf=1 << 17)
        client.ack = True
        client.grant(BIG_WINDOW)
        await client.flush()
        streams = await open_streams(srv, client, "s", 4)
        events = await publish(srv, "s", 200, pad=8000)
        want = expected(events)
        assert len(want) * len(streams) > 6_000_000  # more than the kernel's buffers hold
        await read_until(
            client, lambda: all(len(client.data.get(s, b"")) >= len(want) for s in streams)
        )
        for s in streams:
            assert bytes(client.data[s]) == want
        assert (await figures_of(srv))["subscribers_cut_off_grpc"] == 0
        await client.aclose()


async def test_stream_reset_mid_event_leaves_the_others(server: Running) -> None:
    """One stream stalls inside a message (its window), then the client resets
    it: the other streams on the connection get every event, the connection
    stays up, and the reset stream is forgotten; no internal error."""
    srv = server
    with trio.fail_after(30):
        client = await RawH2.connect(srv.grpc_port, window=500)
        client.ack = True
        client.grant(BIG_WINDOW)
        victim, *others = await open_streams(srv, client, "r", 3)
        for s in others:
            client.grant(BIG_WINDOW, s)
        await client.flush()
        events = await publish(srv, "r", 30)
        await read_until(client, lambda: len(client.data.get(victim, b"")) >= 500)
        # The victim's window is renewed by acks only as fast as it reads:
        # stop acking it by resetting it now, mid-message.
        assert len(expected(events)) > len(client.data[victim])
        client.conn.reset_stream(victim, h2.errors.ErrorCodes.CANCEL)
        await client.flush()
        await wait_for_figure(srv, "connections_grpc", 2)  # the reset stream forgotten
        events += await publish(srv, "r", 30)
        want = expected(events)
        await read_until(
            client, lambda: all(len(client.data.get(s, b"")) >= len(want) for s in others)
        )
        for s in others:
            assert bytes(client.data[s]) == want
        assert not any(isinstance(e, h2.events.ConnectionTerminated) for e in client.events)
        await client.aclose()
    figs = await figures_of(srv)
    assert figs["connection_errors_internal"] == 0
    assert figs["subscribers_cut_off_grpc"] == 0


async def test_connection_closed_mid_frame(server: Running) -> None:
    """A client that stops reading with frames half-written, then resets its
    connection: the server drops that connection alone, another client on
    its own connection gets every event, and no internal error is counted."""
    srv = server
    with trio.fail_after(40):
        healthy = await RawH2.connect(srv.grpc_port, window=BIG_WINDOW, rcvbuf=1 << 20)
        healthy.ack = True
        healthy.grant(BIG_WINDOW)
        victim = await RawH2.connect(srv.grpc_port, window=BIG_WINDOW, rcvbuf=1 << 17)
        victim.grant(BIG_WINDOW)
        await victim.flush()
        (good,) = await open_streams(srv, healthy, "m", 1)
        await open_streams(srv, victim, "m", 2)
        async with trio.open_nursery() as nursery:
            events: list[StampedEvent] = []

            async def publisher() -> None:
                events.extend(await publish(srv, "m", 60, pad=8000))
                # The victim's socket is full by now (it never reads): reset
                # its connection with a frame half-written.
                sock = victim.stream.socket  # type: ignore[attr-defined]
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                await victim.aclose()
                events.extend(await publish(srv, "m", 60, pad=8000))

            nursery.start_soon(publisher)
            await read_until(
                healthy,
                lambda: (
                    len(events) == 120 and len(healthy.data.get(good, b"")) >= len(expected(events))
                ),
            )
        assert bytes(healthy.data[good]) == expected(events)
        await wait_for_figure(srv, "connections_grpc", 1)  # the victim forgotten
        await healthy.aclose()
    figs = await figures_of(srv)
    assert figs["connection_errors_internal"] == 0


async def test_pings_and_window_updates_on_a_live_connection(server: Running) -> None:
    """What a receiving gRPC client sends (PING, WINDOW_UPDATE; the server
    takes a read of only those without h2's general path): every PING is
    acknowledged with its data, the windows open, events keep flowing."""
    srv = server
    with trio.fail_after(20):
        client = await RawH2.connect(srv.grpc_port, window=600)
        (stream,) = await open_streams(srv, client, "p", 1)
        events = await publish(srv, "p", 10)
        want = expected(events)
        assert len(want) > 600
        await read_until(client, lambda: len(client.data.get(stream, b"")) >= 600)
        assert bytes(client.data[stream]) == want[:600]
        for n in range(5):
            client.conn.ping(b"ping-%03d" % n)
            client.grant(100, stream)
            await client.flush()
        await read_until(
            client,
            lambda: (
                len([e for e in client.events if isinstance(e, h2.events.PingAckReceived)]) == 5
            ),
        )
        acks = [e.ping_data for e in client.events if isinstance(e, h2.events.PingAckReceived)]
        assert acks == [b"ping-%03d" % n for n in range(5)]
        client.ack = True
        client.grant(BIG_WINDOW, stream)
        await client.flush()
        await read_until(client, lambda: len(client.data[stream]) >= len(want))
        assert bytes(client.data[stream]) == want
        await client.aclose()


async def test_a_slow_but_steady_client_is_never_cut_off() -> None:
    """Ten streams wait for their connection's window, which the client opens
    a little at a time for longer than the write deadline: every stream
    moves at every grant, none is cut off, every byte arrives in order."""
    with trio.fail_after(40):
        async with running_server(subscriber_write_timeout=1.0) as srv:
            client = await RawH2.connect(srv.grpc_port, window=BIG_WINDOW, rcvbuf=1 << 20)
            streams = await open_streams(srv, client, "d", 10)
            events = await publish(srv, "d", 40, pad=1000)
            want = expected(events)
            assert len(want) * len(streams) > 65_535 * 5
            started = trio.current_time()
            while any(len(client.data.get(s, b"")) < len(want) for s in streams):
                client.grant(16_384)  # the connection's window only, a bit at a time
                await client.flush()
                with trio.move_on_after(0.1):
                    while True:
                        await client.read_once()
                        assert not client.closed
            assert trio.current_time() - started > 2.0  # longer than the deadline
            for s in streams:
                assert bytes(client.data[s]) == want
            assert (await figures_of(srv))["subscribers_cut_off_grpc"] == 0
            await client.aclose()


async def test_nothing_reaches_a_stream_before_its_first_request(server: Running) -> None:
    """A loss announced while a stream has not sent its first Request: it is
    sent nothing (not even headers); after its Request, it is served."""
    srv = server
    with trio.fail_after(20):
        client = await RawH2.connect(srv.grpc_port, window=BIG_WINDOW)
        silent = client.conn.get_next_available_stream_id()
        client.conn.send_headers(silent, [(":path", PATH), *grpc_headers("localhost")])
        await client.flush()
        await wait_for_figure(srv, "connections_grpc", 1)
        await srv.hub.announce_loss()
        # A PING's answer: what the server had for this connection by then has come.
        client.conn.ping(b"loss-ann")
        await client.flush()
        await read_until(
            client, lambda: any(isinstance(e, h2.events.PingAckReceived) for e in client.events)
        )
        assert not [e for e in client.events if getattr(e, "stream_id", None) == silent]
        await client.send_data(silent, grpc_request("q"))
        await read_until(client, lambda: client.answered(silent))
        events = await publish(srv, "q", 3)
        await read_until(client, lambda: len(client.data.get(silent, b"")) >= len(expected(events)))
        assert bytes(client.data[silent]) == expected(events)
        await client.aclose()


async def test_a_ping_ack_goes_with_the_next_frames_or_on_its_own(server: Running) -> None:
    """A receiving gRPC client PINGs after reads (grpc-go's bandwidth
    estimator): the ACK goes out with the connection's next frames, costing
    no write of its own, or on its own after ACK_DELAY when none come."""
    srv = server

    def acks() -> list[bytes]:
        return [e.ping_data for e in client.events if isinstance(e, h2.events.PingAckReceived)]

    with trio.fail_after(30):
        client = await RawH2.connect(srv.grpc_port, window=BIG_WINDOW)
        client.ack = True
        client.grant(BIG_WINDOW - 65535)
        await client.flush()
        (_stream,) = await open_streams(srv, client, "ack", 1)
        # Idle: the ACK comes alone, soon.
        client.conn.ping(b"idle-ack")
        await client.flush()
        with trio.fail_after(2):
            await read_until(client, lambda: acks() == [b"idle-ack"])
        # Busy: an event comes within ACK_DELAY; the ACK is in the same read
        # as its DATA (one write). Tried a few times: a loaded machine may
        # let the delay pass before the event.
        piggybacked = 0
        for n in range(5):
            opaque = b"busy-%03d" % n
            client.conn.ping(opaque)
            await client.flush()
            # 10 ms for the server to read the PING (same process), reading
            # meanwhile: an ACK sent on its own now would be read on its own.
            with trio.move_on_after(0.01):
                while True:
                    await client.read_once()
            await publish(srv, "ack", 1)
            kinds: set[type] = set()
            while h2.events.DataReceived not in kinds:  # the read that brings the event
                before = len(client.events)
                await client.read_once()
                kinds = {type(e) for e in client.events[before:]}
            if h2.events.PingAckReceived in kinds:
                piggybacked += 1
            await read_until(client, lambda: opaque in acks())  # noqa: B023
        assert piggybacked >= 3, piggybacked
        await client.aclose()
