"""The gRPC stream (SPEC 3): grpclib's asyncio server inside the trio program.

Theory of operation
-------------------
grpclib is asyncio-only; :func:`serve_grpc` runs it on the trio-asyncio loop
that ``app.serve`` opens around the root nursery, so it is started,
supervised and stopped by the same nursery as everything else.

Per stream, the handler (asyncio side) registers a :class:`GrpcSink` with
the hub. ``Hub.publish`` runs on the trio side and calls its ``offer``:
normally that writes the event's frame through the connection's direct
writer (:mod:`plasma_trio.transports.grpc_direct`: encoded once per event,
one write per connection per event, h2's windows charged); while the
connection cannot take it, the event waits in the sink's backlog and the
connection drains it when it opens; otherwise the stream's own writer task
takes over, through grpclib's ``send_message`` (pre-encoded bytes through
:class:`PassThroughCodec`) where it must wait for a window, fed from trio by
``asyncio.Queue.put_nowait``, which wakes the asyncio task with no crossing
between the two loops.

Semantics (plasma's): nothing is sent before the first ``Request``; each
``Request`` replaces the subscription set (empty: unsubscribed, stream kept);
``forceClose`` ends the stream with OK; ``lastEventId`` (new, field 3)
replays missed events first. A stream that falls ``PLASMA_SUBSCRIBER_BUFFER``
events behind ends with ``RESOURCE_EXHAUSTED``; the connection limit gives
``UNAVAILABLE``; a topic limit ``INVALID_ARGUMENT``. At shutdown the hub
ends every stream with OK, then the server closes.

``grpc.health.v1.Health`` (``""`` and ``proto.StreamService``, SERVING while
the source is healthy) and server reflection (v1 and v1alpha, from the
descriptor set generated next to the messages) are served on the same port.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import importlib.resources
import json
import socket
import struct
import time
import weakref
from collections import deque
from contextlib import ExitStack
from functools import partial
from typing import TYPE_CHECKING, Any, Final

import trio
import trio_asyncio
from google.protobuf import descriptor_pb2, descriptor_pool
from grpclib.const import Cardinality, Handler, Status
from grpclib.encoding.proto import ProtoCodec
from grpclib.exceptions import GRPCError, StreamTerminatedError
from grpclib.health.check import ServiceStatus
from grpclib.health.service import Health
from grpclib.protocol import Connection, H2Protocol
from grpclib.reflection.service import ServerReflection
from grpclib.server import Server, Stream
from h2.events import RemoteSettingsChanged
from h2.exceptions import H2Error, ProtocolError
from h2.settings import SettingCodes

from plasma_trio._proto.proto import EventType, Payload, Request
from plasma_trio.auth import allows, bearer
from plasma_trio.errors import ServiceUnavailable
from plasma_trio.hub import Deliveries
from plasma_trio.logs import ACCESS, ERROR
from plasma_trio.session import (
    Gap,
    Refused,
    Resume,
    authorize,
    check_capacity,
    event_size,
    expire_at,
    locate,
    topics_of,
)
from plasma_trio.transports.frontdoor import MAX_PENDING_HEADS
from plasma_trio.transports.grpc_direct import (
    BLOCKED_CONNECTION,
    BLOCKED_STREAM,
    MORE,
    SENT,
    ConnectionWriter,
    Control,
    FrameBatch,
    apply_control,
    parse_control,
)
from plasma_trio.transports.wire import GRPC_HEAD, GRPC_MESSAGE, grpc_message, grpc_payload

if TYPE_CHECKING:
    import ssl
    from collections.abc import AsyncIterator, Callable

    from h2.stream import H2Stream

    from plasma_trio.auth import Grant
    from plasma_trio.config import Config
    from plasma_trio.hub import Hub, StampedEvent, Subscription
    from plasma_trio.sources import Source
    from plasma_trio.transports.guard import ConnectionGuard

__all__ = ["GrpcSink", "PassThroughCodec", "StreamService", "serve_grpc"]

SERVICE_NAME: Final = "proto.StreamService"
GAP_TYPE: Final = "plasma-gap"
_log = ERROR.getChild("grpc")


class PassThroughCodec(ProtoCodec):
    """grpclib's proto codec, except that ``bytes`` are sent as they are (pre-encoded)."""

    def encode(self, message: Any, message_type: Any) -> bytes:
        if isinstance(message, bytes):
            return message
        return super().encode(message, message_type)


