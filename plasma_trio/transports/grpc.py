"""The gRPC stream (SPEC 3): ``proto.StreamService`` on grpclib's asyncio server.

Theory of operation
-------------------
grpclib is asyncio-only; the server (``transports/grpc_server.py``) runs it
on the trio-asyncio loop that ``app.serve`` opens around the root nursery.
This module is the streams' side: :class:`StreamService` (one handler per
stream) and :class:`GrpcSink` (the stream's side of the hub). grpclib's
undocumented objects are reached through :mod:`plasma_trio.seams.grpclib`.

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
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
from collections import deque
from contextlib import ExitStack
from functools import partial
from typing import TYPE_CHECKING, Any, Final

import trio_asyncio
from grpclib.const import Cardinality, Handler, Status
from grpclib.exceptions import GRPCError, StreamTerminatedError

from plasma_trio._proto.proto import EventType, Payload, Request
from plasma_trio.auth import allows, bearer
from plasma_trio.errors import ServiceUnavailable
from plasma_trio.hub import Deliveries
from plasma_trio.logs import ACCESS, ERROR
from plasma_trio.seams.grpclib import (
    TruncatedMessage,
    connection_writer,
    h2_stream,
    h2_stream_state,
    recv_exact,
    reset_with_status,
    send_initial_metadata_once,
)
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
from plasma_trio.transports.grpc_direct import (
    BLOCKED_CONNECTION,
    BLOCKED_STREAM,
    MORE,
    SENT,
)
from plasma_trio.transports.wire import GRPC_HEAD, GRPC_MESSAGE, grpc_message, grpc_payload

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from grpclib.server import Stream
    from h2.stream import H2Stream

    from plasma_trio.auth import Grant
    from plasma_trio.config import Config
    from plasma_trio.hub import Hub, StampedEvent, Subscription
    from plasma_trio.transports.grpc_direct import ConnectionWriter

__all__ = ["GrpcSink", "StreamService", "gap_payload"]

SERVICE_NAME: Final = "proto.StreamService"
GAP_TYPE: Final = "plasma-gap"
_log = ERROR.getChild("grpc")


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

    def heartbeat(self) -> None:
        """(Never called: no heartbeats.)"""

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
        writer = connection_writer(stream)
        handle = h2_stream(stream)
        if writer is None or handle.id is None:
            return  # not our server's connection: grpclib's path only
        await send_initial_metadata_once(stream)
        state = h2_stream_state(handle)
        if state is not None:
            sink.attach(writer, state, handle.id)

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
    handle = h2_stream(stream)
    while True:
        try:
            meta = await recv_exact(handle, 5)
        except TruncatedMessage:  # fewer than 5 bytes before END_STREAM
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
            body = await recv_exact(handle, length) if length else b""
        except TruncatedMessage:  # the stream ended before the message did
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
    is stalled too, and the connection is closed (``reset_with_status``).
    """
    reset_with_status(stream, Status.RESOURCE_EXHAUSTED, message)
    writer.cancel()
