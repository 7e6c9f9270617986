"""Request heads on the main port's plain connections, before anyone serves them.

The front door (:mod:`plasma_trio.transports.frontdoor`) reads each plain
connection's first request head here, bounded (16 KiB, within
``PLASMA_HEADER_TIMEOUT``, at most :data:`MAX_PENDING_HEADS` waiting: see
:class:`Waiting`), to decide between the SSE fast path and Hypercorn;
:class:`PrefixedStream` hands Hypercorn the connection with the bytes already
read in front.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any, Final

import httptools
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
    "ReplayedTlsStream",
    "Waiting",
    "Head",
    "HeadReader",
]

MAX_HEAD = 16 * 1024
# Connections per port that may be waiting for their request head (or TLS
# handshake) at once (see Waiting).
MAX_PENDING_HEADS: Final = 1024
# A connection that has waited this long for its client's head (or
# handshake) without completing it is slow itself: at the bound, it makes
# room for a new one. (Capped at half the header timeout.) A TLS handshake
# over a slow mobile link takes about 0.5 s, and a client busy with
# thousands of handshakes of its own takes seconds.
SLOW_HEAD: Final = 5.0
TICK: Final = 0.02  # Waiting.clock's tick
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

    def __init__(
        self, stream: trio.SocketStream, prefix: bytes = b"", waiting: Waiting | None = None
    ) -> None:
        self.stream = stream
        self.socket = stream.socket
        self._prefix = prefix
        # While the connection waits for its head: its reads are what the
        # port counts as waiting for the client (Waiting.park).
        self._waiting = waiting

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            data, self._prefix = self._prefix, b""
            await trio.lowlevel.checkpoint()
            return data
        waiting = self._waiting
        if waiting is None:
            return bytes(await self.stream.receive_some(max_bytes))
        waiting.park(self.socket)
        try:
            return bytes(await self.stream.receive_some(max_bytes))
        finally:
            waiting.unpark(self.socket)

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


class ReplayedTlsStream(trio.abc.Stream):
    """A TLS connection handed to Hypercorn after the front door read its
    first head through it: those bytes first, then the connection. It looks
    like the ``trio.SSLStream`` it wraps where Hypercorn looks (the handshake
    is done, the ALPN protocol, the transport's socket), so the request is
    served as HTTPS."""

    def __init__(self, stream: trio.SSLStream[Any], prefix: bytes) -> None:
        self.stream = stream
        self.transport_stream = stream.transport_stream
        self._prefix = prefix

    async def do_handshake(self) -> None:
        await self.stream.do_handshake()  # (done: returns at once)

    def selected_alpn_protocol(self) -> str | None:
        protocol: str | None = self.stream.selected_alpn_protocol()
        return protocol

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

    async def aclose(self) -> None:
        await self.stream.aclose()


class Waiting:
    """The connections of one port waiting for their request head (or TLS
    handshake), in the order they began to wait, each with what drops it.

    What counts is the time the server spent waiting for the client: from
    a connection's first read that found the head incomplete (or its
    handshake's start) until the head is in, only the spans in which a read
    waited for the client's bytes (:meth:`park` / :meth:`unpark`), not the
    time the connection waited for a busy server to get to it: a read
    whose bytes came while the process was behind resumes late, and the
    time the event loop ran late meanwhile (:meth:`clock`, a 20 ms tick that
    measures how late it wakes) is not counted. At
    :data:`MAX_PENDING_HEADS` the port's acceptor stops accepting
    (:meth:`wait_room`: the kernel's listen backlog holds the connects) until
    one leaves, or until one has waited :data:`SLOW_HEAD` for its client:
    that one is slow itself (silent, or trickling its head), and it is
    dropped to make room (``head_limit``). A slow-header flood therefore
    holds a port for at most SLOW_HEAD at a time, and a storm of real
    clients, who send their heads at once, loses none however far behind
    the server is.
    """

    def __init__(self, port: str, guard: ConnectionGuard, header_timeout: float) -> None:
        self.port = port
        self.guard = guard
        self.grace = min(SLOW_HEAD, header_timeout / 2)
        # key: [time waited for the client before, waiting since (or None), drop]
        self._waiting: dict[object, list[Any]] = {}
        # Accepted connections whose task has not run yet (see started()).
        self.starting = 0
        self._room = trio.lowlevel.ParkingLot()
        # The event loop's lateness so far, while anything waited (clock()).
        self.late = 0.0
        self._ticking = trio.lowlevel.ParkingLot()

    def __len__(self) -> int:
        return len(self._waiting)

    def accepted(self) -> None:
        """The acceptor took a connection whose task has not run yet: it may
        be about to wait, so it counts against the bound."""
        self.starting += 1

    def started(self) -> None:
        """An accepted connection's task runs (it counts from its wait on)."""
        self.starting -= 1

    def add(self, key: object, drop: Callable[[], object], *, parked: bool = False) -> None:
        """``key`` waits for its head from now (``parked``: and its read
        waits for the client now); ``drop`` ends the wait."""
        if len(self._waiting) >= MAX_PENDING_HEADS:
            self.shed()  # (TLS connections, handed on to Hypercorn, come twice)
        self._waiting[key] = [0.0, self._now() if parked else None, drop]
        if self._ticking:
            self._ticking.unpark_all()

    def park(self, key: object) -> None:
        """``key``'s read waits for its client from now."""
        entry = self._waiting.get(key)
        if entry is not None and entry[1] is None:
            entry[1] = self._now()

    def unpark(self, key: object) -> None:
        """``key``'s read has what the client sent (or ended)."""
        entry = self._waiting.get(key)
        if entry is not None and entry[1] is not None:
            entry[0] += self._now() - entry[1]
            entry[1] = None

    def done(self, key: object) -> None:
        """``key`` no longer waits (its head is in, or it ended)."""
        if self._waiting.pop(key, None) is not None and self._room:
            self._room.unpark_all()

    def drop_all(self) -> None:
        """Drop every waiting connection (shutdown)."""
        for entry in list(self._waiting.values()):
            entry[2]()

    @property
    def full(self) -> bool:
        return len(self._waiting) + self.starting >= MAX_PENDING_HEADS

    def _now(self) -> float:
        """The time that counts: the clock less the event loop's lateness."""
        return time.monotonic() - self.late

    async def clock(self) -> None:
        """Measure how late the event loop runs, while anything waits (for ever:
        cancel to stop). A tick due in 20 ms that wakes a second late means
        the process was a second behind: no client waited that second."""
        while True:
            if not self._waiting:
                await self._ticking.park()
            due = trio.current_time() + TICK
            await trio.sleep(TICK)
            self.late += max(0.0, trio.current_time() - due)

    def _left(self, entry: list[Any], now: float) -> float:
        """How long until ``entry`` counts as slow (``inf``: it does not wait
        for its client now, and has not waited long enough)."""
        if entry[1] is None:
            return math.inf if entry[0] < self.grace else 0.0
        return float(self.grace - entry[0] - (now - entry[1]))

    def shed(self) -> bool:
        """Drop the longest-waiting connection that is slow itself (has
        waited SLOW_HEAD for its client); whether there is room now."""
        if not self.full:
            return True
        now = self._now()
        for key, entry in self._waiting.items():
            if self._left(entry, now) <= 0:
                del self._waiting[key]
                entry[2]()
                self.guard.dropped(self.port, "head_limit")
                return True
        return False

    async def wait_room(self) -> None:
        """Until there is room for one more waiting connection."""
        while not self.shed():
            now = self._now()
            soonest = min((self._left(e, now) for e in self._waiting.values()), default=0.01)
            with trio.move_on_after(min(max(0.0, soonest), 0.1)):
                await self._room.park()


class HeadTooLarge(Exception):
    """The request head grew past MAX_HEAD (answered 431, SPEC 10)."""


class Head:
    """A request head as the fast path reads it (names as sent: compare them
    lowercased)."""

    __slots__ = ("headers", "http_version", "method", "target")

    def __init__(
        self, method: bytes, target: bytes, http_version: bytes, headers: list[tuple[bytes, bytes]]
    ) -> None:
        self.method = method
        self.target = target
        self.http_version = http_version
        self.headers = headers


class HeadReader:
    """One connection's first request head, parsed as its bytes come.

    :meth:`feed` returns ``None`` while the head is incomplete; then
    ``(head, raw)``: the parsed :class:`Head`, and every byte read. ``head``
    is ``None`` when the bytes are not a request head the parser takes
    whole (h2c, garbage, anything unusual) or the client closed first
    (``feed(b"")``): Hypercorn, whose h11 has the last word on HTTP/1.x,
    then answers ``raw`` as it would have from its own listener.

    The head is parsed with httptools (llhttp, in C: about 3 us, where h11
    took 17 us, an eighth of a connection's setup in a storm).

    Raises:
        HeadTooLarge: more than MAX_HEAD bytes without a complete head (a
            head that long is refused even when it arrives whole).
    """

    __slots__ = ("_headers", "_target", "raw")

    def __init__(self) -> None:
        self.raw = bytearray()
        self._target = b""
        self._headers: list[tuple[bytes, bytes]] = []

    # httptools' callbacks
    def on_url(self, url: bytes) -> None:
        self._target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def feed(self, data: bytes) -> tuple[Head | None, bytes] | None:
        raw = self.raw
        raw += data
        end = _end_of_head(raw)
        if end < 0:
            if len(raw) > MAX_HEAD:
                raise HeadTooLarge
            return (None, bytes(raw)) if not data else None  # (EOF: incomplete)
        if end > MAX_HEAD:
            raise HeadTooLarge  # it arrived whole, past the bound
        parser = httptools.HttpRequestParser(self)
        try:
            parser.feed_data(bytes(raw[:end]))
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            return None, bytes(raw)  # (an Upgrade, h2c's preface, garbage: Hypercorn's)
        version = parser.get_http_version().encode()
        hosts = sum(1 for name, _ in self._headers if name.lower() == b"host")
        if version == b"1.1" and hosts != 1:
            return None, bytes(raw)  # (HTTP/1.1 asks one Host: h11 answers 400)
        return Head(parser.get_method(), self._target, version, self._headers), bytes(raw)


def _end_of_head(raw: bytearray) -> int:
    """Where the head's blank line ends (CRLF or a bare LF), or -1."""
    crlf = raw.find(b"\n\r\n")
    lf = raw.find(b"\n\n")
    if crlf < 0:
        return lf + 2 if lf >= 0 else -1
    if 0 <= lf < crlf:
        return lf + 2
    return crlf + 3