class _End:
    """Queue sentinels: why a stream ends, or what to send next."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"


CUT_OFF: Final = _End("cut off")
SHUTDOWN: Final = _End("shutdown")
FORCE_CLOSE: Final = _End("forceClose")
REPLAY: Final = _End("replay")  # send the session's replay now


def gap_payload(gap: Gap) -> bytes:
    """The gap notice as a ``Payload`` (SPEC 3): type ``plasma-gap``, no id."""
    data = json.dumps({"requested": gap.requested, "oldest": gap.oldest}, separators=(",", ":"))
    return bytes(Payload(event_type=EventType(type=GAP_TYPE), data=data, id=""))


class GrpcSink:
    """One gRPC stream's side of the hub: direct frames, a backlog, or its task.

    Three ways an event goes out (see ``grpc_direct`` for the frames):

    * *direct* (headers sent, nothing waiting): ``offer`` hands the event's
      frame to the connection's
      :class:`~plasma_trio.transports.grpc_direct.ConnectionWriter`, written
      after the fan-out slice;
    * *backlog*, while the connection cannot take it (its window is spent or
      its socket buffer is full): the event waits in :attr:`backlog` and the
      stream in the connection's line; when the client opens the window (or
      the socket drains), the connection drains every waiting stream in one
      write, in turn, with no task woken;
    * *the stream's task*, for everything else (the stream's own window,
      a message over one frame, gap notices, replays, the end): an
      ``asyncio.Queue`` filled from trio (``put_nowait`` wakes the asyncio
      task with no crossing between the loops) that the task drains, direct
      where it can, through grpclib's ``send_message`` where it must wait.

    Backlog and queue together are bounded in events and bytes; a stream
    over the bound is cut off. ``stalled_since`` is set while events wait for
    the client (backlog, or a send waiting for flow control or a full
    socket). ``release`` (set by the handler) resets the stream at once; a
    cut-off while stalled calls it, so that a client that stopped reading
    gives its slot back now, not at shutdown.
    """

    heartbeats = False  # HTTP/2 keeps idle streams alive by itself

    def __init__(
        self, buffer: int, max_bytes: int, resume: Resume, deliveries: Deliveries | None = None
    ) -> None:
        self.deliveries = deliveries if deliveries is not None else Deliveries()
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.backlog: deque[StampedEvent] = deque()
        self.buffer = buffer
        self.max_bytes = max_bytes
        self.resume = resume
        self.queued_bytes = 0
        self.closed = False
        self.cut_off = False
        self.stalled_since: float | None = None
        self.release: Callable[[], None] | None = None
        self.events = 0  # messages sent, either way (the access log's count)
        # The direct path, once attached (after the response headers).
        self.direct = False
        self.sending = False  # the task holds an item it has not sent yet
        self.writer: ConnectionWriter | None = None
        self.h2_stream: H2Stream | None = None
        self.stream_id = b""

    @property
    def queue_depth(self) -> int:
        """Events waiting for this stream (backlog and task queue)."""
        return len(self.backlog) + self.queue.qsize()

    def attach(self, writer: ConnectionWriter, h2_stream: H2Stream, stream_id: int) -> None:
        """Enable the direct path: the stream's headers have been sent."""
        self.writer = writer
        self.h2_stream = h2_stream
        self.stream_id = stream_id.to_bytes(4, "big")
        self.resume_direct()

    def resume_direct(self) -> None:
        """Go direct again if nothing waits (called when a backlog or the queue empties)."""
        self.direct = (
            self.writer is not None
            and not self.closed
            and not self.sending
            and not self.backlog
            and self.queue.empty()
            and not self.resume.replaying
        )

    def offer(self, event: StampedEvent) -> bool:
        if self.direct:
            # The hot path: a frame of the shared message for the connection's
            # one write after this fan-out slice. A live event here is always
            # new to this stream (no replay pending), so no is_new check.
            wire = event.wire
            message = wire.get(GRPC_MESSAGE) or grpc_message(event)
            writer = self.writer
            h2_stream = self.h2_stream
            assert writer is not None
            assert h2_stream is not None
            status = writer.send(h2_stream, wire[GRPC_HEAD] + self.stream_id, message)
            if status == SENT:
                self.resume.sent(event)
                self.events += 1
                self.deliveries.wrote("grpc", event)  # written with this slice's flush
                return True
            self.direct = False
            if status == BLOCKED_CONNECTION:
                self.backlog.append(event)
                self.queued_bytes += event_size(event)
                self.stalled_since = time.monotonic()
                writer.waiting.append(self)
                return True
            # BLOCKED_STREAM: the stream's task takes over (below).
        if self.closed:
            return True
        size = event_size(event)
        if (
            len(self.backlog) + self.queue.qsize() >= self.buffer
            or self.queued_bytes + size > self.max_bytes
        ):
            return False
        if self.backlog:
            self.backlog.append(event)
        else:
            self.queue.put_nowait(event)
        self.queued_bytes += size
        return True

    def drain_backlog(self, limit: int) -> int:
        """Called by the connection when it can write again (``Backlogged``)."""
        backlog = self.backlog
        writer = self.writer
        h2_stream = self.h2_stream
        assert writer is not None
        assert h2_stream is not None
        while backlog:
            if not limit:
                return MORE
            limit -= 1
            event = backlog[0]
            message = grpc_message(event)
            status = writer.send_now(h2_stream, event.wire[GRPC_HEAD] + self.stream_id, message)
            if status == BLOCKED_CONNECTION:
                return status
            if status == BLOCKED_STREAM:
                self._handover(unlist=False)
                return status
            backlog.popleft()
            self.queued_bytes -= event_size(event)
            self.resume.sent(event)
            self.events += 1
            self.deliveries.wrote("grpc", event)
        self.stalled_since = None
        self.resume_direct()
        return SENT

    def progress(self, now: float) -> None:
        """Its connection is moving (``Backlogged``)."""
        if self.backlog:
            self.stalled_since = now

    def handover(self) -> None:
        """Give the backlog to the stream's task (``Backlogged``); nothing to
        do without one (then the stream is direct, or its task is busy)."""
        self._handover()

    def _handover(self, *, unlist: bool = True) -> None:
        """Give the backlog to the stream's task (in order, ahead of what follows)."""
        if not self.backlog:
            return
        if unlist and self.writer is not None:
            self.writer.waiting.remove(self)
        for event in self.backlog:
            self.queue.put_nowait(event)
        self.backlog.clear()
        self.stalled_since = None  # the task keeps it from here on

    def detach(self) -> None:
        """The stream is over: leave the connection's line."""
        if self.backlog:
            if self.writer is not None:
                self.writer.waiting.remove(self)
            self.backlog.clear()
        self.direct = False

    def loss(self, requested: str | None, oldest: str | None) -> None:
        """The live gap notice: a ``plasma-gap`` Payload before the next event
        (not before the stream's first ``Request``: nothing is)."""
        if not self.closed and self.writer is not None:
            self.put(Gap(requested, oldest))

    def put(self, item: Any) -> None:
        """Queue a notice or a marker for the stream's task (the direct path pauses)."""
        self.direct = False
        self._handover()
        self.queue.put_nowait(item)

    def taken(self, event: StampedEvent) -> None:
        """The task took ``event`` off the queue."""
        self.queued_bytes -= event_size(event)

    def close(self, *, cut_off: bool) -> None:
        if self.closed:
            # Already ending (forceClose, a bad request), but the client may
            # have stopped reading meanwhile: a cut-off still releases it.
            if cut_off and self.stalled_since is not None and self.release is not None:
                self.release()
            return
        self.closed = True
        self.direct = False
        if cut_off:
            self.cut_off = True
            # The stream is behind by definition: drop what is queued so the
            # status goes out as soon as possible.
            self.detach()
            while not self.queue.empty():
                self.queue.get_nowait()
            self.queued_bytes = 0
            if self.stalled_since is not None and self.release is not None:
                self.release()
        else:
            self._handover()  # shutdown: what waits is still sent
        self.queue.put_nowait(CUT_OFF if cut_off else SHUTDOWN)

    def end(self, reason: _End | GRPCError) -> None:
        """End the stream from the handler's side (forceClose, a bad request)."""
        if not self.closed:
            self.closed = True
            self.direct = False
            self._handover()
            self.queue.put_nowait(reason)


