"""The gRPC stream's writer: how one stream's messages go out.

A :class:`GrpcWriter` is the :class:`~plasma_trio.writer.Writer` of one
``proto.StreamService/Events`` stream (:mod:`plasma_trio.transports.grpc`
runs the stream; its :class:`~plasma_trio.session.Session` holds the rules
and its :class:`~plasma_trio.outbox.Outbox` the queue). It renders an item
as a gRPC message (the event's, encoded once per event) and writes it as
DATA frames of the connection's one write per fan-out slice
(:mod:`plasma_trio.transports.grpc_direct`).

What the windows (or the connection's socket) do not take waits in the
outbox, and the stream joins its connection's line: when the client opens a
window (a WINDOW_UPDATE) or the socket drains, the connection writes what
every waiting stream holds, in turn, in one write, from the protocol
callback itself, with no task woken. A window smaller than a message takes
part of it (a DATA frame of what fits), so a client granting little at a
time is never stuck.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from plasma_trio.replay import Gap
from plasma_trio.stamped import StampedEvent
from plasma_trio.transports.grpc_direct import DONE, MORE, STUCK
from plasma_trio.transports.grpc_requests import gap_payload
from plasma_trio.transports.wire import GRPC_MESSAGE, grpc_message

if TYPE_CHECKING:
    from collections.abc import Callable

    from grpclib.exceptions import GRPCError
    from h2.stream import H2Stream

    from plasma_trio.session import Session
    from plasma_trio.transports.grpc_direct import ConnectionWriter
    from plasma_trio.writer import Buffer, End, Item

__all__ = ["GrpcWriter"]


def _message(payload: bytes) -> bytes:
    """A serialised ``Payload`` as a gRPC message: not compressed, 4-byte length."""
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


class GrpcWriter:
    """One gRPC stream's :class:`~plasma_trio.writer.Writer` (see the module doc)."""

    heartbeats = False  # HTTP/2 keeps idle streams alive by itself
    wire_key = GRPC_MESSAGE
    __slots__ = (
        "connection",
        "error",
        "h2_stream",
        "in_line",
        "parked",
        "release",
        "session",
        "tail",
    )

    def __init__(self, session: Session) -> None:
        self.session = session
        # Set at the first Request with topics, once the headers went out.
        self.connection: ConnectionWriter | None = None
        self.h2_stream: H2Stream | None = None
        self.tail = b""  # the DATA frame header's type, flags and stream id
        self.in_line = False  # in the connection's line (what waits is written by it)
        self.parked = False  # waiting for its own window (written by the connection too)
        # Resets the stream at once (set by the handler): a cut-off while stalled.
        self.release: Callable[[], None] | None = None
        # Why the stream ends, when a Request was refused (the handler raises it).
        self.error: GRPCError | None = None

    # -- the Writer ------------------------------------------------------------

    def render(self, item: Item) -> bytes:
        if type(item) is StampedEvent:
            return item.wire.get(GRPC_MESSAGE) or grpc_message(item)
        if isinstance(item, Gap):
            return _message(gap_payload(item))
        return b""  # the end is the trailers; no heartbeats

    def write_nowait(self, data: Buffer) -> int:
        connection = self.connection
        if connection is None:
            return 0  # no headers yet: what waits goes at attach
        if connection.waiting and not self.in_line:
            self._join(connection)  # others wait for the connection: they go first
            return 0
        h2_stream = self.h2_stream
        assert h2_stream is not None
        taken = connection.send(h2_stream, self.tail, data)
        if taken < len(data):
            if connection.blocked():
                if not self.in_line:
                    self._join(connection)
            elif not self.in_line and not self.parked:
                self.parked = True  # its own window: others go on
                connection.parked[self] = None
        return taken

    async def wait_writable(self) -> None:
        # The connection writes what waits (drain_turn); the outbox wakes its
        # task when all of it is written. Frames written meanwhile go now.
        self.flush()
        await trio.sleep_forever()

    async def receive(self) -> None:
        # The stream's Requests are read by their own task (grpc.py).
        self.flush()
        await trio.sleep_forever()

    def close(self, end: End, *, stalled: bool) -> None:
        if stalled and self.release is not None:
            self.release()

    # -- the connection's side ---------------------------------------------------

    def attach(self, connection: ConnectionWriter, h2_stream: H2Stream, stream_id: int) -> None:
        """The stream's headers went out: write what waits, and from now on."""
        self.connection = connection
        self.h2_stream = h2_stream
        self.tail = b"\x00\x00" + stream_id.to_bytes(4, "big")
        out = self.session.out
        if out is not None:
            out.flush()
        self.flush()

    def _join(self, connection: ConnectionWriter) -> None:
        if self.parked:
            self.parked = False
            connection.parked.pop(self, None)
        self.in_line = True
        connection.waiting.append(self)

    def drain_turn(self, limit: int) -> int:
        """The connection can write: up to ``limit`` frames of what waits."""
        out = self.session.out
        if out is not None and out.depth:
            sent = out.flush(limit)
            if out.depth:
                return MORE if sent else STUCK
        self.in_line = self.parked = False
        return DONE

    def park(self) -> None:
        """Out of the connection's line, waiting for its own window (``Backlogged``)."""
        self.in_line = False
        self.parked = True

    def progress(self, now: float) -> None:
        """Its connection is moving (``Backlogged``)."""
        out = self.session.out
        if out is not None and out.depth:
            self.session.stall(now)

    def flush(self) -> None:
        """Write the connection's frames now (outside a fan-out slice)."""
        if self.connection is not None:
            self.connection.flush()

    def detach(self) -> None:
        """The stream is over: leave the connection's line."""
        connection = self.connection
        if connection is not None:
            if self.in_line and self in connection.waiting:
                connection.waiting.remove(self)
            connection.parked.pop(self, None)
        self.in_line = self.parked = False
