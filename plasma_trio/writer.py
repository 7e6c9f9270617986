"""What a transport implements: the :class:`Writer` a Session writes through.

The :class:`~plasma_trio.session.Session` decides everything (admission,
resume, bounds, the deadline, the ending); a writer renders and writes one
stream's bytes and reports back. :class:`Phase` is every writer's state.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from plasma_trio.replay import Gap
    from plasma_trio.stamped import StampedEvent

__all__ = ["Phase", "Writer"]


class Phase(enum.Enum):
    """A writer's state: serving; ending (closed by the session: what is
    queued, then the end); cut off (what is queued is dropped, the
    connection or stream released); broken (the client went away)."""

    OPEN = "open"
    ENDING = "ending"
    CUT_OFF = "cut off"
    BROKEN = "broken"


class Writer(Protocol):
    """All a transport implements: how one stream's bytes go out.

    Every method is synchronous and never blocks; the writer's own task (or
    the response body, or the gRPC handler) does the waiting. The session
    calls :meth:`offer` only while it is ``LIVE``, and :meth:`close` once
    per reason.
    """

    heartbeats: bool  # SSE: the watcher sends idle streams a heartbeat

    def offer(self, event: StampedEvent) -> bool:
        """Write (or queue) a live event; ``False`` when over the bound
        (:meth:`Session.fits`): the hub then cuts the session off."""
        ...

    def notice(self, gap: Gap) -> None:
        """Write (or queue) the live gap notice, after what is queued."""
        ...

    def heartbeat(self) -> None:
        """Write a heartbeat (SSE; the stream is idle)."""
        ...

    def close(self, *, cut_off: bool) -> None:
        """End the stream: after what is queued (shutdown, expiry), or now
        (``cut_off``: drop what is queued, and release the connection or
        stream at once if a write waits for the client). Idempotent."""
        ...

    @property
    def queue_depth(self) -> int:
        """Events (and notices) waiting in the writer, now."""
        ...
