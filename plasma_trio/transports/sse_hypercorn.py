"""SSE on Hypercorn (TLS, HTTP/2, or the fast path off): the response writer.

A :class:`ResponseWriter` is the :class:`~plasma_trio.writer.Writer` of one
SSE response served by the Quart app (:mod:`plasma_trio.transports.http`);
its :class:`~plasma_trio.session.Session` holds every rule and its
:class:`~plasma_trio.outbox.Outbox` the queue, which the body takes from. The route admits
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

from typing import TYPE_CHECKING, Any, Final, Protocol

import trio

from plasma_trio.core.sse import HEARTBEAT, encode_retry, gap_frame
from plasma_trio.session import Gap, Phase, Refused
from plasma_trio.stamped import StampedEvent
from plasma_trio.transports.wire import SSE, sse_frame
from plasma_trio.writer import End

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from plasma_trio.config import Config
    from plasma_trio.session import Session
    from plasma_trio.writer import Buffer, Item

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
    """The :class:`~plasma_trio.writer.Writer` of an SSE response on
    Hypercorn (TLS, HTTP/2, or the fast path off).

    Hypercorn takes bytes only from the response body's ``yield``, so
    ``write_nowait`` takes nothing: everything waits in the session's outbox
    and the body (:meth:`body`) takes it, many frames per write. Each
    ``yield`` returns once Hypercorn has taken the bytes (HTTP/1.1: sent
    them); over HTTP/2 the body also waits while Hypercorn holds more than
    ``_H2_UNSENT_LIMIT`` unsent bytes. Meanwhile the session counts the
    stream as stalled, so that the write deadline and a cut-off release the
    connection (HTTP/1.1) or stream (HTTP/2) at once.
    """

    heartbeats = True
    wire_key = SSE
    __slots__ = ("control", "scope", "session")

    def __init__(
        self, session: Session, control: ConnectionControl | None, scope: dict[str, Any]
    ) -> None:
        self.session = session
        self.control = control
        self.scope = scope

    # -- the Writer ------------------------------------------------------------

    def render(self, item: Item) -> bytes:
        if type(item) is StampedEvent:
            return sse_frame(item)
        if isinstance(item, Gap):
            return gap_frame(item.requested, item.oldest)
        if isinstance(item, End):
            return b""  # the body returns
        return HEARTBEAT

    def write_nowait(self, data: Buffer) -> int:
        return 0  # the body takes what is queued (see the class doc)

    async def wait_writable(self) -> None:
        await self._drained()

    async def receive(self) -> None:
        await trio.sleep_forever()  # Quart cancels the body when the client goes

    def close(self, end: End, *, stalled: bool) -> None:
        if stalled and self.control is not None:
            self.control.release(self.scope)  # the body's yield waits for the client

    # -- the response body ---------------------------------------------------

    async def _drained(self) -> None:
        if self.control is not None:
            await self.control.wait_sent(self.scope, _H2_UNSENT_LIMIT)

    async def body(self, config: Config) -> AsyncIterator[bytes]:
        """The stream: retry (and the gap notice), the replay as the client
        drains it, then what the outbox holds, batched per write."""
        session = self.session
        # Quart sent the head (200) before it runs the body: a refusal from
        # here on (shutdown began since admission) ends an empty stream, and
        # is logged with the status the client saw.
        session.status = 200
        try:
            with session.subscribed(self) as gap:
                out = session.out
                assert out is not None
                first = [encode_retry(config.sse_retry)]
                if gap is not None:
                    first.append(gap_frame(gap.requested, gap.oldest))
                session.stall()
                yield b"".join(first)
                session.unstall()
                while out.phase is not Phase.CUT_OFF:
                    if session.replaying and not out.depth:
                        if replayed := await session.replay_step():
                            out.put_items(replayed)
                        continue
                    if not out.depth:
                        if out.phase is not Phase.OPEN:
                            return  # ending: all of it written
                        await out.wait()
                        continue
                    data, marks = out.take(_BATCH)
                    session.stall()
                    yield data
                    await self._drained()
                    session.unstall()
                    out.taken(marks)
        except Refused:
            return  # shutdown began (or the limit) between the head and here
