"""The SSE fast path: the hub's fan-out writes each frame straight to the socket.

Theory of operation
-------------------
A :class:`DirectSink` is the hub's sink for one plain-HTTP/1.1 SSE
connection. ``offer`` (called by ``Hub.publish``, synchronously) writes the
event's pre-encoded chunk (:func:`~plasma_trio.transports.wire.sse_chunk`,
built once per event)
with one non-blocking ``write`` on the socket. Only when the kernel buffer is
full does anything queue: the unwritten rest goes to the sink's backlog and
the connection's own task is woken to drain it when the socket is writable,
joining everything queued into one write. While the backlog is non-empty, new
frames join it (so order is kept); a backlog of ``PLASMA_SUBSCRIBER_BUFFER``
frames makes ``offer`` refuse, and the hub cuts the subscriber off.

The connection's task (:meth:`DirectSink.run`) is the one task per
connection: it waits for the socket to become readable, which is how a client
that goes away (EOF or reset) is noticed at once, even when no event flows;
it waits for writability only while there is a backlog. It owns the hub
subscription (a ``with`` block), so the subscription ends with it.

The response is chunked HTTP/1.1 with the same headers and bytes as the
Quart path; the stream ends with the last chunk (``0\\r\\n\\r\\n``) on
shutdown or cut-off, then the connection closes. Heartbeats are written by
the front door's heartbeat task to every connection idle for
``PLASMA_SSE_HEARTBEAT_INTERVAL``, through the same write path.
"""

from __future__ import annotations

import errno
import itertools
import math
import os
import time
from collections import deque
from contextlib import ExitStack
from typing import TYPE_CHECKING, Final

import trio

from plasma_trio.core.sse import HEARTBEAT, encode_retry, gap_frame
from plasma_trio.errors import ServiceUnavailable
from plasma_trio.hub import Deliveries
from plasma_trio.logs import log_sse_stream
from plasma_trio.session import Resume, expire_at, locate
from plasma_trio.transports.wire import CHUNK, chunk, sse_chunk

if TYPE_CHECKING:
    from plasma_trio.auth import Grant
    from plasma_trio.config import Config
    from plasma_trio.hub import Hub, StampedEvent, Subscription

__all__ = ["DirectSink", "response_head"]

LAST_CHUNK: Final = b"0\r\n\r\n"
# Frames per writev (the kernel's IOV_MAX on Linux).
_IOV_MAX: Final = 1024


HEARTBEAT_CHUNK: Final = chunk(HEARTBEAT)


