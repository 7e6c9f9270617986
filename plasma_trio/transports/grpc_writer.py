"""The gRPC stream's writer: how one stream's messages go out.

A :class:`GrpcWriter` is the :class:`~plasma_trio.session.Writer` of one
``proto.StreamService/Events`` stream (:mod:`plasma_trio.transports.grpc`
runs the stream; its :class:`~plasma_trio.session.Session` holds the rules).
Live events go out as DATA frames of the connection's one write per fan-out
slice (:mod:`plasma_trio.transports.grpc_direct`); what cannot go now waits
in the backlog (the connection is blocked) or in the stream's task queue
(its own window, a notice, a replay, the end), which the handler drains.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, Final, TypeAlias

from plasma_trio.replay import event_size
from plasma_trio.session import Phase
from plasma_trio.transports.grpc_direct import BLOCKED_CONNECTION, BLOCKED_STREAM, MORE, SENT
from plasma_trio.transports.wire import GRPC_HEAD, GRPC_MESSAGE, grpc_message

if TYPE_CHECKING:
    from collections.abc import Callable

    from grpclib.exceptions import GRPCError
    from h2.stream import H2Stream

    from plasma_trio.hub import StampedEvent
    from plasma_trio.session import Gap, Session
    from plasma_trio.transports.grpc_direct import ConnectionWriter

__all__ = ["CUT_OFF", "REPLAY", "SHUTDOWN", "GrpcWriter", "StreamItem"]


class _Marker:
    """Queue markers for the stream's task: why a stream ends, or what to send next."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"


CUT_OFF: Final = _Marker("cut off")
SHUTDOWN: Final = _Marker("end")  # shutdown, expiry, forceClose, a refused Request
REPLAY: Final = _Marker("replay")  # send the session's replay now

# What the stream's task takes off its queue.
StreamItem: TypeAlias = "StampedEvent | Gap | _Marker"


class GrpcWriter:
    """One gRPC stream's :class:`~plasma_trio.session.Writer`: direct frames,
    a backlog, or its task.

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

    Backlog and queue together are bounded by the session's rule
    (:meth:`~plasma_trio.session.Session.fits`); a stream over it is cut off.
    The session counts the stream as stalled while events wait for the
    client (backlog, or a send waiting for flow control or a full socket).
    ``release`` (set by the handler) resets the stream at once; a
    cut-off while stalled calls it, so that a client that stopped reading
    gives its slot back now, not at shutdown.
    """

    heartbeats = False  # HTTP/2 keeps idle streams alive by itself
    __slots__ = (
        "backlog",
        "direct",
        "error",
        "h2_stream",
        "phase",
        "queue",
        "queued_bytes",
        "release",
        "sending",
        "session",
        "stream_id",
        "writer",
    )

    def heartbeat(self) -> None:
        """(Never called: no heartbeats.)"""

    def __init__(self, session: Session) -> None:
        self.session = session
        # The task's items: events, notices, and markers (replay now, the end).
        self.queue: asyncio.Queue[StreamItem] = asyncio.Queue()
        self.backlog: deque[StampedEvent] = deque()
        self.queued_bytes = 0
        self.phase = Phase.OPEN
        self.release: Callable[[], None] | None = None
        # Why the stream ends, when a Request was refused (the task raises it).
        self.error: GRPCError | None = None
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
            and self.phase is Phase.OPEN
            and not self.sending
            and not self.backlog
            and self.queue.empty()
            and not self.session.replaying
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
                session = self.session
                session.sent(event)
                session.delivered(event)  # written with this slice's flush
                return True
            self.direct = False
            if status == BLOCKED_CONNECTION:
                self.backlog.append(event)
                self.queued_bytes += event_size(event)
                self.session.stall()
                writer.waiting.append(self)
                return True
            # BLOCKED_STREAM: the stream's task takes over (below).
        if self.phase is not Phase.OPEN:
            return True
        size = event_size(event)
        queued = len(self.backlog) + self.queue.qsize()
        if not self.session.fits(queued, self.queued_bytes, size):
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
            self.session.sent(event)
            self.session.delivered(event)
        self.session.unstall()
        self.resume_direct()
        return SENT

    def progress(self, now: float) -> None:
        """Its connection is moving (``Backlogged``)."""
        if self.backlog:
            self.session.stall(now)

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
        self.session.unstall()  # the task keeps it from here on

    def detach(self) -> None:
        """The stream is over: leave the connection's line."""
        if self.backlog:
            if self.writer is not None:
                self.writer.waiting.remove(self)
            self.backlog.clear()
        self.direct = False

    def notice(self, gap: Gap) -> None:
        """The live gap notice: a ``plasma-gap`` Payload before the next event
        (not before the stream's first ``Request``: nothing is)."""
        if self.phase is Phase.OPEN and self.writer is not None:
            self.put(gap)

    def put(self, item: Gap | _Marker) -> None:
        """Queue a notice or a marker for the stream's task (the direct path pauses)."""
        self.direct = False
        self._handover()
        self.queue.put_nowait(item)

    def taken(self, event: StampedEvent) -> None:
        """The task took ``event`` off the queue."""
        self.queued_bytes -= event_size(event)

    def close(self, *, cut_off: bool) -> None:
        if self.phase is not Phase.OPEN:
            # Already ending (forceClose, a bad request), but the client may
            # have stopped reading meanwhile: a cut-off still releases it.
            if cut_off and self.session.stalled_since is not None and self.release is not None:
                self.release()
            return
        self.phase = Phase.CUT_OFF if cut_off else Phase.ENDING
        self.direct = False
        if cut_off:
            # The stream is behind by definition: drop what is queued so the
            # status goes out as soon as possible.
            self.detach()
            while not self.queue.empty():
                self.queue.get_nowait()
            self.queued_bytes = 0
            if self.session.stalled_since is not None and self.release is not None:
                self.release()
        else:
            self._handover()  # shutdown: what waits is still sent
        self.queue.put_nowait(CUT_OFF if cut_off else SHUTDOWN)
