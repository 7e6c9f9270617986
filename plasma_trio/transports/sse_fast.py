"""The SSE fast path: the hub's fan-out writes each frame straight to the socket.

A :class:`SocketWriter` is the :class:`~plasma_trio.session.Writer` of one
plain-HTTP/1.1 SSE connection; its :class:`~plasma_trio.session.Session`
holds every rule. Read top to bottom, :meth:`SocketWriter.run` is the life
of a stream: locate, subscribe (the gap notice first), the replay as the
client drains it, live events, the end.

``offer`` (the hub's fan-out, through the session, synchronously) writes the
event's shared, pre-encoded chunk (:func:`~plasma_trio.transports.wire.sse_chunk`)
with one non-blocking ``write``. Only when the kernel buffer is full does
anything queue: the rest goes to the backlog, new frames join it (order is
kept), the connection's task drains it in one ``writev`` when the socket is
writable, and a backlog over the session's bound makes ``offer`` refuse (the
hub cuts the subscriber off). The task otherwise waits for the socket to
become readable: a client that goes away (EOF, reset) is noticed at once,
even when no event flows. The response is chunked HTTP/1.1 with the Quart
path's headers and bytes; it ends with the last chunk, then the connection
closes.
"""

from __future__ import annotations

import errno
import itertools
import os
from collections import deque
from typing import TYPE_CHECKING, Final

import trio

from plasma_trio.core.sse import encode_retry
from plasma_trio.session import Gap, Phase, Refused
from plasma_trio.transports.wire import (
    CHUNK,
    HEARTBEAT_CHUNK,
    LAST_CHUNK,
    chunk,
    gap_chunk,
    http1_refusal,
    sse_chunk,
    sse_response_head,
)

if TYPE_CHECKING:
    from plasma_trio.config import Config
    from plasma_trio.hub import StampedEvent
    from plasma_trio.session import Session

__all__ = ["SocketWriter"]

# Frames per writev (the kernel's IOV_MAX on Linux).
_IOV_MAX: Final = 1024


_OPEN: Final = Phase.OPEN  # (a global: an Enum's member lookup costs ~90 ns)


