"""The replay window in ``redis-streams`` mode: held events placed by stream position (pure).

The hub keeps the last ``PLASMA_HISTORY_SIZE`` events in a :class:`History`
(by seq, its own publish order), whatever the source. With the streams
source each held event also knows its place in the streams, ``pos`` =
``(key index, entry id)``, and its id is a stream position (see
:mod:`plasma_trio.core.stream_ids`), the same on every instance. This module
answers what a client whose last id is a position missed.

Theory of operation
-------------------
The source fills the window when it starts (the newest entries of each key,
read with ``XREVRANGE``) and then appends every entry it reads, in stream
order per key. ``start[j]`` is the last entry of key ``j`` *before* the held
ones that is known to be followed by no unread entry: ``0-0`` while every
entry of the key ever read is held, the entry of the newest dropped event
once the window turned over. A client whose last entry on key ``j`` is at or
after ``start[j]`` can be brought up to date from memory on that key: the
held events of ``j`` after its entry are exactly what it missed (each key is
read in order; several keys interleave in this instance's order, which is
why the comparison is per key, never by seq).

When the source may have lost entries of key ``j`` (its cursor was trimmed
away, or Redis came back without its data), the window is cleared and
``start[j]`` is unknown until the next entry of ``j`` arrives: every client
from before the loss gets the gap notice. Whether a client's entries still
exist in Redis (a trimmed or deleted entry, one beyond the stream's end) is
asked of Redis by the session before the replay starts, and passed in here as
``missing``. A client the window does not cover whose entries Redis holds
(``missing`` false) is no gap: its replay is read from Redis up to the
window's newest entry (``Replay.deep_until``), then live events follow.
"""

from __future__ import annotations

from typing import Generic, Protocol, TypeVar

from plasma_trio.core.history import History, Replay
from plasma_trio.core.stream_ids import (
    ZERO,
    EntryId,
    Position,
    format_entry,
    format_position,
    parse_position,
)

__all__ = ["StreamWindow"]


class _HasPos(Protocol):
    @property
    def seq(self) -> int: ...

    @property
    def id(self) -> str: ...

    @property
    def pos(self) -> tuple[int, EntryId] | None: ...


E = TypeVar("E", bound=_HasPos)


class StreamWindow(Generic[E]):
    """Stream positions of the events a :class:`History` holds; ``keys`` >= 1."""

    def __init__(self, keys: int, history: History[E]) -> None:
        self.keys = keys
        self.history = history
        # Coverage per key (see the module doc); None: unknown since a loss.
        self.start: list[EntryId | None] = [ZERO] * keys
        # The last entry appended per key: the position of the newest event.
        self.cursor: list[EntryId] = [ZERO] * keys

    def stamp(self, key: int, entry: EntryId) -> str:
        """Account for the next event (entry ``entry`` of key ``key``), which is
        about to be appended to the history; returns its id."""
        history = self.history
        if history.size and history.full:
            dropped = history.get(history.first_seq)
            if dropped is not None and dropped.pos is not None:
                self.start[dropped.pos[0]] = dropped.pos[1]
        if self.start[key] is None or not history.size:
            # The first entry after a loss: a client that has it missed nothing
            # before it. (Nothing held: only the newest entry is covered.)
            self.start[key] = entry
        cursor = self.cursor
        cursor[key] = entry
        if self.keys == 1:
            return format_entry(entry)
        return format_position(tuple(cursor))

    def cover_from(self, oldest: list[EntryId]) -> None:
        """Per key, the oldest entry the source read when it could not read
        back to the start: positions before it are not covered."""
        for key, entry in enumerate(oldest):
            start = self.start[key]
            if start is not None and entry > start:
                self.start[key] = entry

    @property
    def position(self) -> Position:
        return tuple(self.cursor)

    def loss(self, key: int, cursor: EntryId | None = None) -> None:
        """Entries of ``key`` may have been lost: forget what is held (a client
        from before gets the gap notice). ``cursor``: where the source now
        reads that key from (``0-0`` after Redis came back empty)."""
        self.history.clear()
        self.start = list(self.cursor)
        self.start[key] = None
        if cursor is not None:
            self.cursor[key] = cursor

    def parse(self, last_id: str) -> Position | None:
        return parse_position(last_id, self.keys)

    def ahead(self, position: Position) -> bool:
        """Whether ``position`` is past what this instance has read on some key
        (another instance read further: the client waits for this one)."""
        return any(entry > cursor for entry, cursor in zip(position, self.cursor, strict=True))

    def since(self, last_id: str, *, current_seq: int, missing: bool | None) -> Replay:
        """What a client whose last id is ``last_id`` missed. ``missing``: Redis
        no longer has one of its entries (trimmed, deleted, beyond the end);
        ``False``: Redis said it has them all; ``None``: not known.

        A client the window does not cover whose entries Redis has is not a
        gap: its replay is read from Redis up to the window's newest entry
        (``Replay.deep_until``), nothing from the window."""
        history = self.history
        position = self.parse(last_id)
        if position is None:
            oldest = history.oldest_id()
            return Replay(last_id, current_seq + 1, current_seq, gap=True, oldest=oldest)
        covered = all(
            start is not None and entry >= start
            for entry, start in zip(position, self.start, strict=True)
        )
        ahead = self.ahead(position)
        if not covered and missing is False and not ahead:
            return Replay(
                last_id,
                current_seq + 1,
                current_seq,
                gap=False,
                oldest=None,
                floors=position,
                deep_until=self.position,
            )
        gap = bool(missing) or not covered or ahead
        start = self._first_after(position, current_seq)
        first = history.get(start)
        # The notice's oldest: the first event the client gets from here.
        return Replay(
            last_id,
            start,
            current_seq,
            gap=gap,
            oldest=first.id if first is not None else None,
            floors=position,
        )

    def _first_after(self, position: Position, current_seq: int) -> int:
        """The seq of the first held event after ``position`` on its key
        (``current_seq + 1`` when none is)."""
        history = self.history
        get = history.get
        lo, hi = history.first_seq, current_seq + 1
        if self.keys == 1:
            # One key: held events are in entry order; bisect.
            floor = position[0]
            while lo < hi:
                mid = (lo + hi) // 2
                event = get(mid)
                if event is not None and event.pos is not None and event.pos[1] > floor:
                    hi = mid
                else:
                    lo = mid + 1
            return lo
        for seq in range(lo, hi):
            event = get(seq)
            if event is not None and event.pos is not None:
                key, entry = event.pos
                if entry > position[key]:
                    return seq
        return hi