class StreamService:
    """``proto.StreamService`` on grpclib, written on its ``Stream`` directly so that
    requests can change the subscription while payloads flow."""

    def __init__(self, config: Config, hub: Hub) -> None:
        self.config = config
        self.hub = hub
        # The largest Request a client may send: every allowed topic at the
        # longest allowed length, a lastEventId, framing; at least 64 KiB.
        if config.max_topics and config.max_topic_length:
            largest = config.max_topics * (config.max_topic_length + 8) + 4096
            self.max_request_bytes = max(64 * 1024, largest)
        else:
            self.max_request_bytes = 4 << 20  # topics unlimited: a generous bound still

    def __mapping__(self) -> dict[str, Handler]:
        return {
            f"/{SERVICE_NAME}/Events": Handler(
                self.events, Cardinality.STREAM_STREAM, Request, Payload
            ),
        }

    async def events(self, stream: Stream[Request, Any]) -> None:
        started = time.monotonic()
        resume = Resume(self.hub, track_sent=True)
        sink = GrpcSink(
            self.config.subscriber_buffer,
            self.config.subscriber_buffer_bytes,
            resume,
            self.hub.deliveries,
        )
        info: dict[str, Any] = {"topics": [], "status": "OK"}
        peer = stream.peer.addr() if stream.peer is not None else None
        try:
            try:
                check_capacity(self.hub)
                # Access control: the token of the stream's metadata, checked
                # once (each Request's topics against its claim, below).
                grant = authorize(self.config, bearer(_metadata(stream, "authorization")), ())
            except Refused as exc:
                raise GRPCError(_GRPC_STATUS[exc.kind], exc.message) from None
            info["subject"] = grant.subject if grant is not None else None
            with ExitStack() as stack:
                try:
                    subscription = stack.enter_context(self.hub.subscribe("grpc", sink))
                except ServiceUnavailable as exc:
                    raise GRPCError(Status.UNAVAILABLE, str(exc)) from None
                expire_at(subscription, grant)
                reader = asyncio.ensure_future(
                    self._read_requests(stream, subscription, sink, resume, info, grant)
                )
                stack.callback(reader.cancel)
                writer = asyncio.ensure_future(
                    self._write_events(stream, subscription, sink, resume)
                )
                stack.callback(writer.cancel)
                stack.callback(sink.detach)
                sink.release = partial(_release, stream, writer, self._cut_off_message())
                await asyncio.wait([writer])
                if writer.cancelled():
                    # Released: the stream was reset (or its connection
                    # closed); the status below cannot reach the client.
                    raise GRPCError(Status.RESOURCE_EXHAUSTED, self._cut_off_message())
                writer.result()
        except GRPCError as exc:
            info["status"] = exc.status.name
            raise
        except (asyncio.CancelledError, StreamTerminatedError):
            info["status"] = "CANCELLED"
            raise
        finally:
            ACCESS.info(
                "grpc stream ended",
                extra={
                    "transport": "grpc",
                    "status": info["status"],
                    "remote_addr": f"{peer[0]}:{peer[1]}" if peer else "",
                    "topics": info["topics"],
                    "duration": round(time.monotonic() - started, 6),
                    "events": sink.events,
                    **({"subject": info["subject"]} if info.get("subject") else {}),
                },
            )

    def _cut_off_message(self) -> str:
        return (
            f"cut off: fell {self.config.subscriber_buffer} events"
            f" ({self.config.subscriber_buffer_bytes} bytes) behind, or accepted"
            f" nothing for {self.config.subscriber_write_timeout:g}s"
        )

    async def _read_requests(
        self,
        stream: Stream[Request, Any],
        subscription: Subscription,
        sink: GrpcSink,
        resume: Resume,
        info: dict[str, Any],
        grant: Grant | None = None,
    ) -> None:
        config = self.config
        try:
            async for request in _requests(stream, self.max_request_bytes):
                if request.force_close:
                    sink.end(FORCE_CLOSE)
                    return
                try:
                    topics = topics_of(config, (e.type for e in request.events))
                except Refused as exc:
                    sink.end(GRPCError(Status.INVALID_ARGUMENT, exc.message))
                    return
                if grant is not None:
                    denied = next(
                        (t for t in sorted(topics) if not allows(grant.subscribe, t)), None
                    )
                    if denied is not None:
                        message = f"the token does not allow subscribing to {denied!r}"
                        sink.end(GRPCError(Status.PERMISSION_DENIED, message))
                        return
                if topics and sink.writer is None and not sink.closed:
                    await self._attach(stream, sink)
                if request.last_event_id and topics:
                    # redis-streams: catch up with the client's position and
                    # ask Redis whether its entries still exist (await first).
                    missing = False
                    if self.hub.stream_position is not None:
                        missing = await trio_asyncio.trio_as_aio(locate)(  # type: ignore[no-untyped-call]
                            self.hub, request.last_event_id
                        )
                    # Start the replay and change the topics in one step
                    # (nothing awaited): live events queued from now on come
                    # after the replay's end; the session skips whatever this
                    # stream was already sent.
                    sink.handover()  # what waits gets the "already sent?" check
                    gap = resume.start(request.last_event_id, topics, missing=missing)
                    if gap is not None:
                        sink.put(gap)
                    if resume.replaying:
                        sink.put(REPLAY)
                subscription.set_topics(topics)
                info["topics"] = sorted(topics)
        except (StreamTerminatedError, ConnectionError):
            # The client went away: the writer notices through cancellation.
            return
        except GRPCError as exc:
            sink.end(exc)  # a malformed or oversized Request: this stream alone ends
            return
        # The client half-closed its side: keep delivering until it cancels.

    @staticmethod
    async def _attach(stream: Stream[Request, Any], sink: GrpcSink) -> None:
        """Send the response headers, then let the fan-out write this stream's
        frames directly (``grpc_direct``). Called at the first ``Request``
        with topics: nothing is sent before it (plasma's behaviour), and a
        refused first ``Request`` still gets a trailers-only response."""
        h2_stream = stream._stream
        connection = h2_stream.connection
        if not isinstance(connection, _Connection) or h2_stream.id is None:
            return  # not our server's connection: grpclib's path only
        if not stream._send_initial_metadata_done:
            await stream.send_initial_metadata()
        state = h2_stream._h2_connection.streams.get(h2_stream.id)
        if state is not None:
            sink.attach(connection.writer, state, h2_stream.id)

    async def _write_events(
        self,
        stream: Stream[Request, Any],
        subscription: Subscription,
        sink: GrpcSink,
        resume: Resume,
    ) -> None:
        queue = sink.queue

        def flush() -> None:
            # Frames this task wrote directly go out before anything else of
            # this stream's (grpclib's own send, the trailers).
            if sink.writer is not None:
                sink.writer.flush()

        async def send(message: bytes) -> None:
            """grpclib's path: waits for the windows and the socket, splits."""
            flush()
            sink.stalled_since = time.monotonic()
            await stream.send_message(message)
            sink.stalled_since = None
            sink.events += 1

        async def send_event(event: StampedEvent) -> None:
            # Catching up costs what the fan-out's direct path costs: a frame
            # for the connection's next write, while the windows allow.
            writer = sink.writer
            if writer is not None:
                message = grpc_message(event)
                assert sink.h2_stream is not None
                header = event.wire[GRPC_HEAD] + sink.stream_id
                if writer.send_now(sink.h2_stream, header, message) == SENT:
                    sink.events += 1
                    resume.sent(event)
                    sink.deliveries.wrote("grpc", event)
                    return
            await send(grpc_payload(event))
            resume.sent(event)
            sink.deliveries.wrote("grpc", event)

        try:
            while True:
                item = await queue.get()
                sink.sending = True
                while True:
                    if item is REPLAY:
                        while True:
                            if resume.needs_refill:
                                # redis-streams, older than the window: Redis (trio).
                                await trio_asyncio.trio_as_aio(resume.refill)()  # type: ignore[no-untyped-call]
                            if not (batch := resume.take()):
                                break
                            for event in batch:
                                await send_event(event)
                            flush()
                            await asyncio.sleep(0)  # a long replay lets others run
                        if batch is None:
                            # The client replays slower than the history turns over.
                            subscription.cut_off()
                    elif isinstance(item, Gap):
                        await send(gap_payload(item))
                    elif isinstance(item, _End):
                        if item is CUT_OFF:
                            raise GRPCError(Status.RESOURCE_EXHAUSTED, self._cut_off_message())
                        if subscription.expired:
                            raise GRPCError(Status.UNAUTHENTICATED, "token expired")
                        return  # forceClose or shutdown: status OK
                    elif isinstance(item, GRPCError):
                        raise item
                    else:
                        sink.taken(item)
                        if resume.is_new(item):
                            await send_event(item)
                    try:
                        item = queue.get_nowait()
                    except asyncio.QueueEmpty:
                        flush()
                        sink.sending = False
                        sink.resume_direct()
                        break
        finally:
            flush()


