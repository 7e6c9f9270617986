"""What the hub hands out, to whom, and what became of it.

A :class:`StampedEvent` is one published event with its id and seq, one
object shared by every subscriber it reaches (the writers keep their wire
encodings of it in ``wire``, built once). A :class:`Sink` is what the hub
offers it to (a subscriber's session). :class:`Deliveries` counts what the
writers wrote to sockets, per transport, and samples the delivery lag.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Protocol

from plasma_trio.core.lag import LagHistogram

if TYPE_CHECKING:
    from collections.abc import Iterable

    from plasma_trio.batches import Batch
    from plasma_trio.core.events import Event
    from plasma_trio.core.stream_ids import EntryId

__all__ = ["Deliveries", "Sink", "StampedEvent"]


class StampedEvent:
    """A published event with its id and seq; one object shared by every
    subscriber it reaches.

    ``wire`` is where the transports keep their encodings of it (the SSE
    frame, the HTTP/1.1 chunk, the gRPC message), each built once, on first
    use, and shared; the hub itself knows no wire format
    (:mod:`plasma_trio.transports.wire`).
    """

    __slots__ = ("event", "id", "pos", "seq", "t0", "wire")

    def __init__(
        self, id: str, seq: int, event: Event, pos: tuple[int, EntryId] | None = None
    ) -> None:
        self.id = id
        self.seq = seq
        self.event = event
        # redis-streams: (key index, entry id); see core.stream_window.
        self.pos = pos
        self.wire: dict[str, bytes] = {}
        # Monotonic time the hub received it, for one event in lag.SAMPLE
        # (0.0 for the others): the transports time its socket writes.
        self.t0 = 0.0

    def __repr__(self) -> str:
        return f"<StampedEvent {self.id} {self.event.type!r}>"


class Deliveries:
    """What the transports wrote to sockets: events per transport, and the
    sampled delivery lag. Shared, updated on the write paths (no locks: one
    trio thread; the gRPC side runs in the same thread through trio-asyncio)."""

    __slots__ = ("lag", "written")

    def __init__(self, transports: Iterable[str] = ()) -> None:
        # Per transport name (the hub enters a new name at its first subscriber).
        self.written: dict[str, int] = dict.fromkeys(transports, 0)
        self.lag = LagHistogram()

    def wrote(self, transport: str, event: StampedEvent) -> None:
        """One event written to one subscriber's socket."""
        self.written[transport] += 1
        t0 = event.t0
        if t0:
            self.lag.observe(time.monotonic() - t0)


class Sink(Protocol):
    """The subscriber side of the hub, implemented by each transport."""

    def offer(self, event: StampedEvent) -> bool:
        """Queue ``event`` without blocking; ``False`` when the queue is full."""
        ...

    def offer_batch(self, batch: Batch) -> int:
        """Queue the batch's events, in order, without blocking; how many were
        taken (fewer than all: the queue is full, the hub cuts it off)."""
        ...

    def close(self, *, cut_off: bool) -> None:
        """End the stream: ``cut_off`` for a slow subscriber (its connection is
        released at once, even while a write waits for the client), otherwise
        the server is shutting down (what is queued is still sent).
        Idempotent."""
        ...

    @property
    def stalled_since(self) -> float | None:
        """Monotonic time since which queued bytes wait for a client that
        accepts none, or ``None`` (see ``session.watch_subscribers``)."""
        ...

    @property
    def heartbeats(self) -> bool:
        """Whether the stream gets SSE heartbeats (``session.heartbeat_due``)."""
        ...

    def heartbeat(self) -> None:
        """Send a heartbeat: the stream has been idle (SSE)."""
        ...

    @property
    def queue_depth(self) -> int:
        """Events waiting to be written to this subscriber, now."""
        ...

    def loss(self, requested: str | None, oldest: str | None) -> None:
        """Tell the subscriber that events may have been lost (SPEC 4, live gap
        notice): ``requested`` is the id of the last event it was given (or
        ``None``), ``oldest`` the first id after the loss. Goes out after what
        is queued and before the next event; never blocks."""
        ...
