"""Replays: what a resuming subscriber missed, read as it drains it.

Owns the rules of ``Last-Event-ID`` (SSE) and ``Request.lastEventId`` (gRPC)
resumes, for every transport alike (the :class:`~plasma_trio.session.Session`
drives them; no writer touches this module):

* :func:`locate` (``redis-streams`` only) asks Redis whether the client's
  entries still exist and waits, briefly, for a position this instance has
  not read yet, *before* the session subscribes;
* :class:`Resume` is started in the same step as the subscription (nothing
  awaited between), so the replay ends exactly where live events begin; it
  is read from the hub's history in batches (:data:`REPLAY_BATCH`,
  :data:`REPLAY_BATCH_BYTES`) as the client drains it, never copied into a
  buffer per client (SPEC 8), and remembers what was sent so that nothing
  goes out twice;
* :class:`DeepReplay` reads the part of a ``redis-streams`` replay older than
  the window from Redis, a page at a time, through :class:`ReplayStore`,
  which shares the parsed events of one entry between every client
  replaying it (their wire encodings are then built once).

Invariant: a replay yields events in stream order, each at most once per
stream, and ``None`` from :meth:`Resume.take` means the history dropped the
next event owed (a client replaying slower than the history turns over),
which the session treats as a slow consumer.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Final

import trio

from plasma_trio.core.stream_ids import ZERO, format_entry, format_position
from plasma_trio.core.topics import prefixes
from plasma_trio.hub import StampedEvent
from plasma_trio.replay_store import ReplayStore

if TYPE_CHECKING:
    from plasma_trio.core.stream_ids import Position
    from plasma_trio.hub import Hub


__all__ = [
    "DEEP_PAGE",
    "REPLAY_BATCH",
    "REPLAY_BATCH_BYTES",
    "DeepReplay",
    "Gap",
    "ReplayStore",
    "Resume",
    "event_size",
    "locate",
]


# Replayed events read from the history per batch (one write's worth): at
# most this many events, and no more than about REPLAY_BATCH_BYTES of data,
# so that what a stalled resuming client holds in the server stays small.
REPLAY_BATCH: Final = 64
REPLAY_BATCH_BYTES: Final = 64 * 1024


def event_size(event: StampedEvent) -> int:
    """What an event counts against ``PLASMA_SUBSCRIBER_BUFFER_BYTES`` in a
    subscriber's queue: its data and type, plus a frame's overhead."""
    return len(event.event.data or b"") + len(event.event.type) + 64


# How long a client resuming from a stream position this instance has not
# read yet (another instance is a little ahead) waits for it, in seconds.
RESUME_CATCH_UP: Final = 2.0


async def locate(hub: Hub, last_id: str) -> bool | None:
    """Prepare a resume from ``last_id``; returns ``missing`` for
    :meth:`Resume.start`. Call it *before* subscribing (it waits).

    Only in ``redis-streams`` mode does it do anything. Redis is asked
    whether the client's entries are still in the streams (SPEC 4: a trimmed
    or deleted entry, or one beyond the end after Redis lost its data, is a
    gap: ``True``; all there: ``False``, and a replay older than the window
    is read from Redis; when Redis cannot answer, ``None``: the replay window
    decides alone). If they are, a position this instance has not read yet
    (the client came from an instance that is a little ahead) is waited for,
    up to :data:`RESUME_CATCH_UP`, so that nothing is sent twice.
    """
    position = hub.parse_position(last_id)
    store = hub.replay_store
    if position is None or store is None:
        return None
    exists = await store.entries_exist(position)
    if exists is False:
        return True
    with trio.move_on_after(RESUME_CATCH_UP):
        await hub.wait_position(position)
    return None if exists is None else False


class Gap:
    """The ``plasma-gap`` notice: the history does not reach back to ``requested``."""

    __slots__ = ("oldest", "requested")

    def __init__(self, requested: str | None, oldest: str | None) -> None:
        self.requested = requested
        self.oldest = oldest


# Sent-tracking keeps at least this many seqs' bits between two trims.
REBASE_MIN: Final = 4096


class Resume:
    """What one stream has been sent, and the replay it still owes.

    Create it *in the same step* as the hub subscription (nothing awaited
    between them), so that the replay's end is exactly where live events
    begin. Then, whenever the transport can write, :meth:`take` the next
    batch of replayed events; live events come after the replay is done.

    ``track_sent`` (gRPC) records which held events were sent, so that a later
    replay request on the same stream skips them; SSE streams replay once
    and only need the seq of the last event sent.
    """

    # Slots: one per stream (idle memory per connection is a benchmark figure).
    __slots__ = (
        "_deep",
        "_deep_sent",
        "_end",
        "_floors",
        "_hub",
        "_losses",
        "_next",
        "_rebase_at",
        "_sent_base",
        "_sent_bits",
        "_topics",
        "_track",
        "last_sent",
    )

    def __init__(self, hub: Hub, *, track_sent: bool = False) -> None:
        self._hub = hub
        self._next = 1
        self._end = 0  # nothing to replay
        self._topics: frozenset[str] = frozenset()
        self._floors: tuple[tuple[int, int], ...] | None = None
        self._losses = 0
        self.last_sent = 0  # seq of the newest event sent on this stream
        self._track = track_sent
        self._sent_base = 0  # bit i of _sent_bits: seq _sent_base + i was sent
        self._sent_bits = 0
        self._rebase_at = REBASE_MIN  # offset at which old bits are dropped
        self._deep: DeepReplay | None = None
        self._deep_sent: Position | None = None  # gRPC: entries read from Redis, sent

    def start(
        self, last_id: str, topics: frozenset[str], *, missing: bool | None = None
    ) -> Gap | None:
        """Begin a replay of what followed ``last_id`` among ``topics``.

        Returns the gap notice to send first, if the history does not reach
        back to ``last_id`` (or the id is from another instance or run).
        ``missing``: what :func:`locate` found (redis-streams).

        In ``redis-streams`` mode a client older than the window whose entries
        Redis still holds is replayed from Redis (:class:`DeepReplay`): the
        transport calls :meth:`refill` whenever :attr:`needs_refill` before
        :meth:`take`.
        """
        replay = self._hub.replay(last_id, missing=missing)
        self._next, self._end, self._topics = replay.start, replay.end, topics
        self._losses = self._hub.losses
        self._floors = replay.floors
        self._deep = None
        store = self._hub.replay_store
        if replay.deep_until is not None and replay.floors is not None and store is not None:
            start = replay.floors
            if self._deep_sent is not None:
                # (gRPC: a later Request with the same id: what was sent stays sent.)
                start = tuple(max(a, b) for a, b in zip(start, self._deep_sent, strict=True))
            self._deep = DeepReplay(store, start, replay.deep_until)
        return Gap(last_id, replay.oldest) if replay.gap else None

    @property
    def replaying(self) -> bool:
        return self._deep is not None or self._next <= self._end

    @property
    def needs_refill(self) -> bool:
        """Whether :meth:`refill` must run (read Redis) before :meth:`take`."""
        deep = self._deep
        return deep is not None and not deep.ready and not deep.failed

    async def refill(self) -> None:
        """Read the next entries of a replay older than the window from Redis
        (a page, until one matches the stream's topics or none is left)."""
        deep = self._deep
        while deep is not None and not deep.ready and not deep.failed:
            await deep.read_page(self._topics)

    @property
    def end(self) -> int:
        """The seq the replay ends with; live events come after it."""
        return self._end

    def take(self, limit: int = REPLAY_BATCH) -> list[StampedEvent] | None:
        """The next replayed events that match (at most ``limit``; empty when
        the replay is done), read from the history now.

        Returns ``None`` when the history has already dropped the next event
        to replay: the client replays slower than events arrive, and is cut
        off like any slow consumer.
        """
        deep = self._deep
        if deep is not None:
            if deep.failed:
                return None  # Redis could not go on: cut off, the reconnect decides
            if deep.buffer:
                return deep.take(limit)
            if not deep.done:
                raise RuntimeError("Resume.take before refill")
            self._deep = None  # done: the window holds nothing older than live
        out: list[StampedEvent] = []
        size = 0
        history_get = self._hub.history_get
        topics = self._topics
        floors = self._floors
        while self._next <= self._end and len(out) < limit and size < REPLAY_BATCH_BYTES:
            event = history_get(self._next)
            if event is None:
                if self._hub.losses != self._losses:
                    # The source lost events meanwhile and the window was
                    # cleared: the live gap notice (queued after the replay)
                    # tells the client; what is left of the replay is gone.
                    self._next = self._end + 1
                    break
                return None
            self._next += 1
            if not any(p in topics for p in prefixes(event.event.type)):
                continue
            if (
                floors is not None
                and event.pos is not None
                and event.pos[1] <= floors[event.pos[0]]
            ):
                continue  # the client has it (redis-streams: compared per key)
            if self._track and self.was_sent(event.seq):
                continue
            out.append(event)
            size += event_size(event)
        return out

    def is_new(self, event: StampedEvent) -> bool:
        """Whether a live event should go out: not sent yet, not owed by the replay."""
        return event.seq > self._end and not (self._track and self.was_sent(event.seq))

    def sent(self, event: StampedEvent) -> None:
        """Record that ``event`` was written to the stream."""
        seq = event.seq
        if seq == 0 and self._track and event.pos is not None:
            # A replayed entry read from Redis (no seq): remember how far.
            key, entry = event.pos
            sent = list(self._deep_sent or [ZERO] * len(self._floors or ((0, 0),)))
            sent[key] = max(sent[key], entry)
            self._deep_sent = tuple(sent)
            return
        if seq > self.last_sent:
            self.last_sent = seq
        if self._track:
            offset = seq - self._sent_base
            if offset >= self._rebase_at:
                # What the history no longer holds cannot be replayed again:
                # forget it, now and then (this is on every delivery's path).
                oldest = self._hub.history_first_seq
                if oldest > self._sent_base:
                    self._sent_bits >>= oldest - self._sent_base
                    self._sent_base = oldest
                offset = seq - self._sent_base
                self._rebase_at = max(REBASE_MIN, 2 * offset)
            if offset >= 0:
                self._sent_bits |= 1 << offset

    def was_sent(self, seq: int) -> bool:
        offset = seq - self._sent_base
        return offset >= 0 and bool(self._sent_bits >> offset & 1)


# Entries per key per Redis read of a replay older than the window.
DEEP_PAGE: Final = 256


class DeepReplay:
    """The part of a ``redis-streams`` replay older than the replay window:
    the entries after the client's position up to the window's newest at the
    time it subscribed, read from Redis a page at a time as the client drains
    them (nothing is held for it in between). Events read this way have no
    seq (0): they come before every held and live one."""

    __slots__ = ("buffer", "done", "failed", "position", "store", "until")

    def __init__(self, store: ReplayStore, start: Position, until: Position) -> None:
        self.store = store
        self.position = list(start)
        self.until = until
        self.buffer: deque[StampedEvent] = deque()
        self.done = all(a >= b for a, b in zip(start, until, strict=True))
        self.failed = False

    @property
    def ready(self) -> bool:
        """Something to take, or nothing left to read."""
        return bool(self.buffer) or self.done

    async def read_page(self, topics: frozenset[str]) -> None:
        entries = await self.store.entries_after(tuple(self.position), self.until, DEEP_PAGE)
        if entries is None:
            self.failed = True
            return
        if not entries:
            self.done = True
            return
        one_key = len(self.position) == 1
        for index, entry_id, event in entries:
            self.position[index] = entry_id
            if event is None or not any(p in topics for p in prefixes(event.type)):
                continue
            if one_key:
                # The same entry is the same event for every client (its id
                # too): one object, so its wire encodings are built once.
                shared = self.store.replayed.get(entry_id)
                if shared is None or shared.event is not event:
                    shared = StampedEvent(format_entry(entry_id), 0, event, (index, entry_id))
                    self.store.keep(entry_id, shared)
                self.buffer.append(shared)
            else:
                event_id = format_position(tuple(self.position))
                self.buffer.append(StampedEvent(event_id, 0, event, (index, entry_id)))
        if all(a >= b for a, b in zip(self.position, self.until, strict=True)):
            self.done = True

    def take(self, limit: int) -> list[StampedEvent]:
        out: list[StampedEvent] = []
        size = 0
        buffer = self.buffer
        while buffer and len(out) < limit and size < REPLAY_BATCH_BYTES:
            event = buffer.popleft()
            out.append(event)
            size += event_size(event)
        return out