_GRPC_STATUS: Final = {
    "invalid": Status.INVALID_ARGUMENT,
    "unavailable": Status.UNAVAILABLE,
    "unauthenticated": Status.UNAUTHENTICATED,
    "forbidden": Status.PERMISSION_DENIED,
}


async def _requests(stream: Stream[Request, Any], limit: int) -> AsyncIterator[Request]:
    """The stream's Requests, read as grpclib's ``recv_message`` does but
    refusing what it would take on faith (SPEC 10): a length prefix over
    ``limit`` (grpclib would buffer up to 4 GiB, acknowledging as it goes), a
    compressed message (no encoding is negotiated), a message cut short by
    the client's END_STREAM, bytes that are not a Request."""
    h2_stream = stream._stream
    while True:
        try:
            meta = await h2_stream.recv_data(5)
        except AssertionError:  # grpclib: fewer than 5 bytes before END_STREAM
            raise GRPCError(Status.INVALID_ARGUMENT, "truncated message") from None
        if not meta:
            return
        compressed, length = struct.unpack(">BI", meta)
        if compressed:
            raise GRPCError(Status.UNIMPLEMENTED, "compressed requests are not supported")
        if length > limit:
            raise GRPCError(
                Status.RESOURCE_EXHAUSTED, f"a Request of {length} bytes (at most {limit})"
            )
        try:
            body = await h2_stream.recv_data(length) if length else b""
        except AssertionError:  # grpclib: the stream ended before the message did
            raise GRPCError(Status.INVALID_ARGUMENT, "truncated message") from None
        try:
            request = Request.parse(body)
        except Exception:  # betterproto2 raises several kinds on garbage
            raise GRPCError(Status.INVALID_ARGUMENT, "not a Request message") from None
        yield request


