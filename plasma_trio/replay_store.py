"""Where replays older than the window are read (``redis-streams``).

The source gives the store its Redis reads (whether a client's entries still
exist, and the entries after a position); the store keeps the events already
read, shared by every client replaying the same entries, so that their wire
encodings are built once. :mod:`plasma_trio.replay` reads through it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from plasma_trio.core.events import Event
    from plasma_trio.core.stream_ids import EntryId, Position
    from plasma_trio.stamped import StampedEvent

    # (position, until, count) -> entries after position (see ReplayStore.entries_after).
    EntryReader = Callable[
        [Position, Position, int], Awaitable[list[tuple[int, EntryId, Event | None]] | None]
    ]

__all__ = ["ReplayStore"]


class ReplayStore:
    """Where replays older than the window are read (``redis-streams``): the
    source's Redis reads, and the events already read, shared by the
    clients replaying the same entries (one key: by entry id, the newest
    8,192 kept)."""

    __slots__ = ("_exists", "_read", "replayed")

    def __init__(
        self, exists: Callable[[Position], Awaitable[bool | None]], read: EntryReader | None
    ) -> None:
        self._exists = exists
        self._read = read
        self.replayed: dict[EntryId, StampedEvent] = {}

    async def entries_after(
        self, position: Position, until: Position, count: int
    ) -> list[tuple[int, EntryId, Event | None]] | None:
        """The entries after ``position`` up to ``until`` (inclusive), every key
        merged in entry-id order, a page of at most about ``count`` per key:
        (key index, entry id, event or ``None`` for an invalid entry). An empty
        page: nothing is left. ``None``: Redis cannot answer now, or an entry
        of ``position`` is gone (trimmed while the client replayed)."""
        if self._read is None:
            return None
        return await self._read(position, until, count)

    async def entries_exist(self, position: Position) -> bool | None:
        """Whether Redis still holds every entry of ``position`` (``None``: not
        known, Redis unreachable)."""
        return await self._exists(position)

    def keep(self, entry: EntryId, event: StampedEvent) -> None:
        """Keep ``event`` (read from Redis for a replay) for other clients
        replaying the same entry; the oldest kept goes beyond 8,192."""
        replayed = self.replayed
        if len(replayed) >= 8192:
            del replayed[next(iter(replayed))]
        replayed[entry] = event
