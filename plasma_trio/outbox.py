"""A session's outgoing queue: rendered frames, bounded, written through its writer.

The :class:`Outbox` is the one queue of every stream, whatever the transport,
and the :class:`~plasma_trio.writer.Writer` is all a transport implements
(render an item to bytes, write without blocking, wait until writable, close
with a reason). The outbox holds the rules of the queue:

* **Write now, queue the rest.** A live event goes straight to the writer
  (``write_nowait``) when nothing is queued: on the SSE fast path that is one
  non-blocking ``write`` of the event's shared, pre-encoded frame. Only what
  the writer does not take is queued (the rest of a frame, then whole
  frames, in order), and written by :meth:`flush` when the writer is
  writable again, as many frames per write as it takes.
* **The bound** (:meth:`~plasma_trio.session.Session.fits`): a live event
  that would take the queue over ``PLASMA_SUBSCRIBER_BUFFER`` frames or
  ``..._BUFFER_BYTES`` bytes is refused, and the hub cuts the session off.
* **The write deadline**: while bytes wait for the client the session is
  stalled (:meth:`~plasma_trio.session.Session.stall`), counted from the last
  byte the writer took.
* **Counting**: a frame is counted (an event delivered, its lag sampled, or
  a batch of replayed events) once the writer took all of it.

A writer with its own task runs :meth:`pump` (the replay as the client drains
it, then writes and waits); a writer that takes bytes only from its own loop
(Hypercorn's response body) takes frames with :meth:`take` instead.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from typing import TYPE_CHECKING, Final, Protocol

import trio

from plasma_trio.replay import Gap
from plasma_trio.writer import HEARTBEAT, End, Item, Phase, WriterGone

if TYPE_CHECKING:
    from plasma_trio.admission import Ending
    from plasma_trio.batches import Batch
    from plasma_trio.replay import Resume
    from plasma_trio.stamped import Deliveries, StampedEvent
    from plasma_trio.writer import Buffer, Writer

__all__ = ["Outbox", "Owner"]


class Owner(Protocol):
    """What an outbox reads and calls of its session
    (:class:`~plasma_trio.session.Session`): its rules and its counts."""

    ending: Ending | None
    events: int
    wrote: bool
    stalled_since: float | None
    tracks_sent: bool
    transport: str
    deliveries: Deliveries
    resume: Resume

    @property
    def replaying(self) -> bool: ...

    def fits(self, queued: int, queued_bytes: int, size: int) -> bool: ...

    def stall(self, now: float | None = None) -> None: ...

    def unstall(self) -> None: ...

    def delivered(
        self, events: list[StampedEvent], sampled: list[StampedEvent] | None = None
    ) -> None: ...

    def delivered_replay(self, count: int) -> None: ...

    def is_new(self, event: StampedEvent) -> bool: ...

    def sent(self, event: StampedEvent) -> None: ...

    async def replay_step(self) -> list[StampedEvent | Gap]: ...


# What one write of the queue joins, at most: frames, and bytes (past the
# frame that crosses it).
BATCH_FRAMES: Final = 1024
BATCH_BYTES: Final = 256 * 1024

_OPEN: Final = Phase.OPEN  # (a global: an Enum's member lookup costs ~90 ns)


class Outbox:
    """One stream's queue of rendered frames (see the module doc)."""

    # Slots: one per subscriber, thousands of them.
    __slots__ = (
        "_waiting",
        "frames",
        "key",
        "marks",
        "phase",
        "queued_bytes",
        "session",
        "tracks",
        "transport",
        "write",
        "writer",
        "writing",
        "writing_bytes",
        "written",
    )

    def __init__(self, session: Owner, writer: Writer) -> None:
        self.session = session
        self.writer = writer
        self.key = writer.wire_key
        self.write = writer.write_nowait
        self.tracks = session.tracks_sent
        self.transport = session.transport
        self.written = session.deliveries.written
        # (Made at the first frame that waits, dropped when all are written:
        # an empty deque costs ~600 bytes, and most streams never wait.)
        self.frames: deque[Buffer] | None = None
        # Per frame, what it carries, counted once all of it is written: a
        # live event (its lag sampled), a count of replayed events, or 0.
        self.marks: deque[StampedEvent | int] | None = None
        self.queued_bytes = 0
        # Frames (and bytes) a writer with its own loop took (take) and has
        # not written yet (taken): behind too, so the bound counts them.
        self.writing = 0
        self.writing_bytes = 0
        self.phase = Phase.OPEN
        self._waiting: trio.CancelScope | None = None

    # -- the hub's side (synchronous, never blocks) ---------------------------

    def offer(self, event: StampedEvent) -> bool:
        """A live event: written now if nothing waits, else queued under the
        bound; ``False`` over it (the hub then cuts the session off)."""
        if self.phase is _OPEN and not self.frames:
            # The hot path: one non-blocking write of the shared frame.
            data = event.wire.get(self.key) or self.writer.render(event)
            try:
                sent = self.write(data)
            except WriterGone:
                self.lost()
                return True
            if sent < len(data):
                self._append(memoryview(data)[sent:] if sent else data, event)
                self.session.stall()
                self.wake()
                return True
            # Counted: Session.delivered inlined, on every delivery's path.
            session = self.session
            if self.tracks:
                session.resume.sent(event)
            session.events += 1
            session.wrote = True
            self.written[self.transport] += 1
            if event.t0:
                session.deliveries.lag.observe(time.monotonic() - event.t0)
            return True
        if self.phase is not _OPEN:
            return True  # ending: nothing more to deliver, nothing to cut off
        data = self.writer.render(event)
        if not self._fits(len(data)):
            return False
        self._append(data, event)
        return True

    def offer_batch(self, batch: Batch) -> int:
        """Live events in order (:meth:`Hub.publish_many <plasma_trio.hub.Hub.publish_many>`):
        their frames joined in one write if nothing waits, the rest queued
        frame by frame under the bound, exactly as one :meth:`offer` each;
        how many were taken (fewer than all: over the bound)."""
        events = batch.events
        if self.phase is _OPEN and not self.frames:
            data = batch.wire.get(self.key) or batch.joined(self.key, self.writer.render)
            idle = self.session.stalled_since is None
            try:
                sent = self.write(data)
            except WriterGone:
                self.lost()
                return len(events)
            if sent < len(data):
                return self._queue_rest(events, sent, whole=idle)
            self.session.delivered(events, batch.sampled)
            return len(events)
        if self.phase is not _OPEN:
            return len(events)  # ending: nothing more to deliver, nothing to cut off
        for taken, event in enumerate(events):
            data = self.writer.render(event)
            if not self._fits(len(data)):
                return taken
            self._append(data, event)
        return len(events)

    def _queue_rest(self, events: list[StampedEvent], sent: int, *, whole: bool) -> int:
        """A batch's joined write took ``sent`` bytes: the events it took
        whole are delivered, the rest of the one it cut and the ones after
        it are queued. ``whole``: nothing waited for the client before this
        batch, so all of it is the write in progress and queued whole (as a
        lone event's rest is: the bound is on what waits behind a write);
        otherwise the bound applies from the second frame queued."""
        for taken, event in enumerate(events):
            data = event.wire.get(self.key) or self.writer.render(event)
            if sent >= len(data):
                sent -= len(data)
                self.session.delivered([event])
                continue
            if not whole and self.frames and not self._fits(len(data)):
                return taken
            self._append(memoryview(data)[sent:] if sent else data, event)
            sent = 0
        self.session.stall()
        self.wake()
        return len(events)

    def put(self, item: Item, mark: StampedEvent | int = 0) -> None:
        """A notice, a heartbeat or the end, after what is queued."""
        if data := self.writer.render(item):
            self.send(data, mark)

    def put_items(self, items: list[StampedEvent | Gap]) -> None:
        """A replay batch (or the live items held during it), in one frame."""
        frames = [self.writer.render(item) for item in items]
        if self.session.tracks_sent:
            for item in items:
                if not isinstance(item, Gap):
                    self.session.sent(item)
        self.send(b"".join(frames), sum(not isinstance(item, Gap) for item in items))

    def drop_owed(self) -> None:
        """Drop the queued live events a new replay owes (gRPC: a ``Request``
        with a ``lastEventId``): the replay sends them, in order. A frame
        partly written stays (and counts as sent)."""
        session = self.session
        frames, marks = self.frames, self.marks
        if frames is None or marks is None:
            return
        kept = [
            (frame, mark)
            for n, (frame, mark) in enumerate(zip(frames, marks, strict=True))
            if isinstance(mark, int)
            or (n == 0 and isinstance(frame, memoryview))
            or session.is_new(mark)
        ]
        if frames and isinstance(frames[0], memoryview) and not isinstance(marks[0], int):
            session.sent(marks[0])
        self.frames = self.marks = None
        self.queued_bytes = 0
        for frame, mark in kept:
            self._append(frame, mark)

    def heartbeat(self) -> None:
        """A heartbeat, when nothing else is queued (the stream is idle)."""
        if self.phase is _OPEN and not self.frames:
            self.put(HEARTBEAT)

    def send(self, data: Buffer, mark: StampedEvent | int = 0) -> None:
        """Write ``data`` now if nothing is queued; queue what is not taken."""
        if self.phase is Phase.BROKEN:
            return  # the client is gone: nothing more is written
        if self.frames:
            self._append(data, mark)
            self.wake()
            return
        try:
            sent = self.write(data)
        except WriterGone:
            self.lost()
            return
        self.session.wrote = True
        if sent < len(data):
            self._append(memoryview(data)[sent:] if sent else data, mark)
            self.session.stall()
            self.wake()
        elif mark:
            self._written(mark)

    def close(self, *, cut_off: bool) -> None:
        """End the stream: after what is queued, or now (``cut_off``: the
        writer releases its connection or stream at once if a write waits)."""
        if self.phase is _OPEN:
            self.phase = Phase.CUT_OFF if cut_off else Phase.ENDING
            self.wake()
        if cut_off:
            stalled = self.session.stalled_since is not None
            self.writer.close(End(self.session.ending), stalled=stalled)

    def lost(self) -> None:
        """The client went away (a write failed, or end of stream)."""
        self.phase = Phase.BROKEN
        self.wake()

    @property
    def broken(self) -> bool:
        """The client went away."""
        return self.phase is Phase.BROKEN

    @property
    def depth(self) -> int:
        """Frames queued for the client (events, mostly; see also ``writing``)."""
        frames = self.frames
        return len(frames) if frames is not None else 0

    # -- the writer's side ------------------------------------------------------

    def _fits(self, size: int) -> bool:
        """One more frame of ``size`` bytes is within the bound (with what
        waits in the writer's hands)."""
        return self.session.fits(
            self.depth + self.writing, self.queued_bytes + self.writing_bytes, size
        )

    def _append(self, data: Buffer, mark: StampedEvent | int) -> None:
        if self.frames is None or self.marks is None:
            self.frames = deque()
            self.marks = deque()
        self.frames.append(data)
        self.marks.append(mark)
        self.queued_bytes += len(data)

    def _written(self, mark: StampedEvent | int) -> None:
        if isinstance(mark, int):
            if mark:
                self.session.delivered_replay(mark)
        else:
            self.session.delivered([mark])

    def flush(self, limit: int = BATCH_FRAMES) -> int:
        """Write what the writer takes of the queue, up to ``limit`` frames
        (and :data:`BATCH_BYTES`) joined in one write; a frame partly taken
        stays as its rest (``depth`` is always the number of frames owed,
        which the bound counts). Returns how many bytes were taken."""
        frames, marks = self.frames, self.marks
        if not frames or marks is None:
            return 0
        data = frames[0]
        if len(frames) > 1 and limit > 1 and len(data) < BATCH_BYTES:
            batch = []
            size = 0
            for frame in itertools.islice(frames, limit):
                batch.append(frame)
                size += len(frame)
                if size >= BATCH_BYTES:
                    break
            data = b"".join(batch)
        try:
            taken = sent = self.write(data)
        except WriterGone:
            self.lost()
            return 0
        session = self.session
        if sent:
            session.stall()  # progress: the deadline counts from the last byte taken
            self.queued_bytes -= sent
            session.wrote = True
        events: list[StampedEvent] = []
        replayed = 0
        while sent:
            head = frames[0]
            if sent >= len(head):
                sent -= len(head)
                frames.popleft()
                mark = marks.popleft()
                if type(mark) is int:
                    replayed += mark
                else:
                    events.append(mark)  # type: ignore[arg-type]
            else:
                frames[0] = memoryview(head)[sent:]
                sent = 0
        if events:  # (counted together: on every queued delivery's path)
            session.delivered(events)
        if replayed:
            session.delivered_replay(replayed)
        if not frames:
            self.frames = self.marks = None
            session.unstall()
            self.wake()  # a task waiting for the writer (finish) looks again
        return taken

    def take(self, limit: int) -> tuple[bytes, list[StampedEvent | int]]:
        """For a writer that writes from its own loop: up to ``limit`` frames,
        joined, and what they carry (hand it to :meth:`taken` once written)."""
        queue, queued_marks = self.frames, self.marks
        if queue is None or queued_marks is None:
            return b"", []
        count = min(limit, len(queue))
        frames = [queue.popleft() for _ in range(count)]
        marks = [queued_marks.popleft() for _ in range(count)]
        if not queue:
            self.frames = self.marks = None
        data = b"".join(frames)
        self.queued_bytes -= len(data)
        self.writing, self.writing_bytes = count, len(data)
        return data, marks

    def taken(self, marks: list[StampedEvent | int]) -> None:
        """What :meth:`take` returned is written."""
        self.writing = self.writing_bytes = 0
        self.session.wrote = True
        for mark in marks:
            if mark:
                self._written(mark)

    def wake(self) -> None:
        """Something to do: the loop that waits (:meth:`wait`) looks again."""
        if self._waiting is not None:
            self._waiting.cancel()

    async def wait(self) -> None:
        """Until :meth:`wake` (returns at once if something is queued)."""
        if self.frames or self.phase is not _OPEN:
            return
        with trio.CancelScope() as scope:
            self._waiting = scope
            await trio.sleep_forever()
        self._waiting = None

    # -- a writer's task ---------------------------------------------------------

    async def pump(self) -> None:
        """Write the stream until it ends or the client goes: the replay as the
        client drains it, then what is queued whenever the writer is writable;
        meanwhile the writer handles what the client sends (``receive``)."""
        session = self.session
        writer = self.writer
        while self.phase is _OPEN:
            if session.replaying and not self.frames:
                if items := await session.replay_step():
                    self.put_items(items)
                # A client that reads as fast as it is written would otherwise
                # take its whole replay in one step of the event loop.
                await trio.lowlevel.checkpoint()
                continue
            with trio.CancelScope() as scope:
                self._waiting = scope  # wake: something queued, the end, lost
                try:
                    if self.frames:
                        await writer.wait_writable()
                    else:
                        await writer.receive()
                except WriterGone:
                    self.phase = Phase.BROKEN
            self._waiting = None
            if self.frames and not scope.cancelled_caught:
                self.flush()

    async def finish(self, write_timeout: float) -> None:
        """End the stream: what is queued, then the end (a cut-off client,
        behind by definition, gets one non-blocking try; its reconnect with
        its last id replays what it missed)."""
        if self.phase is Phase.BROKEN:
            return
        self.put(End(self.session.ending))
        if self.phase is Phase.ENDING:
            # Bounded like any write (the watcher may not see this session:
            # at shutdown the hub has forgotten it).
            with trio.move_on_after(write_timeout):
                while self.frames and not self.broken:
                    with trio.CancelScope() as scope:
                        self._waiting = scope  # wake: all of it written
                        try:
                            await self.writer.wait_writable()
                        except WriterGone:
                            self.phase = Phase.BROKEN
                    self._waiting = None
                    self.flush()
        else:
            self.flush()