def _metadata(stream: Stream[Request, Any], name: str) -> str | None:
    """A request metadata value (the first), as text."""
    value = stream.metadata.get(name) if stream.metadata is not None else None
    if isinstance(value, bytes):
        return value.decode("latin-1")
    return value if isinstance(value, str) else None


def _release(stream: Stream[Request, Any], writer: asyncio.Future[None], message: str) -> None:
    """End a stream whose client stopped reading, now, and stop its writer.

    grpclib's send waits for HTTP/2 flow control or a writable socket without
    bound, and its trailers would wait behind it. HEADERS frames are not flow
    controlled: while the connection still writes, the trailers
    (``RESOURCE_EXHAUSTED``) go out at once, followed by RST_STREAM, as
    grpclib ends a stream with an error; just this stream ends. When the
    connection itself is stalled (its socket buffer full), every stream on it
    is stalled too, and the connection is closed.
    """
    h2_stream = stream._stream
    transport = h2_stream._transport
    stream_id = h2_stream.id
    assert stream_id is not None  # a request's stream has its id
    try:
        if h2_stream.connection.write_ready.is_set():
            if isinstance(h2_stream.connection, _Connection):
                # This fan-out slice's frames (other streams') go first.
                h2_stream.connection.writer.flush()
            h2_connection = h2_stream._h2_connection
            try:
                h2_connection.send_headers(
                    stream_id,
                    [
                        ("grpc-status", str(Status.RESOURCE_EXHAUSTED.value)),
                        ("grpc-message", message),
                    ],
                    end_stream=True,
                )
                state = h2_connection.streams.get(stream_id)
                if state is not None and not state.closed:
                    # (A client that half-closed its side is closed by the
                    # trailers already: nothing to reset.)
                    h2_connection.reset_stream(stream_id)
            finally:
                transport.write(h2_connection.data_to_send())
        else:
            transport.abort()
    except H2Error:
        pass  # the stream has ended meanwhile
    writer.cancel()


# Streams are long-lived, and proxies (Envoy, linkerd) multiplex many clients
# over one HTTP/2 connection: h2's default of 100 concurrent streams per
# connection would queue the 101st subscriber. The Go server allowed ~2**32.
MAX_CONCURRENT_STREAMS: Final = 1 << 20
# asyncio's TLS read buffer per gRPC connection (see _Server.listen).
TLS_READ_BUFFER: Final = 32 * 1024


