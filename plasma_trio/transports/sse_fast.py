"""The SSE fast path: the hub's fan-out writes each frame straight to the socket.

Theory of operation
-------------------
A :class:`SocketWriter` is the :class:`~plasma_trio.session.Writer` of one
plain-HTTP/1.1 SSE connection; its :class:`~plasma_trio.session.Session`
holds every rule (admission, resume, the replay's merge with live events,
bounds, the deadline, the ending, the counts and the access-log line). Read
top to bottom, :meth:`SocketWriter.run` is the life of a stream: locate,
subscribe (the gap notice first), the replay as the client drains it, live
events, the end.

``offer`` (called by ``Hub.publish`` through the session, synchronously)
writes the event's pre-encoded chunk
(:func:`~plasma_trio.transports.wire.sse_chunk`, built once per event) with
one non-blocking ``write`` on the socket. Only when the kernel buffer is full
does anything queue: the unwritten rest goes to the backlog and the
connection's own task is woken to drain it when the socket is writable,
joining everything queued into one ``writev``. While the backlog is
non-empty, new frames join it (so order is kept); a backlog over the
session's bound makes ``offer`` refuse, and the hub cuts the subscriber off.

The connection's task is the one task per connection: it waits for the
socket to become readable, which is how a client that goes away (EOF or
reset) is noticed at once, even when no event flows; it waits for
writability only while there is a backlog.

The response is chunked HTTP/1.1 with the same headers and bytes as the
Quart path; the stream ends with the last chunk (``0\\r\\n\\r\\n``) on
shutdown or cut-off, then the connection closes. Heartbeats come from the
session's watcher (``PLASMA_SSE_HEARTBEAT_INTERVAL`` of silence), through the
same write path.
"""

from __future__ import annotations

import errno
import itertools
import os
from collections import deque
from typing import TYPE_CHECKING, Final

import trio

from plasma_trio.core.sse import HEARTBEAT, encode_retry, gap_frame
from plasma_trio.session import Gap, Refused
from plasma_trio.transports.wire import CHUNK, HTTP_REFUSAL, REASONS, chunk, sse_chunk

if TYPE_CHECKING:
    from plasma_trio.config import Config
    from plasma_trio.hub import StampedEvent
    from plasma_trio.session import Session

__all__ = ["SocketWriter", "refusal", "response_head"]

LAST_CHUNK: Final = b"0\r\n\r\n"
# Frames per writev (the kernel's IOV_MAX on Linux).
_IOV_MAX: Final = 1024


HEARTBEAT_CHUNK: Final = chunk(HEARTBEAT)


def refusal(refused: Refused) -> bytes:
    """A whole refusal response (the connection closes after it), as the
    Quart app answers it."""
    status = HTTP_REFUSAL[refused.kind]
    body = f"{REASONS[status]}: {refused.message}\n".encode()
    extra = b'www-authenticate: Bearer realm="plasma"\r\n' if status == 401 else b""
    head = (
        f"HTTP/1.1 {status} {REASONS[status]}\r\n".encode()
        + b"content-type: text/plain; charset=utf-8\r\n"
        + extra
        + b"connection: close\r\ncontent-length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
    )
    return head + body


def response_head(origin: str) -> bytes:
    """Status line and headers, the same as the Quart path sends."""
    lines = [
        b"HTTP/1.1 200 OK",
        b"content-type: text/event-stream",
        b"cache-control: no-cache",
        b"x-accel-buffering: no",
    ]
    if origin:
        lines.append(b"access-control-allow-origin: " + origin.encode("latin-1"))
    lines.append(b"transfer-encoding: chunked")
    return b"\r\n".join(lines) + b"\r\n\r\n"