class SocketWriter:
    """One fast-path SSE connection: its session's writer and the connection's task."""

    heartbeats = True  # (the watcher sends them through write)
    __slots__ = ("_waiting", "backlog", "fd", "marks", "phase", "queued_bytes", "session", "sock")

    def __init__(self, sock: trio.socket.SocketType, session: Session) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.session = session
        # Bytes owed to the client (the PLASMA_SUBSCRIBER_BUFFER_BYTES bound).
        self.queued_bytes = 0
        self.backlog: deque[bytes | memoryview] = deque()
        # Per backlog frame, what it carries, counted once fully written: a live
        # event (its lag sampled), a count of replayed events, or 0.
        self.marks: deque[StampedEvent | int] = deque()
        self.phase = Phase.OPEN
        self._waiting: trio.CancelScope | None = None

    # -- the session's side (synchronous, never blocks) -----------------------

    def offer(self, event: StampedEvent) -> bool:
        # The hot path: one non-blocking write of the shared, pre-encoded chunk
        # (write() inlined: one Python call fewer on every delivery).
        if self.phase is _OPEN and not self.backlog:
            data = event.wire.get(CHUNK) or sse_chunk(event)
            try:
                sent = os.write(self.fd, data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._lost()
                return True
            if sent < len(data):
                self._append(memoryview(data)[sent:], event)
                self.session.stall()
                self._wake()
            else:
                self.session.delivered(event)
            return True
        if self.phase is not Phase.OPEN:
            return True  # ending: nothing more to deliver, nothing to cut off
        data = sse_chunk(event)
        if not self.session.fits(len(self.backlog), self.queued_bytes, len(data)):
            return False
        self._append(data, event)
        return True

    def notice(self, gap: Gap) -> None:
        if self.phase is Phase.OPEN:
            self.write(gap_chunk(gap))

    def heartbeat(self) -> None:
        self.write(HEARTBEAT_CHUNK)

    def close(self, *, cut_off: bool) -> None:
        if self.phase is Phase.OPEN:
            self.phase = Phase.CUT_OFF if cut_off else Phase.ENDING
            self._wake()

    @property
    def broken(self) -> bool:  # (a property: mypy does not narrow it across calls)
        return self.phase is Phase.BROKEN

    @property
    def queue_depth(self) -> int:
        """Frames owed to the client (events, mostly)."""
        return len(self.backlog)

    def _append(self, data: bytes | memoryview, mark: StampedEvent | int = 0) -> None:
        self.backlog.append(data)
        self.marks.append(mark)
        self.queued_bytes += len(data)

    def _written(self, mark: StampedEvent | int) -> None:
        """A frame is fully written: count what it carried."""
        if isinstance(mark, int):
            if mark:
                self.session.delivered_replay(mark)
        else:
            self.session.delivered(mark)

    def write(self, data: bytes, mark: StampedEvent | int = 0) -> None:
        """Write now if nothing is queued; queue what the kernel does not take.
        ``mark``: what ``data`` carries, counted once it is all written."""
        if self.phase is Phase.BROKEN:
            return
        if self.backlog:
            self._append(data, mark)
            return
        try:
            sent = os.write(self.fd, data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._lost()
            return
        self.session.wrote = True
        if sent < len(data):
            if not self.broken:
                self._append(memoryview(data)[sent:], mark)
                self.session.stall()
                self._wake()
        elif mark:
            self._written(mark)

    def _lost(self) -> None:
        # EPIPE, ECONNRESET...: the client is gone; the task notices and ends.
        self.phase = Phase.BROKEN
        self._wake()

    def _flush(self) -> None:
        """Write what the kernel takes of the backlog, in one ``writev``; a
        partly sent frame stays as its rest, so ``len(backlog)`` is always the
        number of frames owed (what the bound counts)."""
        backlog = self.backlog
        batch = list(itertools.islice(backlog, _IOV_MAX))
        try:
            sent = os.writev(self.fd, batch)
        except BlockingIOError:
            return
        except OSError:
            self._lost()
            return
        if sent:
            # Progress: the write deadline counts from the last byte taken.
            self.session.stall()
            self.queued_bytes -= sent
        while sent:
            head = backlog[0]
            if sent >= len(head):
                sent -= len(head)
                backlog.popleft()
                mark = self.marks.popleft()
                if mark:
                    self._written(mark)
            else:
                backlog[0] = memoryview(head)[sent:]
                sent = 0
        if not backlog:
            self.session.unstall()

    def _wake(self) -> None:
        if self._waiting is not None:  # the task waits: let it look again
            self._waiting.cancel()

    # -- the connection's task -----------------------------------------------

    async def run(self, config: Config) -> None:
        """Serve the stream until the client goes, the hub closes it, or it is cut off."""
        session = self.session
        try:
            try:
                await session.locate()  # redis-streams: before subscribing
                with session.subscribed(self) as gap:
                    first = [
                        sse_response_head(config.origin),
                        chunk(encode_retry(config.sse_retry)),
                    ]
                    if gap is not None:
                        first.append(gap_chunk(gap))
                    self.write(b"".join(first))
                    await self._serve()
                    if self.phase is Phase.BROKEN:
                        session.lost()
                    else:
                        await self._finish(config.subscriber_write_timeout)
            except Refused as exc:
                # Shutdown began or the limit was reached while locate waited.
                if session.refusal is None:
                    session.refuse(exc)
                self.write(http1_refusal(exc))
        finally:
            self.sock.close()

    def _write_items(self, items: list[StampedEvent | Gap]) -> None:
        """A replay batch (or the live items held during it), in one write."""
        frames = [gap_chunk(i) if isinstance(i, Gap) else sse_chunk(i) for i in items]
        self.write(b"".join(frames), sum(not isinstance(i, Gap) for i in items))

    async def _serve(self) -> None:
        sock = self.sock
        session = self.session
        while self.phase is Phase.OPEN:
            if session.replaying and not self.backlog:
                if items := await session.replay_step():
                    self._write_items(items)
                # A client that reads as fast as it is written would otherwise
                # take its whole replay in one step of the event loop.
                await trio.lowlevel.checkpoint()
                continue
            with trio.CancelScope() as scope:
                self._waiting = scope  # _wake: a backlog, the end, or lost
                if self.backlog:
                    await trio.lowlevel.wait_writable(sock)
                else:
                    # Readable means data or EOF: how a client that goes
                    # away is noticed while no event flows.
                    await trio.lowlevel.wait_readable(sock)
            self._waiting = None
            if scope.cancelled_caught:
                continue
            if self.backlog:
                self._flush()
                continue
            try:
                data = os.read(self.fd, 4096)
            except BlockingIOError:
                continue
            except OSError as exc:
                if exc.errno not in (errno.ECONNRESET, errno.EPIPE, errno.ETIMEDOUT):
                    raise
                self.phase = Phase.BROKEN
                return
            if not data:
                self.phase = Phase.BROKEN  # EOF: the client went away
                return
            # Anything the client sends on an SSE connection is ignored.

    async def _finish(self, write_timeout: float) -> None:
        """End the response: what is queued, then the last chunk (a cut-off
        client, behind by definition, gets one non-blocking try; its
        reconnect with Last-Event-ID replays what it missed)."""
        if self.phase is Phase.BROKEN:
            return
        self.write(LAST_CHUNK)
        if self.phase is Phase.ENDING:
            # Bounded like any write (the watcher may not see this session:
            # at shutdown the hub has forgotten it).
            with trio.move_on_after(write_timeout):
                while self.backlog and not self.broken:
                    await trio.lowlevel.wait_writable(self.sock)
                    self._flush()
        elif self.backlog:
            self._flush()
