"""Waiting for the next event on each kind of stream the tests open.

Each helper returns the next event or fails the test, saying what it waited
for, when the stream ends first or nothing comes in time. (A loop such as
``async for sse in events: if sse.data: assert ...; break`` passes when the
stream ends without the event: these cannot.)

And the public signals that a subscription is in place, to wait on before
publishing instead of the hub's memory:

* SSE: the ``retry:`` block, which the server writes once the stream is
  subscribed (every SSE path subscribes, then writes it).
* gRPC: the response headers, which the server sends at the first
  ``Request`` with topics and sets those topics in the same step (nothing
  awaited in between; with a ``lastEventId`` the replay covers whatever is
  published meanwhile).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import grpc
import pytest
import trio

from tests.grpc_clients import StreamEnded

if TYPE_CHECKING:
    import ssl
    from collections.abc import AsyncIterator

    from httpx_sse import ServerSentEvent

    from tests.grpc_clients import GrpcioStream

__all__ = [
    "grpcio_subscribed",
    "next_grpc_payload",
    "next_grpclib_payload",
    "next_sse_event",
    "open_stalled_sse",
    "read_raw_until",
    "sse_subscribed",
]


# -- SSE (httpx-sse) -----------------------------------------------------------


async def next_sse_event(
    events: AsyncIterator[ServerSentEvent], *, timeout: float = 10, what: str = "an event"
) -> ServerSentEvent:
    """The next block with data that ``events`` (one ``aiter_sse()``, kept for
    the stream's life) dispatches, as a browser's EventSource would: blocks
    with only ``retry:`` are passed over (comments never reach here)."""
    with trio.move_on_after(timeout):
        async for sse in events:
            if sse.data:
                return sse
        pytest.fail(f"the SSE stream ended before {what}")
    pytest.fail(f"no SSE event within {timeout} s (waiting for {what})")


async def sse_subscribed(
    events: AsyncIterator[ServerSentEvent], *, timeout: float = 10
) -> ServerSentEvent:
    """The stream's first block, its ``retry:``: from then on, an event
    published to its topics reaches it."""
    with trio.move_on_after(timeout):
        async for sse in events:
            assert sse.retry is not None, f"the stream's first block is not its retry: {sse}"
            return sse
        pytest.fail("the SSE stream ended before its retry block (not subscribed)")
    pytest.fail(f"no retry block within {timeout} s (not subscribed)")


# -- SSE on a raw socket -------------------------------------------------------


async def read_raw_until(
    stream: trio.abc.ReceiveStream,
    marker: bytes,
    *,
    timeout: float = 10,
    seen: bytes = b"",
    limit: int = 1 << 20,
) -> bytes:
    """What ``stream`` delivers (after ``seen``) up to and including the first
    ``marker``, and whatever came with it; fails if the connection ends,
    ``timeout`` passes or ``limit`` bytes go by first."""
    buf = seen
    with trio.move_on_after(timeout):
        while marker not in buf:
            try:
                chunk = await stream.receive_some(65536)
            except trio.BrokenResourceError as exc:
                pytest.fail(f"the connection broke ({exc!r}) before {marker!r}; got {buf[-300:]!r}")
            if not chunk:
                pytest.fail(f"the connection ended before {marker!r}; got {buf[-300:]!r}")
            buf += chunk
            assert len(buf) < limit, f"{limit} bytes without {marker!r}"
        return buf
    pytest.fail(f"no {marker!r} within {timeout} s; got {buf[-300:]!r}")


async def open_stalled_sse(
    port: int,
    query: str,
    *,
    last_event_id: str = "",
    rcvbuf: int = 4096,
    tls_context: ssl.SSLContext | None = None,
) -> trio.abc.Stream:
    """An SSE client that can really stop reading: a TCP socket whose receive
    buffer is ``rcvbuf`` bytes from before it connects (the window it offers
    stays tiny), TLS over it with ``tls_context``, and ``GET /?{query}`` sent.
    Nothing is read here (a TLS handshake's own reads aside, all before the
    request): once the caller stops reading (at once, or after its warm-up
    with :func:`read_raw_until`), the server's writes pile up in the kernel
    and then in the server, as with a client that hangs."""
    sock = trio.socket.socket()
    try:
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, rcvbuf)
        await sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    stream: trio.abc.Stream = trio.SocketStream(sock)
    if tls_context is not None:
        stream = trio.SSLStream(stream, tls_context, server_hostname="localhost")
    resume = f"Last-Event-ID: {last_event_id}\r\n" if last_event_id else ""
    head = f"GET /?{query} HTTP/1.1\r\nHost: localhost\r\nAccept: text/event-stream\r\n{resume}\r\n"
    try:
        await stream.send_all(head.encode())
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream


# -- gRPC: grpcio --------------------------------------------------------------


async def next_grpc_payload(
    stream: GrpcioStream, *, timeout: float = 10, what: str = "a payload"
) -> Any:
    """The next Payload on a grpcio stream; fails when the stream ends (with
    any status) or ``timeout`` passes first."""
    with trio.move_on_after(timeout):
        try:
            return await stream.receive()
        except StreamEnded:
            pytest.fail(f"the gRPC stream ended (OK) before {what}")
        except grpc.RpcError as exc:
            pytest.fail(f"the gRPC stream ended ({exc.code()}) before {what}")
    pytest.fail(f"no gRPC payload within {timeout} s (waiting for {what})")


async def grpcio_subscribed(stream: GrpcioStream, *, timeout: float = 10) -> None:
    """Wait for the response headers that answer the stream's first Request
    with topics (send it first): from then on, events of those topics reach it."""
    call = stream.call
    with trio.move_on_after(timeout):
        await trio.to_thread.run_sync(call.initial_metadata, abandon_on_cancel=True)
        if call.done():
            pytest.fail(f"the gRPC stream ended ({call.code()}) instead of subscribing")
        return
    pytest.fail(f"no response headers within {timeout} s (not subscribed)")


# -- gRPC: grpclib (asyncio) ---------------------------------------------------


async def next_grpclib_payload(
    payloads: AsyncIterator[Any], *, timeout: float = 10, what: str = "a payload"
) -> Any:
    """The next message of a grpclib (betterproto2 stub) response stream, in
    asyncio; fails when the stream ends or ``timeout`` passes first."""
    try:
        return await asyncio.wait_for(anext(payloads), timeout)
    except StopAsyncIteration:
        pytest.fail(f"the gRPC stream ended before {what}")
    except TimeoutError:
        pytest.fail(f"no gRPC payload within {timeout} s (waiting for {what})")
