"""What a transport implements: the :class:`Writer` a session writes through.

The :class:`~plasma_trio.session.Session` decides everything (admission,
resume, the queue and its bound, the deadline, the ending), and its
:class:`~plasma_trio.outbox.Outbox` holds the queue; a writer renders items
to its transport's bytes and writes them. What the session hands a writer
to render is an :data:`Item`: a live or replayed event, a gap notice, a
heartbeat, or the end (with its reason). :class:`Phase` is a stream's
state on the writing side.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Final, Protocol, TypeAlias

if TYPE_CHECKING:
    from plasma_trio.admission import Ending
    from plasma_trio.replay import Gap
    from plasma_trio.stamped import StampedEvent

__all__ = ["HEARTBEAT", "Buffer", "End", "Heartbeat", "Item", "Phase", "Writer", "WriterGone"]

Buffer: TypeAlias = "bytes | memoryview"


class Phase(enum.Enum):
    """A stream's writing state: serving; ending (closed by the session:
    what is queued, then the end); cut off (one try for what is queued, the
    connection or stream released); broken (the client went away)."""

    OPEN = "open"
    ENDING = "ending"
    CUT_OFF = "cut off"
    BROKEN = "broken"


class Heartbeat:
    """An idle stream's keep-alive (SSE's comment line, WebSocket's ping)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<heartbeat>"


HEARTBEAT: Final = Heartbeat()


class End:
    """The end of the stream, and why (``None``: the client's side)."""

    __slots__ = ("ending",)

    def __init__(self, ending: Ending | None) -> None:
        self.ending = ending

    def __repr__(self) -> str:
        return f"<end {self.ending}>"


# What a session hands a writer to render.
Item: TypeAlias = "StampedEvent | Gap | Heartbeat | End"


class WriterGone(Exception):
    """The client went away (a write failed, end of stream, a reset)."""


class Writer(Protocol):
    """All a transport implements: how one stream's bytes go out.

    ``render`` and ``write_nowait`` are synchronous and never block (the
    hub's fan-out calls them); the waiting is done by the stream's task
    (:meth:`Outbox.pump <plasma_trio.outbox.Outbox.pump>`), or by the
    writer's own loop for a transport that takes bytes only from it.
    """

    heartbeats: bool  # the watcher sends idle streams a heartbeat
    # The key, in each event's ``wire`` cache, of the frame ``render`` makes
    # of it (rendered once per event, shared by every stream of the writer's
    # kind: the hot path looks there before calling ``render``).
    wire_key: str

    def render(self, item: Item) -> bytes:
        """``item`` as this transport's bytes (shared per event where it can)."""
        ...

    def write_nowait(self, data: Buffer) -> int:
        """Write what of ``data`` can go now; how many bytes were taken (0
        while the client or the connection takes nothing). ``data`` is one
        frame, or several joined: a writer never needs to know where they
        part.

        Raises:
            WriterGone: the client went away.
        """
        ...

    async def wait_writable(self) -> None:
        """Return when ``write_nowait`` may take more.

        Raises:
            WriterGone: the client went away.
        """
        ...

    async def receive(self) -> None:
        """Wait for what the client sends while nothing is to be written, and
        handle it; return to let the stream look again.

        Raises:
            WriterGone: the client went away (end of stream, a reset).
        """
        ...

    def close(self, end: End, *, stalled: bool) -> None:
        """The stream ends now (``end``): when ``stalled`` (a write waits for
        a client that takes nothing), release the connection or stream at
        once. Idempotent."""
        ...
