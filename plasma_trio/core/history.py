"""The replay window: the last N events, looked up by a client's Last-Event-ID.

Pure: the caller appends events in publish order and asks what a client with
a given last id missed. Ids are ``<epoch>-<seq>``: ``epoch`` identifies one
run of one instance (ms since 1970 at start), ``seq`` counts from 1. A
``Last-Event-ID`` from another epoch, from the future, or unparsable cannot be
placed in this window and is reported as a gap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

__all__ = ["History", "Replay", "format_id", "parse_id"]


class _HasSeq(Protocol):
    @property
    def seq(self) -> int: ...

    @property
    def id(self) -> str: ...


E = TypeVar("E", bound=_HasSeq)


def format_id(epoch: int, seq: int) -> str:
    return f"{epoch}-{seq}"


def parse_id(text: str) -> tuple[int, int] | None:
    """``"<epoch>-<seq>"`` -> ``(epoch, seq)``; ``None`` when malformed."""
    epoch, sep, seq = text.strip().partition("-")
    if (
        not sep
        or not epoch.isdigit()
        or not seq.isdigit()
        or not epoch.isascii()
        or not seq.isascii()
    ):
        return None
    return int(epoch), int(seq)


@dataclass(frozen=True, slots=True)
class Replay:
    """What to send a resuming client before live events: the seqs
    ``start..end`` (inclusive; empty when ``start > end``), to be read from the
    history one at a time (:meth:`History.get`) as the client drains them, never
    copied.

    ``gap`` is true when events after ``requested`` may be missing: the window
    no longer reaches back (the range then covers the whole window), or the id
    is not one of this run (the range is empty); ``oldest`` is then the oldest
    id still held, or ``None``.
    """

    requested: str
    start: int
    end: int
    gap: bool
    oldest: str | None
    # Stream positions (``redis-streams``): per key, the last entry the client
    # has; held events at or before it are not replayed (see StreamWindow).
    floors: tuple[tuple[int, int], ...] | None = None
    # ``redis-streams``, a client behind the window whose entries Redis still
    # holds: the entries after ``floors`` up to this position (the window's
    # newest) are read from Redis as the client drains them, then live ones.
    deep_until: tuple[tuple[int, int], ...] | None = None


class History(Generic[E]):
    """Bounded window of the most recent events (``size`` 0 keeps none).

    A ring indexed by seq, so that a replay in progress reads any held event
    in O(1) while new ones are appended.
    """

    def __init__(self, epoch: int, size: int) -> None:
        self.epoch = epoch
        self.size = max(0, size)
        self._ring: list[E | None] = [None] * self.size
        self._first = 1  # seq of the oldest event held (when any)
        self._last = 0  # seq of the newest event appended
        self._lost_before = 0  # events before this seq may be followed by lost ones

    def append(self, event: E) -> None:
        """Append the next event (seqs must increase by one)."""
        self._last = event.seq
        if not self.size:
            self._first = event.seq + 1
            return
        self._ring[event.seq % self.size] = event
        self._first = max(self._first, event.seq - self.size + 1)

    def mark_loss(self) -> None:
        """The source may have lost events after the newest one appended (a
        pub/sub resubscribe): a client that last saw any event up to it
        missed them, which only the gap notice can tell it."""
        self._lost_before = self._last + 1

    def clear(self) -> None:
        """Forget every held event (the next one appended is held)."""
        self._ring = [None] * self.size
        self._first = self._last + 1

    @property
    def full(self) -> bool:
        """Whether appending drops the oldest held event."""
        return len(self) >= self.size

    def __len__(self) -> int:
        return self._last - self._first + 1 if self._last >= self._first else 0

    @property
    def first_seq(self) -> int:
        """The seq of the oldest event held (``last + 1`` when none is)."""
        return self._first

    def get(self, seq: int) -> E | None:
        """The event ``seq`` if it is still held."""
        if self._first <= seq <= self._last:
            return self._ring[seq % self.size]
        return None

    def oldest_id(self) -> str | None:
        event = self.get(self._first)
        return event.id if event is not None else None

    def since(self, last_id: str, *, current_seq: int) -> Replay:
        """What a client whose last event was ``last_id`` missed.

        ``current_seq`` is the last seq published.
        """
        oldest = self.oldest_id()
        parsed = parse_id(last_id)
        if parsed is None or parsed[0] != self.epoch or parsed[1] > current_seq:
            # Not an id of this run: nothing here can be placed after it.
            # The client learns of the gap and reloads its state; replaying
            # the whole window would only repeat what it reloads.
            return Replay(last_id, current_seq + 1, current_seq, gap=True, oldest=oldest)
        seq = parsed[1]
        if seq < self._lost_before:
            # Events may have been lost after it: replay what is held, after the notice.
            start = max(seq + 1, self._first)
            return Replay(last_id, start, current_seq, gap=True, oldest=oldest)
        if seq >= current_seq:
            return Replay(last_id, current_seq + 1, current_seq, gap=False, oldest=oldest)
        if self._first > seq + 1:
            # The window starts after the first event the client missed.
            return Replay(last_id, self._first, current_seq, gap=True, oldest=oldest)
        return Replay(last_id, seq + 1, current_seq, gap=False, oldest=oldest)
