"""The SSE fast path: the hub's fan-out writes each frame straight to the socket.

A :class:`SocketWriter` is the :class:`~plasma_trio.writer.Writer` of one
plain-HTTP/1.1 SSE connection; its :class:`~plasma_trio.session.Session`
holds every rule and its :class:`~plasma_trio.outbox.Outbox` the queue.
Read top to bottom, :meth:`SocketWriter.run` is the life of a stream:
locate, subscribe (the gap notice first), the replay as the client drains
it, live events, the end.

The writer renders an event as its shared, pre-encoded chunk
(:func:`~plasma_trio.transports.wire.sse_chunk`) and writes with one
non-blocking ``write`` (what queued meanwhile is written many frames at a time). While nothing
is to be written, the connection's task waits for the socket to become
readable: a client that goes away (EOF, reset) is noticed at once, even when
no event flows. The response is chunked HTTP/1.1 with the Quart path's
headers and bytes; it ends with the last chunk, then the connection closes.
"""

from __future__ import annotations

import contextlib
import errno
import os
from typing import TYPE_CHECKING, ClassVar

import trio

from plasma_trio.core.sse import encode_retry
from plasma_trio.session import Gap, Refused
from plasma_trio.stamped import StampedEvent
from plasma_trio.transports.wire import (
    CHUNK,
    HEARTBEAT_CHUNK,
    LAST_CHUNK,
    chunk,
    gap_chunk,
    http1_refusal,
    sse_chunk,
    sse_response_head,
)
from plasma_trio.writer import End, WriterGone

if TYPE_CHECKING:
    from plasma_trio.config import Config
    from plasma_trio.session import Session
    from plasma_trio.writer import Buffer, Item

__all__ = ["SocketWriter"]


class SocketWriter:
    """One fast-path SSE connection: its session's writer and the connection's task."""

    heartbeats = True
    wire_key = CHUNK
    head_sent: ClassVar[bool] = False  # (TLS: the head goes out before run)
    __slots__ = ("fd", "session", "sock")

    def __init__(self, sock: trio.socket.SocketType, session: Session) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.session = session

    # -- the Writer ------------------------------------------------------------

    def render(self, item: Item) -> bytes:
        if type(item) is StampedEvent:
            return item.wire.get(CHUNK) or sse_chunk(item)
        if isinstance(item, Gap):
            return gap_chunk(item)
        if isinstance(item, End):
            return LAST_CHUNK
        return HEARTBEAT_CHUNK

    def write_nowait(self, data: Buffer) -> int:
        try:
            return os.write(self.fd, data)
        except BlockingIOError:
            return 0
        except OSError:
            raise WriterGone from None  # EPIPE, ECONNRESET...

    async def wait_writable(self) -> None:
        await trio.lowlevel.wait_writable(self.sock)

    async def receive(self) -> None:
        # Readable means data or EOF: how a client that goes away is noticed
        # while no event flows. Anything it sends on an SSE connection is ignored.
        await self.read_client()

    async def read_client(self, size: int = 4096) -> bytes:
        """What the client sent once the socket is readable (``b""``: nothing
        after all).

        Raises:
            WriterGone: EOF, or the connection was reset.
        """
        await trio.lowlevel.wait_readable(self.sock)
        try:
            data = os.read(self.fd, size)
        except BlockingIOError:
            return b""
        except OSError as exc:
            if exc.errno not in (errno.ECONNRESET, errno.EPIPE, errno.ETIMEDOUT):
                raise
            raise WriterGone from None
        if not data:
            raise WriterGone  # EOF: the client went away
        return data

    def close(self, end: End, *, stalled: bool) -> None:
        """(A cut-off wakes the connection's task, which closes the socket.)"""

    # -- the connection's task -----------------------------------------------

    async def run(self, config: Config) -> None:
        """Serve the stream until the client goes, the hub closes it, or it is cut off."""
        session = self.session
        try:
            try:
                await session.locate()  # redis-streams: before subscribing
                with session.subscribed(self) as gap:
                    out = session.out
                    assert out is not None
                    # (Built in a call: nothing of it stays in this frame.)
                    out.send(_first_bytes(config, gap, head=not self.head_sent))
                    await out.pump()
                    if out.broken:
                        session.lost()
                    else:
                        await out.finish(config.subscriber_write_timeout)
            except Refused as exc:
                # Shutdown began or the limit was reached while locate waited.
                if session.refusal is None:
                    session.refuse(exc)
                with contextlib.suppress(WriterGone):
                    # (After a 200 head, an empty stream: its last chunk.)
                    self.write_nowait(LAST_CHUNK if self.head_sent else http1_refusal(exc))
        finally:
            self.goodbye()
            self.sock.close()

    def goodbye(self) -> None:
        """The stream is over, the socket about to close (TLS: ``close_notify``)."""


def _first_bytes(config: Config, gap: Gap | None, *, head: bool) -> bytes:
    """The response head (unless sent), the retry, and the gap notice if any."""
    first = chunk(encode_retry(config.sse_retry))
    if head:
        first = sse_response_head(config.origin) + first
    return first + gap_chunk(gap) if gap is not None else first
