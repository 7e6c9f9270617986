"""Sinks: the subscriber-side queues the hub fills (see :class:`plasma_trio.hub.Sink`).

:class:`TrioSink` is a bounded trio memory channel. The hub calls
:meth:`TrioSink.offer` (``send_nowait``) and, when the subscriber is a full
buffer behind, :meth:`TrioSink.close`; the transport's task drains the
receive side and sees ``EndOfChannel`` after the last queued event, which is
its cue to end the stream.
"""

from __future__ import annotations

import trio

from plasma_trio.hub import StampedEvent

__all__ = ["TrioSink"]


class TrioSink:
    """A bounded queue of events for one trio-side subscriber."""

    def __init__(self, buffer: int) -> None:
        # The bound is the slow-consumer policy: the hub never awaits a send,
        # it cuts the subscriber off when send_nowait would block.
        self._send, self.receive = trio.open_memory_channel[StampedEvent](buffer)
        self.cut_off = False
        self.closed = False

    def offer(self, event: StampedEvent) -> bool:
        try:
            self._send.send_nowait(event)
        except trio.WouldBlock:
            return False
        except trio.ClosedResourceError:
            return True  # already ending; nothing more to deliver
        return True

    def close(self, *, cut_off: bool) -> None:
        if self.closed:
            return
        self.closed = True
        self.cut_off = cut_off
        self._send.close()

    def __repr__(self) -> str:
        stats = self._send.statistics()
        return f"<TrioSink queued={stats.current_buffer_used}/{stats.max_buffer_size}>"
