"""Sinks: the subscriber-side queues the hub fills (see :class:`plasma_trio.hub.Sink`).

:class:`TrioSink` is a bounded trio memory channel. The hub calls
:meth:`TrioSink.offer` (``send_nowait``) and, when the subscriber is a full
buffer behind, :meth:`TrioSink.close`; the transport's task drains the
receive side and sees ``EndOfChannel`` after the last queued event, which is
its cue to end the stream. A ``None`` in the queue asks for a heartbeat.

While the transport's write waits for the client, ``stalled_since`` says
since when; a cut-off then (a full queue, or the write deadline) calls
``release``, which ends the connection or stream at once: the waiting write
would otherwise hold the subscriber's slot until the client reads again.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING

import trio

from plasma_trio.core.sse import gap_frame
from plasma_trio.hub import StampedEvent
from plasma_trio.session import event_size

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["TrioSink"]


class TrioSink:
    """A bounded queue of events for one trio-side subscriber."""

    def __init__(
        self,
        buffer: int,
        release: Callable[[], None] | None = None,
        *,
        max_bytes: int = 1 << 62,
    ) -> None:
        # The bound is the slow-consumer policy: the hub never awaits a send,
        # it cuts the subscriber off when send_nowait would block.
        # ``None`` in the channel is a heartbeat (see send_heartbeat).
        # A ``bytes`` item is a frame to send as it is (the live gap notice).
        self._send, self.receive = trio.open_memory_channel[StampedEvent | bytes | None](buffer)
        self.cut_off = False
        self.closed = False
        self.stalled_since: float | None = None
        self.release = release
        self.max_bytes = max_bytes
        self.queued_bytes = 0
        # The heartbeat clock (session.heartbeat_due): the transport sets
        # ``wrote`` after each write.
        self.wrote = False
        self.idle_since = time.monotonic()

    heartbeats = True

    @property
    def queue_depth(self) -> int:
        """Events (and notices) waiting for the stream's writer."""
        return self.receive.statistics().current_buffer_used

    def send_heartbeat(self) -> None:
        """Ask the stream's writer for a heartbeat (it is idle: the queue is empty)."""
        with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError):
            self._send.send_nowait(None)

    def loss(self, requested: str | None, oldest: str | None) -> None:
        """Queue the live gap notice's SSE frame (skipped when the queue is
        full: that subscriber is cut off at its next event anyway)."""
        with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError):
            self._send.send_nowait(gap_frame(requested, oldest))

    def offer(self, event: StampedEvent) -> bool:
        size = event_size(event)
        if self.queued_bytes + size > self.max_bytes and not self.closed:
            return False
        try:
            self._send.send_nowait(event)
        except trio.WouldBlock:
            return False
        except trio.ClosedResourceError:
            return True  # already ending; nothing more to deliver
        self.queued_bytes += size
        return True

    async def next(self) -> StampedEvent | bytes | None:
        """The next queued item (``None``: a heartbeat; ``bytes``: a frame);
        ``EndOfChannel`` at the end."""
        return self._taken(await self.receive.receive())

    def next_nowait(self) -> StampedEvent | bytes | None:
        """:meth:`next` without waiting (``trio.WouldBlock`` when empty)."""
        return self._taken(self.receive.receive_nowait())

    def _taken(self, item: StampedEvent | bytes | None) -> StampedEvent | bytes | None:
        if isinstance(item, StampedEvent):
            self.queued_bytes -= event_size(item)
        return item

    def close(self, *, cut_off: bool) -> None:
        if self.closed:
            return
        self.closed = True
        self.cut_off = cut_off
        self._send.close()
        if cut_off and self.stalled_since is not None and self.release is not None:
            self.release()

    def __repr__(self) -> str:
        stats = self._send.statistics()
        return f"<TrioSink queued={stats.current_buffer_used}/{stats.max_buffer_size}>"
