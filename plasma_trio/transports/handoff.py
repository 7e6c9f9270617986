"""What a connection handed to Hypercorn is served by, and what its SSE responses may ask.

The front door (:mod:`plasma_trio.transports.frontdoor`) hands every
request the fast path does not take to Hypercorn's per-connection server,
through the Hypercorn seam: :class:`HandoffServer` tells the front door when
the connection stops waiting for its first head, and :class:`Control` is
what an SSE response served there (:mod:`~plasma_trio.transports.sse_hypercorn`)
uses to see and end a stall of its client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from plasma_trio.seams import hypercorn as hypercorn_seam
from plasma_trio.seams.hypercorn import TCPServer

if TYPE_CHECKING:
    from collections.abc import Callable

    import trio

__all__ = ["Control", "HandoffServer", "Releaser"]


class Releaser(Protocol):
    """The front door's side: end a stalled response now."""

    def release(self, sock: trio.socket.SocketType, protocol: Any, stream_id: int | None) -> None:
        """Close the connection, or reset the HTTP/2 stream ``stream_id``."""
        ...


class HandoffServer(TCPServer):
    """Hypercorn's connection server, remembering whether it is between
    requests, and telling the front door when the connection stops waiting
    for its first request head: the head is in, the client left, or
    Hypercorn's idle timeout (the header timeout) closes it first."""

    idle = True
    # Set by the front door while the connection waits for its first head:
    # called once, with True when the idle timeout ended the wait.
    on_waited: Callable[[bool], object] | None = None

    def _waited(self, *, late: bool) -> None:
        if self.on_waited is not None:
            on_waited, self.on_waited = self.on_waited, None
            on_waited(late)

    def read_ended(self) -> None:
        # The client closed (or the connection broke): Hypercorn's task
        # still waits for its idle timer, but the client is no longer waiting.
        self._waited(late=False)

    def closing(self) -> None:
        # Hypercorn's idle timeout, or shutdown (the front door tells them apart).
        self._waited(late=True)

    def idle_changed(self, idle: bool) -> None:
        self.idle = idle
        if not idle:
            self._waited(late=False)


class Control:
    """What an SSE response on the Quart path may ask of its connection
    (see :class:`plasma_trio.transports.http.ConnectionControl`)."""

    def __init__(self, door: Releaser, sock: trio.socket.SocketType, server: HandoffServer) -> None:
        self._door = door
        self._sock = sock
        self._server = server

    async def wait_sent(self, scope: dict[str, Any], limit: int) -> None:
        """Return once Hypercorn holds at most ``limit`` unsent bytes of the response.

        HTTP/2 only: Hypercorn 0.18's stream buffer takes every write while
        the client's flow-control window is closed (an empty read with a zero
        window un-pauses the writer), so without this an SSE response to a
        client that stopped reading would grow without bound. HTTP/1.1
        writes block by themselves.
        """
        protocol, stream_id = hypercorn_seam.h2_stream_of(self._server, scope)
        if stream_id is None:
            return
        await hypercorn_seam.wait_sent(protocol, stream_id, limit)

    def release(self, scope: dict[str, Any]) -> None:
        protocol, stream_id = hypercorn_seam.h2_stream_of(self._server, scope)
        self._door.release(self._sock, protocol, stream_id)