def unavailable(reason: str) -> bytes:
    """A whole 503 response (the connection closes after it)."""
    body = f"Service Unavailable: {reason}\n".encode()
    head = (
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n"
        b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n"
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


class DirectSink:
    """One fast-path SSE connection: the hub's sink and the connection's task."""

    def __init__(
        self,
        sock: trio.socket.SocketType,
        *,
        buffer: int,
        max_bytes: int = 1 << 62,
        topics: frozenset[str],
        remote_addr: str,
        user_agent: str,
    ) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.buffer = buffer
        self.max_bytes = max_bytes
        # Bytes owed to the client: the backlog's, and the live events
        # waiting behind a replay (the PLASMA_SUBSCRIBER_BUFFER_BYTES bound).
        self.queued_bytes = 0
        self.topics = topics
        self.remote_addr = remote_addr
        self.user_agent = user_agent
        self.backlog: deque[bytes | memoryview] = deque()
        # Per backlog frame, what it carries (counted as delivered when the
        # frame is fully written): an event (timed if sampled), a count of
        # events (a replay batch), or 0 (a heartbeat, a notice, the head).
        self.marks: deque[StampedEvent | int] = deque()
        self.deliveries = Deliveries()  # the hub's, from run()
        # While a replay is being written, live events wait here (bounded
        # like the backlog) and join the backlog when the replay is done.
        self.replaying = False
        self.live: list[tuple[bytes, StampedEvent | int]] = []
        self.stalled_since: float | None = None
        self.closed = False
        self.cut_off = False
        self.broken = False
        self.events = 0
        self.wrote = False
        self.idle_since = time.monotonic()
        self._wait_scope: trio.CancelScope | None = None
        self._resume: Resume | None = None
        self._subscription: Subscription | None = None
        self.write_timeout = math.inf  # PLASMA_SUBSCRIBER_WRITE_TIMEOUT, set by run

    # -- the hub's side (synchronous, never blocks) ---------------------------

    def offer(self, event: StampedEvent) -> bool:
        # The hot path: one non-blocking write of the shared, pre-encoded chunk.
        if not (self.backlog or self.closed or self.broken or self.replaying):
            data = event.wire.get(CHUNK) or sse_chunk(event)
            try:
                sent = os.write(self.fd, data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._lost()
                return True
            self.events += 1
            self.wrote = True
            if sent < len(data):
                self._append(memoryview(data)[sent:], event)
                self.stalled_since = time.monotonic()
                self._wake()
            else:
                self.deliveries.wrote("sse", event)
            return True
        if self.closed or self.broken:
            return True  # ending: nothing more to deliver, nothing to cut off
        data = sse_chunk(event)
        if self.queued_bytes + len(data) > self.max_bytes:
            return False
        if self.replaying:
            if len(self.live) >= self.buffer:
                return False
            self.events += 1
            self.live.append((data, event))
            self.queued_bytes += len(data)
            return True
        if len(self.backlog) >= self.buffer:
            return False
        self.events += 1
        self._append(data, event)
        return True

    def _append(self, data: bytes | memoryview, mark: StampedEvent | int = 0) -> None:
        self.backlog.append(data)
        self.marks.append(mark)
        self.queued_bytes += len(data)

    def _written(self, mark: StampedEvent | int) -> None:
        """A frame is fully written: count what it carried."""
        if isinstance(mark, int):
            if mark:
                self.deliveries.written["sse"] += mark
        else:
            self.deliveries.wrote("sse", mark)

    @property
    def queue_depth(self) -> int:
        """Frames owed to the client (events, mostly), live ones behind a replay included."""
        return len(self.backlog) + len(self.live)

    def close(self, *, cut_off: bool) -> None:
        if not self.closed:
            self.closed = True
            self.cut_off = cut_off
            self._wake()

    # -- writing -------------------------------------------------------------

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
                self.stalled_since = time.monotonic()
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
        self.wrote = True
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
        self.wrote = True
        if sent:
            # Progress: the write deadline counts from the last byte taken.
            self.stalled_since = time.monotonic()
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
            self.stalled_since = None

    def _wake(self) -> None:
        if self._wait_scope is not None:
            self._wait_scope.cancel()

    heartbeats = True

    def send_heartbeat(self) -> None:
        self.write(HEARTBEAT_CHUNK)

    def loss(self, requested: str | None, oldest: str | None) -> None:
        if self.closed or self.broken:
            return
        data = chunk(gap_frame(requested, oldest))
        if self.replaying:
            # After the replay, before the live events that wait behind it.
            self.live.append((data, 0))
            self.queued_bytes += len(data)
        else:
            self.write(data)

    # -- the connection's task -----------------------------------------------

    async def run(
        self, hub: Hub, config: Config, last_id: str | None, grant: Grant | None = None
    ) -> None:
        """Serve the stream until the client goes, the hub closes it, or it is cut off."""
        started = time.monotonic()
        ending = "shutdown deadline"
        self.write_timeout = config.subscriber_write_timeout
        self.deliveries = hub.deliveries
        try:
            # redis-streams: wait for a position this instance has not read
            # yet, and ask Redis whether the client's entries still exist.
            missing = await locate(hub, last_id) if last_id else False
            subscribed = ExitStack()
            try:
                subscription = subscribed.enter_context(hub.subscribe("sse", self, self.topics))
            except ServiceUnavailable as exc:
                # Shutdown began or the limit was reached while locate waited.
                ending = f"refused: {exc}"
                self.write(unavailable(str(exc)))
                return
            with subscribed:
                self._subscription = subscription
                expire_at(subscription, grant)
                first = [response_head(config.origin), chunk(encode_retry(config.sse_retry))]
                if last_id:
                    # Nothing awaits between subscribing and starting the
                    # replay, so it ends exactly where live events begin. It
                    # is written as the client drains it (_serve).
                    self._resume = Resume(hub)
                    gap = self._resume.start(last_id, self.topics, missing=missing)
                    if gap is not None:
                        first.append(chunk(gap_frame(gap.requested, gap.oldest)))
                    self.replaying = self._resume.replaying
                self.write(b"".join(first))
                await self._serve()
            if self.closed and not self.broken:
                ending = "cut off (slow consumer)" if self.cut_off else "server shutdown"
                if subscription.expired:
                    ending = "token expired"
            else:
                ending = "client closed"
            await self._finish()
        finally:
            self.sock.close()
            log_sse_stream(
                remote_addr=self.remote_addr,
                user_agent=self.user_agent,
                topics=self.topics,
                started=started,
                events=self.events,
                ending=ending,
                subject=grant.subject if grant is not None else None,
            )

    def _replay_step(self) -> None:
        """Write the next batch of the replay (the backlog is empty)."""
        assert self._resume is not None
        batch = self._resume.take()
        if batch is None:
            # Replaying slower than the history turns over: a slow consumer.
            if self._subscription is not None:
                self._subscription.cut_off()
            return
        if batch:
            self.events += len(batch)
            self.write(b"".join([sse_chunk(event) for event in batch]), len(batch))
            return
        # Done: the live events that arrived meanwhile follow, in order.
        self.replaying = False
        live, self.live = self.live, []
        if live:
            self.queued_bytes -= sum(len(data) for data, _ in live)
            events = sum(1 for _, mark in live if not isinstance(mark, int))
            self.write(b"".join([data for data, _ in live]), events)

    async def _serve(self) -> None:
        sock = self.sock
        while not self.closed and not self.broken:
            if self.replaying and not self.backlog:
                if self._resume is not None and self._resume.needs_refill:
                    # redis-streams, a replay older than the window: read on.
                    await self._resume.refill()
                    continue
                self._replay_step()
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

    async def _finish(self) -> None:
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
            # Bounded like any write: a client that stops reading now (its
            # subscription is gone, no watcher sees it) is not waited for.
            with trio.move_on_after(self.write_timeout):
                while self.backlog and not self.broken:
                    await trio.lowlevel.wait_writable(self.sock)
                    self._flush()
        elif self.backlog:
            self._flush()
