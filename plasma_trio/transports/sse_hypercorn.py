"""SSE on Hypercorn (TLS, HTTP/2, or the fast path off): the response writer.

A :class:`ResponseWriter` is the :class:`~plasma_trio.session.Writer` of one
SSE response served by the Quart app (:mod:`plasma_trio.transports.http`);
its :class:`~plasma_trio.session.Session` holds every rule. The route admits
the session and locates its ``Last-Event-ID`` *before* the response head, so
a refusal is a refusal (400/401/403/503) on this path as on the fast path;
:meth:`ResponseWriter.body`, read top to bottom, is then the life of the
stream: subscribe (the gap notice first), the replay as the client drains it,
live events batched per write, the end.

The body is an async generator: Quart-trio cancels the request's nursery when
the client disconnects and closes the generator, which leaves the session's
``with`` block, so the subscription never outlives the connection.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Final, Protocol

import trio

from plasma_trio.core.sse import HEARTBEAT, encode_retry, gap_frame
from plasma_trio.hub import StampedEvent
from plasma_trio.replay import event_size
from plasma_trio.session import Gap, Phase, Refused
from plasma_trio.transports.wire import sse_frame

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from plasma_trio.config import Config
    from plasma_trio.session import Session

__all__ = ["CONTROL", "ConnectionControl", "ResponseWriter"]

# The key, in each request's ASGI state, of its connection's ConnectionControl
# (set by the front door, which owns the connections).
CONTROL = "plasma_trio.control"

# While Hypercorn holds this many unsent bytes of an HTTP/2 SSE response, the
# response waits (and counts as stalled) instead of writing more.
_H2_UNSENT_LIMIT: Final = 64 * 1024


class ConnectionControl(Protocol):
    """How an SSE response sees and ends a stall of its client."""

    async def wait_sent(self, scope: dict[str, Any], limit: int) -> None:
        """Return once at most ``limit`` bytes of the response are unsent."""
        ...

    def release(self, scope: dict[str, Any]) -> None:
        """End the response now (close the connection, or reset the HTTP/2 stream)."""
        ...


# Queued frames written to the socket in one write, at most.
_BATCH: Final = 64


class ResponseWriter:
    """The :class:`~plasma_trio.session.Writer` of an SSE response on
    Hypercorn (TLS, HTTP/2, or the fast path off): a queue the session's
    fan-out fills, drained by the response body (:meth:`body`).

    Each ``yield`` of the body returns once Hypercorn has taken the bytes
    (HTTP/1.1: sent them); over HTTP/2 the body also waits while Hypercorn
    holds more than ``_H2_UNSENT_LIMIT`` unsent bytes. Meanwhile the session
    counts the stream as stalled, so that the write deadline and a cut-off
    release the connection (HTTP/1.1) or stream (HTTP/2) at once.
    """

    heartbeats = True
    __slots__ = (
        "_receive",
        "_send",
        "control",
        "phase",
        "queued",
        "queued_bytes",
        "scope",
        "session",
    )

    def __init__(
        self, session: Session, control: ConnectionControl | None, scope: dict[str, Any]
    ) -> None:
        self.session = session
        self.control = control
        self.scope = scope
        # Unbounded as a channel: the session's bound (fits) is the one rule.
        self._send, self._receive = trio.open_memory_channel[StampedEvent | Gap | None](math.inf)
        self.queued = 0
        self.queued_bytes = 0
        self.phase = Phase.OPEN

    # -- the session's side (synchronous, never blocks) -----------------------

    def offer(self, event: StampedEvent) -> bool:
        if self.phase is not Phase.OPEN:
            return True
        size = event_size(event)
        if not self.session.fits(self.queued, self.queued_bytes, size):
            return False
        self._send.send_nowait(event)
        self.queued += 1
        self.queued_bytes += size
        return True

    def notice(self, gap: Gap) -> None:
        if self.phase is Phase.OPEN:
            self._send.send_nowait(gap)

    def heartbeat(self) -> None:
        if self.phase is Phase.OPEN and not self.queued:
            self._send.send_nowait(None)

    def close(self, *, cut_off: bool) -> None:
        if self.phase is Phase.OPEN:
            self._send.close()
        if cut_off:
            self.phase = Phase.CUT_OFF  # the body stops at its next step
        elif self.phase is Phase.OPEN:
            self.phase = Phase.ENDING
        if cut_off and self.session.stalled_since is not None and self.control is not None:
            self.control.release(self.scope)  # the body's yield waits for the client

    @property
    def queue_depth(self) -> int:
        return self.queued

    # -- the response body ---------------------------------------------------

    async def _drained(self) -> None:
        if self.control is not None:
            await self.control.wait_sent(self.scope, _H2_UNSENT_LIMIT)

    async def body(self, config: Config) -> AsyncIterator[bytes]:
        """The stream: retry (and the gap notice), the replay as the client
        drains it, then live events, batched per write."""
        session = self.session
        try:
            with session.subscribed(self) as gap:
                first = [encode_retry(config.sse_retry)]
                if gap is not None:
                    first.append(gap_frame(gap.requested, gap.oldest))
                session.stall()
                yield b"".join(first)
                session.unstall()
                while session.replaying:
                    if replayed := await session.replay_step():
                        session.stall()
                        yield b"".join([_frame(i) for i in replayed])
                        await self._drained()
                        session.unstall()
                        session.delivered_replay(sum(not isinstance(i, Gap) for i in replayed))
                while self.phase is not Phase.CUT_OFF:
                    try:
                        item = await self._receive.receive()
                    except trio.EndOfChannel:
                        return
                    items: list[StampedEvent | Gap | None] = [item]
                    # Batch whatever else is already queued into the same write.
                    while len(items) < _BATCH:
                        try:
                            items.append(self._receive.receive_nowait())
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                    events = [i for i in items if i is not None and not isinstance(i, Gap)]
                    self.queued -= len(events)
                    self.queued_bytes -= sum(event_size(e) for e in events)
                    session.stall()
                    yield b"".join([_frame(i) for i in items])
                    await self._drained()
                    session.unstall()
                    for event in events:
                        session.delivered(event)
        except Refused:
            return  # shutdown began (or the limit) between the head and here


def _frame(item: StampedEvent | Gap | None) -> bytes:
    if item is None:
        return HEARTBEAT
    if isinstance(item, Gap):
        return gap_frame(item.requested, item.oldest)
    return sse_frame(item)