class SocketWriter:
    """One fast-path SSE connection: its session's writer and the connection's task."""

    heartbeats = True

    def __init__(self, sock: trio.socket.SocketType, session: Session) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.session = session
        # Bytes owed to the client (the PLASMA_SUBSCRIBER_BUFFER_BYTES bound).
        self.queued_bytes = 0
        self.backlog: deque[bytes | memoryview] = deque()
        # Per backlog frame, what it carries (counted as delivered when the
        # frame is fully written): a live event (its lag sampled), a count of
        # replayed events, or 0 (a heartbeat, a notice, the head).
        self.marks: deque[StampedEvent | int] = deque()
        self.closed = False
        self.cut_off = False
        self.broken = False
        self._wait_scope: trio.CancelScope | None = None

    # -- the session's side (synchronous, never blocks) -----------------------

    def offer(self, event: StampedEvent) -> bool:
        # The hot path: one non-blocking write of the shared, pre-encoded chunk.
        if not (self.backlog or self.closed or self.broken):
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
        if self.closed or self.broken:
            return True  # ending: nothing more to deliver, nothing to cut off
        data = sse_chunk(event)
        if not self.session.fits(len(self.backlog), self.queued_bytes, len(data)):
            return False
        self._append(data, event)
        return True

    def notice(self, gap: Gap) -> None:
        if not (self.closed or self.broken):
            self.write(chunk(gap_frame(gap.requested, gap.oldest)))

    def heartbeat(self) -> None:
        self.write(HEARTBEAT_CHUNK)

    def close(self, *, cut_off: bool) -> None:
        if not self.closed:
            self.closed = True
            self.cut_off = cut_off
            self._wake()

    @property
    def queue_depth(self) -> int:
        """Frames owed to the client (events, mostly)."""
        return len(self.backlog)

    # -- writing -------------------------------------------------------------

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
        if self.broken:
            return
        if self.backlog:
            self._append(data, mark)
            return
        sent = self._send(data)
        if sent < len(data):
            if not self.broken:
                self._append(memoryview(data)[sent:], mark)
                self.session.stall()
                self._wake()
        elif mark:
            self._written(mark)

    def _send(self, data: bytes | memoryview) -> int:
        try:
            sent = os.write(self.fd, data)
        except BlockingIOError:
            return 0
        except OSError:
            self._lost()
            return 0
        self.session.wrote = True
        return sent

    def _lost(self) -> None:
        # EPIPE, ECONNRESET...: the client is gone; the task notices and ends.
        self.broken = True
        self._wake()

    def _flush(self) -> None:
        """Write as much of the backlog as the kernel takes, in one ``writev``.

        Whole frames that were sent leave the backlog; a partly sent one stays
        as its unsent rest, so ``len(backlog)`` is always the number of frames
        still owed to the client (what the cut-off limit counts).
        """
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
        if self._wait_scope is not None:
            self._wait_scope.cancel()

    # -- the connection's task -----------------------------------------------

    async def run(self, config: Config) -> None:
        """Serve the stream until the client goes, the hub closes it, or it is cut off."""
        session = self.session
        try:
            try:
                await session.locate()  # redis-streams: before subscribing
                with session.subscribed(self) as gap:
                    first = [response_head(config.origin), chunk(encode_retry(config.sse_retry))]
                    if gap is not None:
                        first.append(chunk(gap_frame(gap.requested, gap.oldest)))
                    self.write(b"".join(first))
                    await self._serve()
                    if self.broken:
                        session.lost()
                    else:
                        await self._finish(config.subscriber_write_timeout)
            except Refused as exc:
                # Shutdown began or the limit was reached while locate waited.
                if session.refusal is None:
                    session.refuse(exc)
                self.write(refusal(exc))
        finally:
            self.sock.close()

    def _write_items(self, items: list[StampedEvent | Gap]) -> None:
        """Write a replay batch (or the live items held during it) in one write."""
        frames = [
            chunk(gap_frame(item.requested, item.oldest))
            if isinstance(item, Gap)
            else sse_chunk(item)
            for item in items
        ]
        self.write(b"".join(frames), sum(1 for item in items if not isinstance(item, Gap)))

    async def _serve(self) -> None:
        sock = self.sock
        session = self.session
        while not self.closed and not self.broken:
            if session.replaying and not self.backlog:
                if items := await session.replay_step():
                    self._write_items(items)
                # A client that reads as fast as it is written would otherwise
                # take its whole replay in one step of the event loop.
                await trio.lowlevel.checkpoint()
                continue
            with trio.CancelScope() as scope:
                # Woken (cancelled) by _wake when a backlog appears, or the
                # stream is closed (cut off, shutdown) or lost.
                self._wait_scope = scope
                if self.backlog:
                    await trio.lowlevel.wait_writable(sock)
                else:
                    # Readable means data or EOF: how a client that goes
                    # away is noticed while no event flows.
                    await trio.lowlevel.wait_readable(sock)
            self._wait_scope = None
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
                self.broken = True
                return
            if not data:
                self.broken = True  # EOF: the client went away
                return
            # Anything the client sends on an SSE connection is ignored.

    async def _finish(self, write_timeout: float) -> None:
        """End the response: what is queued, then the last chunk.

        At shutdown the client gets what is queued (bounded by the server's
        shutdown deadline). A cut-off client is behind by definition: it gets
        one last non-blocking try, then the connection closes (its reconnect
        with Last-Event-ID replays what it missed).
        """
        if self.broken:
            return
        self.write(LAST_CHUNK)
        if not self.cut_off:
            # Bounded like any write (the watcher may not see this session:
            # at shutdown the hub has forgotten it).
            with trio.move_on_after(write_timeout):
                while self.backlog and not self.broken:
                    await trio.lowlevel.wait_writable(self.sock)
                    self._flush()
        elif self.backlog:
            self._flush()
