"""The gRPC stream (SPEC 3): ``proto.StreamService/Events``, start to end.

grpclib is asyncio-only; the server (:mod:`~plasma_trio.transports.grpc_server`)
runs it on the trio-asyncio loop that ``app.serve`` opens around the root
nursery. Per stream, :meth:`StreamService.events` is the life of the stream:
admission (the token of its metadata), then two tasks, one (asyncio) reading
its Requests (each replaces the topics, with a replay first when it carries
a ``lastEventId``; ``forceClose`` ends it with OK), one (trio) writing: the
session's :meth:`Outbox.pump <plasma_trio.outbox.Outbox.pump>`, which writes
the replays and whatever waits when the windows open, then the end. Its
:class:`~plasma_trio.session.Session` holds every rule; the hub's fan-out
writes live events through the
:class:`~plasma_trio.transports.grpc_writer.GrpcWriter` directly.

Plasma's semantics: nothing is sent before the first ``Request`` with
topics; a stream too far behind ends with ``RESOURCE_EXHAUSTED``, the
connection limit is ``UNAVAILABLE``, a topic limit ``INVALID_ARGUMENT``; at
shutdown every stream ends with OK.
"""

from __future__ import annotations

import asyncio
from contextlib import ExitStack
from functools import partial
from typing import TYPE_CHECKING, Any, Final

import trio_asyncio
from grpclib.const import Cardinality, Handler, Status
from grpclib.exceptions import GRPCError, StreamTerminatedError

from plasma_trio._proto.proto import Payload, Request
from plasma_trio.auth import bearer
from plasma_trio.logs import ERROR
from plasma_trio.seams.grpclib import (
    h2_stream,
    h2_stream_state,
    reset_with_status,
    send_initial_metadata_once,
    stream_connection,
)
from plasma_trio.session import Ask, Ending, Phase, Refused, admit, log_refusal
from plasma_trio.transports.grpc_direct import writer_of
from plasma_trio.transports.grpc_requests import (
    GRPC_STATUS,
    gap_payload,
    grpc_status,
    metadata,
    requests,
)
from plasma_trio.transports.grpc_writer import GrpcWriter

if TYPE_CHECKING:
    from grpclib.server import Stream

    from plasma_trio.config import Config
    from plasma_trio.hub import Hub
    from plasma_trio.session import Session

__all__ = ["StreamService", "gap_payload", "grpc_status"]

