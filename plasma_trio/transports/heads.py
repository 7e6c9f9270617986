"""Request heads on the main port's plain connections, before anyone serves them.

The front door (:mod:`plasma_trio.transports.frontdoor`) reads each plain
connection's first request head here, bounded (16 KiB, within
``PLASMA_HEADER_TIMEOUT``, at most :data:`MAX_PENDING_HEADS` waiting: see
:class:`Waiting`), to decide between the SSE fast path and Hypercorn;
:class:`PrefixedStream` hands Hypercorn the connection with the bytes already
read in front.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Final

import h11
import trio

if TYPE_CHECKING:
    from collections.abc import Callable

    from plasma_trio.transports.guard import ConnectionGuard

__all__ = [
    "HEAD_TOO_LARGE",
    "MAX_HEAD",
    "MAX_PENDING_HEADS",
    "REQUEST_TIMEOUT",
    "SLOW_HEAD",
    "HeadTooLarge",
    "PrefixedStream",
    "Waiting",
    "HeadReader",
]

MAX_HEAD = 16 * 1024
# Connections per port that may be waiting for their request head (or TLS
# handshake) at once (see Waiting).
MAX_PENDING_HEADS: Final = 1024
# A connection that has waited this long for its head (or handshake) without
# completing it is slow itself: at the bound, it makes room for a new one.
# (Capped at half the header timeout.) A TLS handshake over a slow mobile
# link takes about 0.5 s.
SLOW_HEAD: Final = 2.0
HEAD_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: 31\r\n\r\n"
    b"request head over 16384 bytes\r\n"
)
REQUEST_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"


class PrefixedStream(trio.abc.HalfCloseableStream):
    """The socket stream handed to Hypercorn: it first returns the bytes the
    front door already read, and its ``send_eof`` cannot race a send.

    Hypercorn 0.18 half-closes a connection (``send_eof``) from its reading
    task while its request task may still be sending an error response; on a
    ``trio.SocketStream`` the two collide in trio's conflict detector
    (``send_eof`` holds it across a checkpoint) and the sender gets
    ``BusyResourceError``, which Hypercorn does not expect. Here the
    half-close is one synchronous ``shutdown(SHUT_WR)``: a send in progress
    or after it fails with ``BrokenResourceError`` (EPIPE), which Hypercorn
    handles as a closed connection.
    """

    def __init__(self, stream: trio.SocketStream, prefix: bytes = b"") -> None:
        self.stream = stream
        self.socket = stream.socket
        self._prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            data, self._prefix = self._prefix, b""
            await trio.lowlevel.checkpoint()
            return data
        return bytes(await self.stream.receive_some(max_bytes))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        sock = self.socket
        if not sock.did_shutdown_SHUT_WR:
            try:
                sock.shutdown(trio.socket.SHUT_WR)
            except OSError as exc:
                raise trio.BrokenResourceError from exc
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await self.stream.aclose()


class Waiting:
    """The connections of one port waiting for their request head (or TLS
    handshake), in the order they began to wait, each with what drops it.

    A connection counts here only while the server waits for its client:
    from its first read that found the head incomplete (or its handshake's
    start) until the head is in or it ends, not while it merely waits for
    the server to get to it. At :data:`MAX_PENDING_HEADS` the port's
    acceptor stops accepting (:meth:`wait_room`: the kernel's listen backlog
    holds the connects) until one leaves, or until the one waiting longest
    has waited :data:`SLOW_HEAD`: that one is slow itself, and is dropped to
    make room (``head_limit``). A slow-header flood therefore holds a port for
    at most SLOW_HEAD at a time, and a storm of real clients, who send their
    heads at once, loses none.
    """

    def __init__(self, port: str, guard: ConnectionGuard, header_timeout: float) -> None:
        self.port = port
        self.guard = guard
        self.grace = min(SLOW_HEAD, header_timeout / 2)
        self._waiting: dict[object, tuple[float, Callable[[], object]]] = {}
        # Accepted connections whose task has not run yet (see started()).
        self.starting = 0
        self._room = trio.lowlevel.ParkingLot()

    def __len__(self) -> int:
        return len(self._waiting)

    def accepted(self) -> None:
        """The acceptor took a connection whose task has not run yet: it may
        be about to wait, so it counts against the bound."""
        self.starting += 1

    def started(self) -> None:
        """An accepted connection's task runs (it counts from its wait on)."""
        self.starting -= 1

    def add(self, key: object, drop: Callable[[], object]) -> None:
        """``key`` waits for its client from now; ``drop`` ends the wait."""
        if len(self._waiting) >= MAX_PENDING_HEADS:
            self.shed()  # (TLS connections, handed on to Hypercorn, come twice)
        self._waiting[key] = (time.monotonic(), drop)

    def done(self, key: object) -> None:
        """``key`` no longer waits (its head is in, or it ended)."""
        if self._waiting.pop(key, None) is not None and self._room:
            self._room.unpark_all()

    def drop_all(self) -> None:
        """Drop every waiting connection (shutdown)."""
        for _, drop in list(self._waiting.values()):
            drop()

    @property
    def full(self) -> bool:
        return len(self._waiting) + self.starting >= MAX_PENDING_HEADS

    def shed(self) -> bool:
        """Drop the connection waiting longest if it is slow itself (waited
        SLOW_HEAD); whether there is room now."""
        if not self.full:
            return True
        if not self._waiting:
            return False
        oldest = next(iter(self._waiting))
        since, drop = self._waiting[oldest]
        if time.monotonic() - since < self.grace:
            return False
        del self._waiting[oldest]
        drop()
        self.guard.dropped(self.port, "head_limit")
        return True

    async def wait_room(self) -> None:
        """Until there is room for one more waiting connection."""
        while not self.shed():
            if self._waiting:
                since = next(iter(self._waiting.values()))[0]
                wait = max(0.0, since + self.grace - time.monotonic())
            else:
                wait = 0.01  # (all accepted ones yet to run: let them)
            with trio.move_on_after(wait):
                await self._room.park()


class HeadTooLarge(Exception):
    """The request head grew past MAX_HEAD (answered 431, SPEC 10)."""


class HeadReader:
    """One connection's first request head, parsed with h11 as its bytes come.

    :meth:`feed` returns ``None`` while the head is incomplete; then
    ``(request, raw)``: the parsed request (``None`` when the bytes are not
    an HTTP/1.x request head, e.g. h2c or garbage, or the client closed
    first: ``feed(b"")``) and every byte read.

    Raises:
        HeadTooLarge: more than MAX_HEAD bytes without a complete head (a
            head that long is refused even when it arrives whole).
    """

    __slots__ = ("_conn", "raw")

    def __init__(self) -> None:
        self._conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self.raw = bytearray()

    def feed(self, data: bytes) -> tuple[h11.Request | None, bytes] | None:
        self.raw += data
        conn = self._conn
        conn.receive_data(data)
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            if exc.error_status_hint == 431:
                raise HeadTooLarge from None
            return None, bytes(self.raw)
        if event is h11.NEED_DATA:
            return (None, bytes(self.raw)) if not data else None  # (EOF: incomplete)
        if self.raw.find(b"\r\n\r\n") > MAX_HEAD:
            raise HeadTooLarge  # it arrived whole, past h11's incomplete-size check
        return (event if isinstance(event, h11.Request) else None), bytes(self.raw)
