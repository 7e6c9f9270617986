"""Request heads on the main port's plain connections, before anyone serves them.

The front door (:mod:`plasma_trio.transports.frontdoor`) reads each plain
connection's first request head here, bounded (16 KiB, within
``PLASMA_HEADER_TIMEOUT``, at most :data:`MAX_PENDING_HEADS` waiting), to
decide between the SSE fast path and Hypercorn; :class:`PrefixedStream`
hands Hypercorn the connection with the bytes already read in front.
"""

from __future__ import annotations

import h11
import trio

__all__ = [
    "HEAD_TOO_LARGE",
    "MAX_HEAD",
    "MAX_PENDING_HEADS",
    "REQUEST_TIMEOUT",
    "HeadTooLarge",
    "PrefixedStream",
    "read_head",
]

MAX_HEAD = 16 * 1024
# Connections per port that may be waiting for their request head (or TLS
# handshake) at once; a new one beyond it drops the one waiting longest, so a
# slow-header flood cannot hold the port while real clients keep getting in.
MAX_PENDING_HEADS = 1024
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


class HeadTooLarge(Exception):
    """The request head grew past MAX_HEAD (answered 431, SPEC 10)."""


async def read_head(stream: trio.SocketStream) -> tuple[h11.Request | None, bytes]:
    """Read until the first request head is complete (the caller bounds the
    time: see ``FrontDoor._waiting``).

    Returns the parsed request (``None`` when the bytes are not an HTTP/1.x
    request head, e.g. h2c or garbage) and every byte read so far.

    Raises:
        HeadTooLarge: more than MAX_HEAD bytes without a complete head (a
            head that long is refused even when it arrives whole).
    """
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    raw = bytearray()
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            if exc.error_status_hint == 431:
                raise HeadTooLarge from None
            return None, bytes(raw)
        if event is h11.NEED_DATA:
            data = await stream.receive_some(65536)
            raw += data
            conn.receive_data(bytes(data))
            if not data:
                # EOF: whatever was sent is incomplete.
                return None, bytes(raw)
            continue
        end = raw.find(b"\r\n\r\n")
        if end > MAX_HEAD:
            raise HeadTooLarge  # it arrived whole, past h11's incomplete-size check
        return (event if isinstance(event, h11.Request) else None), bytes(raw)