class _Connection(Connection):
    """grpclib's connection state, with the connection's direct frame writer."""

    writer: ConnectionWriter


class _Protocol(H2Protocol):
    """grpclib's HTTP/2 connection, with our settings, a ``lost`` event for
    shutdown, and containment: a connection's failure is counted by the
    :class:`ConnectionGuard` and closes that connection only.

    grpclib already answers an HTTP/2 protocol error (garbage, a bad frame
    length, a broken preface) by closing the connection; we count those as
    client errors. Anything else its callbacks raise would reach the asyncio
    loop's exception handler with the connection left open: here it is
    recorded as an internal error and the connection is aborted.
    """

    lost: asyncio.Event
    guard: ConnectionGuard | None = None
    batch: FrameBatch | None = None
    peer = ""
    # The server's register of connections still waiting for their HTTP/2
    # preface (see _Heads), and when this one was accepted.
    heads: _Heads | None = None
    accepted = 0.0
    # TLS: asyncio hands over the first application data with the end of the
    # handshake, before _TlsAccept can call connection_made; kept until then.
    made = False
    early: list[bytes] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.lost = asyncio.Event()
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # asyncio and grpclib set TCP_NODELAY only on sockets whose proto
            # is IPPROTO_TCP, and a socket from socket.create_server has proto
            # 0: without this, Nagle holds each write until the client's
            # delayed ACK (up to 40 ms) whenever events come faster than that.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peername = transport.get_extra_info("peername")
        if isinstance(peername, tuple):
            self.peer = f"{str(peername[0]).removeprefix('::ffff:')}:{peername[1]}"
        super().connection_made(transport)
        if self.batch is not None:
            self.connection.__class__ = _Connection
            assert isinstance(self.connection, _Connection)
            self.connection.writer = ConnectionWriter(
                self.batch,
                self.connection,
                self.connection._connection,
                self.connection._transport,
                self._record,
            )
        self.connection._connection.update_settings(
            {SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS}
        )
        self.connection.flush()
        feed = self.connection.feed

        def counted_feed(data: bytes) -> Any:
            try:
                events = feed(data)
            except ProtocolError as exc:
                self._record(exc)
                raise  # grpclib closes the connection
            if self.waiting_head:
                self.head_received(events)
            return events

        self.connection.feed = counted_feed  # type: ignore[method-assign]
        if self.heads is not None:
            self.heads.admit(self, transport, self.accepted)
        self.made = True
        early, self.early = self.early, None
        for data in early or ():
            self.data_received(data)

    @property
    def waiting_head(self) -> bool:
        return self.heads is not None and self in self.heads.waiting

    def head_received(self, events: list[Any]) -> None:
        """The client's preface and SETTINGS are in: it no longer counts as waiting."""
        if self.heads is not None and any(isinstance(e, RemoteSettingsChanged) for e in events):
            self.heads.done(self)

    def data_received(self, data: bytes) -> None:
        if not self.made:
            self.early = [*(self.early or ()), data]
            return
        try:
            connection = self.connection
            if not isinstance(connection, _Connection) or self.waiting_head:
                super().data_received(data)
                return
            control = parse_control(connection._connection, data)
            if control is None:
                super().data_received(data)
            else:
                self._control(connection, control)
            if connection.writer.waiting:
                connection.writer.drain()  # a WINDOW_UPDATE may have come
        except Exception as exc:
            self._record(exc)
            self.connection.close()

    def _control(self, connection: _Connection, control: Control) -> None:
        """A read of PINGs and WINDOW_UPDATEs only: what h2 and grpclib would
        do with it, without their general path (see ``parse_control``)."""
        apply_control(connection._connection, control)
        streams = self.processor.streams
        if control.connection_increment:
            for stream in streams.values():
                stream.window_updated.set()
        for stream_id in control.stream_increments:
            waiting = streams.get(stream_id)
            if waiting is not None:
                waiting.window_updated.set()
        if control.pings:
            connection.writer.write(control.ping_acks())

    def resume_writing(self) -> None:
        super().resume_writing()
        connection = self.connection
        if isinstance(connection, _Connection) and connection.writer.waiting:
            connection.writer.drain()

    def _record(self, exc: BaseException) -> None:
        if self.guard is not None:
            self.guard.record("grpc", exc, peer=self.peer)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.heads is not None:
            self.heads.done(self)
        if not self.made:
            return  # lost between the TLS handshake and connection_made
        super().connection_lost(exc)
        self.lost.set()

    def goaway(self) -> None:
        """Tell the client this connection is done (GOAWAY); it hangs up when it has read all."""
        connection = self.connection
        if connection.is_closing():
            return
        connection._connection.close_connection()
        connection.flush()