SERVICE_NAME: Final = "proto.StreamService"
_log = ERROR.getChild("grpc")


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
        """One stream, start to end: admission (the token of its metadata),
        then its Requests (each replaces the topics) and its writer's task."""
        peer = stream.peer.addr() if stream.peer is not None else None
        ask = Ask(
            transport="grpc",
            status=grpc_status,
            token=bearer(metadata(stream, "authorization")),
            remote_addr=f"{peer[0]}:{peer[1]}" if peer else "",
            user_agent=metadata(stream, "user-agent") or "",
            require_topics=False,  # the topics come with its Requests
        )
        try:
            session = admit(self.hub, self.config, ask)
        except Refused as exc:
            log_refusal(self.hub, ask, exc)
            raise GRPCError(GRPC_STATUS[exc.kind], exc.message) from None
        writer = GrpcWriter(session)
        try:
            with session.subscribed(writer), ExitStack() as stack:
                out = session.out
                assert out is not None
                reader = asyncio.ensure_future(self._read_requests(stream, session, writer))
                stack.callback(reader.cancel)
                pump = asyncio.ensure_future(
                    trio_asyncio.trio_as_aio(self._write)(session)  # type: ignore[no-untyped-call]
                )
                stack.callback(pump.cancel)
                stack.callback(writer.detach)
                writer.release = partial(_release, stream, pump, self._cut_off_message())
                await asyncio.wait([pump])
                if pump.cancelled():
                    # Released: the stream was reset (or its connection
                    # closed); the status below cannot reach the client.
                    raise GRPCError(Status.RESOURCE_EXHAUSTED, self._cut_off_message())
                pump.result()
                writer.flush()  # our frames before grpclib's trailers
                if out.broken:
                    return
                if out.phase is Phase.CUT_OFF:
                    raise GRPCError(Status.RESOURCE_EXHAUSTED, self._cut_off_message())
                if writer.error is not None:
                    raise writer.error
                if session.ending is Ending.TOKEN_EXPIRED:
                    raise GRPCError(Status.UNAUTHENTICATED, "token expired")
                # forceClose or shutdown: status OK
        except Refused as exc:
            # Shutdown began or the limit was reached (logged by the session).
            raise GRPCError(GRPC_STATUS[exc.kind], exc.message) from None

    async def _write(self, session: Session) -> None:
        """The stream's writing task (trio): replays, what waits, the end."""
        out = session.out
        assert out is not None
        await out.pump()
        if not out.broken:
            await out.finish(self.config.subscriber_write_timeout)

    def _cut_off_message(self) -> str:
        return (
            f"cut off: fell {self.config.subscriber_buffer} events"
            f" ({self.config.subscriber_buffer_bytes} bytes) behind, or accepted"
            f" nothing for {self.config.subscriber_write_timeout:g}s"
        )

    async def _read_requests(
        self, stream: Stream[Request, Any], session: Session, writer: GrpcWriter
    ) -> None:
        try:
            async for request in requests(stream, self.max_request_bytes):
                if request.force_close:
                    session.end(Ending.FORCE_CLOSE)
                    return
                try:
                    topics = session.check_topics(e.type for e in request.events)
                except Refused as exc:
                    self._refuse(session, writer, GRPCError(GRPC_STATUS[exc.kind], exc.message))
                    return
                out = session.out
                assert out is not None
                if topics and writer.connection is None and out.phase is Phase.OPEN:
                    await self._attach(stream, writer)
                last_id = request.last_event_id if topics else ""
                if last_id and self.hub.stream_position is not None:
                    # redis-streams: catch up with the client's position and
                    # ask Redis whether its entries still exist (await first).
                    await trio_asyncio.trio_as_aio(session.locate)(last_id)  # type: ignore[no-untyped-call]
                # The replay starts and the topics change in one step (nothing
                # awaited): live events from now on come after the replay's
                # end; the session skips whatever this stream was already sent.
                gap = session.set_topics(topics, last_id)
                if gap is not None:
                    out.put(gap)
                writer.flush()
        except (StreamTerminatedError, ConnectionError):
            # The client went away: the writer notices through cancellation.
            return
        except GRPCError as exc:
            self._refuse(session, writer, exc)  # a malformed or oversized Request
            return
        # The client half-closed its side: keep delivering until it cancels.

    @staticmethod
    def _refuse(session: Session, writer: GrpcWriter, error: GRPCError) -> None:
        """A later Request is refused: this stream alone ends, with ``error``."""
        writer.error = error
        session.end(Ending.BAD_REQUEST, status=error.status.name)

    @staticmethod
    async def _attach(stream: Stream[Request, Any], sink: GrpcWriter) -> None:
        """Send the response headers, then let the fan-out write this stream's
        frames directly (``grpc_direct``). Called at the first ``Request``
        with topics: nothing is sent before it (plasma's behaviour), and a
        refused first ``Request`` still gets a trailers-only response."""
        writer = writer_of(stream_connection(stream))
        handle = h2_stream(stream)
        if writer is None or handle.id is None:
            # Every connection of our server has its writer (grpc_server).
            raise GRPCError(Status.INTERNAL, "not a connection of this server")
        await send_initial_metadata_once(stream)
        state = h2_stream_state(handle)
        if state is not None:
            sink.attach(writer, state, handle.id)


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
    direct = writer_of(stream_connection(stream))
    flush = direct.flush if direct is not None else None
    reset_with_status(stream, Status.RESOURCE_EXHAUSTED, message, flush=flush)
    writer.cancel()
