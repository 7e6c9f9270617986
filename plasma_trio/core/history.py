"""The replay window: the last N events, looked up by a client's Last-Event-ID.

Pure: the caller appends events in publish order and asks what a client with
a given last id missed. Ids are ``<epoch>-<seq>``: ``epoch`` identifies one
run of one instance (ms since 1970 at start), ``seq`` counts from 1. A
``Last-Event-ID`` from another epoch, from the future, or unparsable cannot be
placed in this window and is reported as a gap.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

if TYPE_CHECKING:
    from collections.abc import Sequence

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
class Replay(Generic[E]):
    """What to send a resuming client before live events.

    ``gap`` is true when events after ``requested`` may be missing from
    ``events``: the window no longer reaches back (``events`` then holds the
    whole window), or the id is not one of this run (``events`` is empty);
    ``oldest`` is then the oldest id still held, or ``None``.
    """

    events: Sequence[E]
    gap: bool
    oldest: str | None


class History(Generic[E]):
    """Bounded window of the most recent events (``size`` 0 keeps none)."""

    def __init__(self, epoch: int, size: int) -> None:
        self.epoch = epoch
        self._events: deque[E] = deque(maxlen=size) if size > 0 else deque(maxlen=0)

    def append(self, event: E) -> None:
        self._events.append(event)

    def __len__(self) -> int:
        return len(self._events)

    def since(self, last_id: str, *, current_seq: int) -> Replay[E]:
        """Events after ``last_id``. ``current_seq`` is the last seq published."""
        oldest = self._events[0].id if self._events else None
        parsed = parse_id(last_id)
        if parsed is None or parsed[0] != self.epoch or parsed[1] > current_seq:
            # Not an id of this run: nothing here can be placed after it.
            # The client learns of the gap and reloads its state; replaying
            # the whole window would only repeat what it reloads.
            return Replay(events=(), gap=True, oldest=oldest)
        seq = parsed[1]
        if seq >= current_seq:
            return Replay(events=(), gap=False, oldest=oldest)
        if not self._events or self._events[0].seq > seq + 1:
            # The window starts after the first event the client missed.
            return Replay(events=list(self._events), gap=True, oldest=oldest)
        first = self._events[0].seq
        return Replay(events=list(self._events)[seq + 1 - first :], gap=False, oldest=oldest)