class _Heads:
    """The gRPC port's bound on connections that have not completed their
    TLS handshake and sent their HTTP/2 preface and SETTINGS (a gRPC
    connection's "request head", as grpc-go's ConnectionTimeout sees it):
    each gets ``PLASMA_HEADER_TIMEOUT`` from its accept, and at most
    MAX_PENDING_HEADS wait at once; a new one beyond that drops the one
    waiting longest. Keys are the protocols waiting (a :class:`_TlsAccept`
    during the handshake, then the connection's :class:`_Protocol`), each
    with its transport, aborted when dropped or late.
    """

    def __init__(self, timeout: float, guard: ConnectionGuard) -> None:
        self.timeout = timeout
        self.guard = guard  # counts the drops (plasma_connections_dropped_total)
        # In arrival order: the transport to abort, and the timer that does.
        self.waiting: dict[object, tuple[asyncio.BaseTransport, asyncio.TimerHandle]] = {}

    def admit(self, key: object, transport: asyncio.BaseTransport, accepted: float) -> None:
        if len(self.waiting) >= MAX_PENDING_HEADS:
            oldest = next(iter(self.waiting))
            self.waiting[oldest][0].abort()  # type: ignore[attr-defined]
            self.done(oldest)
            self.guard.dropped("grpc", "head_limit")
        loop = asyncio.get_running_loop()
        timer = loop.call_at(accepted + self.timeout, self._expire, key)
        self.waiting[key] = (transport, timer)

    def _expire(self, key: object) -> None:
        waiting = self.waiting.pop(key, None)
        if waiting is not None:
            waiting[0].abort()  # type: ignore[attr-defined]
            self.guard.dropped("grpc", "head_timeout")

    def done(self, key: object) -> None:
        waiting = self.waiting.pop(key, None)
        if waiting is not None:
            waiting[1].cancel()


class _TlsAccept(asyncio.Protocol):
    """A TLS connection of the gRPC port until its handshake completes.

    asyncio's ``create_server(ssl=...)`` would run the handshake out of our
    sight (nothing can count or drop a connection that has not completed
    it, and each holds a TLS read buffer), so the port listens plain and
    this protocol upgrades each connection with ``loop.start_tls``, counted
    among the waiting connections (:class:`_Heads`) from its accept. Once
    the handshake is done, grpclib's protocol takes the TLS transport.
    """

    def __init__(self, app: _Protocol, context: ssl.SSLContext, heads: _Heads) -> None:
        self.app = app
        self.context = context
        self.heads = heads
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        # No read until start_tls has put its protocol in place.
        transport.pause_reading()
        self.heads.admit(self, transport, self.app.accepted)
        self.task = asyncio.ensure_future(self._upgrade(transport))

    async def _upgrade(self, transport: asyncio.Transport) -> None:
        loop = asyncio.get_running_loop()
        left = max(0.001, self.app.accepted + self.heads.timeout - loop.time())
        try:
            tls = await loop.start_tls(
                transport, self.app, self.context, server_side=True, ssl_handshake_timeout=left
            )
        except OSError:  # (ssl.SSLError, TimeoutError, ConnectionError among them)
            if self in self.heads.waiting and loop.time() >= self.app.accepted + self.heads.timeout:
                # asyncio's own handshake timeout came first (same deadline).
                self.heads.guard.dropped("grpc", "head_timeout")
            transport.abort()  # a failed, late or dropped handshake: nothing else to report
            return
        finally:
            self.heads.done(self)
        if tls is None or tls.is_closing():
            return
        self.app.connection_made(tls)

    def connection_lost(self, exc: BaseException | None) -> None:
        # (Only before start_tls took the transport over.)
        self.heads.done(self)


class _Server(Server):
    """grpclib's server with our HTTP/2 settings (see MAX_CONCURRENT_STREAMS),
    which also closes its client connections when it stops (grpclib leaves
    them to the garbage collector)."""

    def __init__(
        self,
        *args: Any,
        guard: ConnectionGuard,
        batch: FrameBatch,
        header_timeout: float,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._protocols: weakref.WeakSet[H2Protocol] = weakref.WeakSet()
        self._guard = guard
        self._batch = batch
        self.heads = _Heads(header_timeout, guard)

    async def listen(self, sock: socket.socket, ssl_context: ssl.SSLContext | None) -> None:
        """grpclib's ``start`` on a bound socket; with TLS, each connection's
        handshake runs in a :class:`_TlsAccept` (bounded like a head)."""
        factory: Callable[[], asyncio.BaseProtocol] = self._protocol_factory
        if ssl_context is not None:
            # asyncio's TLS protocol allocates its read buffer (max_size,
            # 256 KiB) for every connection up front, handshake pending or
            # not; gRPC subscribers read little (Requests, PINGs, window
            # updates): 32 KiB (two TLS records) is plenty. grpclib's server
            # is the only asyncio TLS user in the process.
            asyncio.sslproto.SSLProtocol.max_size = TLS_READ_BUFFER
            context = ssl_context

            def factory() -> asyncio.BaseProtocol:
                app = self._protocol_factory()
                assert isinstance(app, _Protocol)
                return _TlsAccept(app, context, self.heads)

        self._server = await self._loop.create_server(factory, sock=sock, backlog=4096)
        self._server_closed_fut = self._loop.create_future()

    def _protocol_factory(self) -> H2Protocol:
        protocol = super()._protocol_factory()
        protocol.__class__ = _Protocol
        assert isinstance(protocol, _Protocol)
        protocol.guard = self._guard
        protocol.batch = self._batch
        protocol.heads = self.heads
        protocol.accepted = self._loop.time()  # (the factory runs at accept)
        self._protocols.add(protocol)
        return protocol

    def idle(self) -> bool:
        """No request handler is still running (trailers included)."""
        return all(
            task.done()
            for handler in self._handlers
            for task in getattr(handler, "_tasks", {}).values()
        )

    async def close_connections(self, grace: float) -> None:
        """GOAWAY every client, give them ``grace`` seconds to hang up (so the
        last trailers are read, not reset), then close what remains."""
        protocols = [p for p in self._protocols if isinstance(p, _Protocol) and hasattr(p, "lost")]
        for protocol in protocols:
            protocol.goaway()
        waiting = [asyncio.ensure_future(p.lost.wait()) for p in protocols if not p.lost.is_set()]
        if waiting:
            _, pending = await asyncio.wait(waiting, timeout=grace)
            for future in pending:
                future.cancel()
        for protocol in protocols:
            if not protocol.connection.is_closing():
                protocol.connection.close()


def _reflection_pool() -> descriptor_pool.DescriptorPool:
    """A descriptor pool for server reflection: stream.proto (from the descriptor
    set generated next to the messages) plus the health and reflection protos.

    A pool of our own, not protobuf's default one, so that an application
    embedding plasma-trio may load its own ``stream_pb2`` without a clash.
    """
    from grpclib.health.v1 import health_pb2
    from grpclib.reflection.v1 import reflection_pb2
    from grpclib.reflection.v1alpha import reflection_pb2 as reflection_v1alpha_pb2

    pool = descriptor_pool.DescriptorPool()
    for module in (health_pb2, reflection_pb2, reflection_v1alpha_pb2):
        file_proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(file_proto)
        pool.Add(file_proto)
    raw = importlib.resources.files("plasma_trio._proto").joinpath("stream.desc").read_bytes()
    for file_proto in descriptor_pb2.FileDescriptorSet.FromString(raw).file:
        pool.Add(file_proto)
    return pool


async def serve_grpc(
    config: Config,
    hub: Hub,
    source: Source,
    sock: socket.socket,
    *,
    shutdown: trio.Event,
    guard: ConnectionGuard,
    ssl_context: ssl.SSLContext | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the gRPC server on the bound ``sock`` until ``shutdown``; reports the port.

    ``ssl_context`` is the server's one TLS context (``transports/tls.py``).

    Must run inside ``trio_asyncio.open_loop()``. After ``shutdown`` the hub
    has ended every stream (status OK); this waits for them to finish, then
    closes the server (cancelling stragglers).
    """
    health_status = ServiceStatus()
    health_status.set(True)
    stream_service = StreamService(config, hub)
    services: list[Any] = [stream_service, Health({stream_service: [health_status]})]
    services = ServerReflection.extend(services, pool=_reflection_pool())
    batch = FrameBatch()
    server = _Server(
        services,
        codec=PassThroughCodec(),
        guard=guard,
        batch=batch,
        header_timeout=config.header_timeout,
    )
    # Only grpclib runs on the asyncio loop: whatever its callbacks raise
    # (reported to the loop's exception handler, never to trio) is a gRPC
    # connection's failure, logged and counted like the others.
    loop: asyncio.AbstractEventLoop = trio_asyncio.current_loop.get()  # type: ignore[assignment]
    loop.set_exception_handler(
        lambda _loop, context: guard.record(
            "grpc", context.get("exception") or RuntimeError(context.get("message", "?"))
        )
    )
    await trio_asyncio.aio_as_trio(server.listen)(sock, ssl_context)  # type: ignore[no-untyped-call]
    port = int(sock.getsockname()[1])
    _log.info("grpc serving", extra={"port": port})
    # The fan-out writes the direct path's frames after each slice.
    hub.add_flusher(batch.flush)
    deadline: float | None = None
    try:
        task_status.started(port)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_track_health, source, health_status, shutdown)
            await shutdown.wait()
            deadline = trio.current_time() + config.shutdown_timeout
            health_status.set(False)
            # The hub has closed every stream's sink; let the handlers finish,
            # keeping a little of the budget for the GOAWAY below.
            with trio.move_on_at(deadline - min(1.0, config.shutdown_timeout / 4)):
                # The handlers end on the asyncio side (after grpclib has sent
                # their OK trailers), which has no trio.Event to signal; a
                # short poll during shutdown only is simplest.
                while hub.statistics().connections["grpc"] or not server.idle():  # noqa: ASYNC110
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    finally:
        server.close()
        # Shielded (a cancelled nursery must still close the server), but
        # within the shutdown budget as a whole.
        end = deadline if deadline is not None else trio.current_time() + config.shutdown_timeout
        with trio.CancelScope(shield=True), trio.move_on_at(end):
            await trio_asyncio.aio_as_trio(server.wait_closed)()  # type: ignore[no-untyped-call]
            grace = max(0.0, min(1.0, end - trio.current_time()))
            await trio_asyncio.aio_as_trio(server.close_connections)(grace)  # type: ignore[no-untyped-call]


async def _track_health(source: Source, status: ServiceStatus, shutdown: trio.Event) -> None:
    while not shutdown.is_set():
        status.set(await source.healthy())
        await trio.sleep(1.0)
