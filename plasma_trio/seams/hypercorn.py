"""Hypercorn's internals, as the front door (``transports/frontdoor.py``) uses them.

Hypercorn's documented API runs a server from its own listeners
(``hypercorn.trio.serve``). The front door owns every connection instead
(the SSE fast path, the bound on connections waiting for a head, closing
stuck connections at shutdown), and hands the others, with the bytes it has
read, to Hypercorn's per-connection server. What it touches (Hypercorn 0.18.0):

``hypercorn.trio.tcp_server.TCPServer(app, config, context, state, stream)``
    the per-connection server, subclassed by :class:`TCPServer`: its
    ``_read_data`` (the client closed: it no longer waits for a head),
    ``_initiate_server_close`` (the idle timeout, or shutdown) and
    ``protocol_send`` (an ``Updated`` event: idle between requests or not)
    are overridden to call the hooks; ``TCPServer.protocol`` (set in ``run``)
    and ``ProtocolWrapper.protocol``: the connection's HTTP/1.1 or HTTP/2
    protocol.
``hypercorn.trio.worker_context.WorkerContext(None)``,
``hypercorn.trio.lifespan.Lifespan``, ``hypercorn.typing.ConnectionState``,
``hypercorn.utils.wrap_app``
    what Hypercorn's worker builds around an app: re-exported from here.
``hypercorn.protocol.h2.H2Protocol.streams`` (each ``HTTPStream.scope``),
``.stream_buffers`` (``StreamBuffer.buffer``, ``.drain``, ``.close``),
``.connection`` (h2's ``H2Connection``), ``._close_stream``, ``._flush``
    an SSE response on HTTP/2 finds its stream (:func:`h2_stream_of`), waits
    while Hypercorn holds too much of it unsent (:func:`wait_sent`: Hypercorn
    buffers without bound while the client's window is closed), and is
    reset when its client stops reading (:func:`reset_stream`, as if the
    client had reset it, then :func:`flush`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from h2.errors import ErrorCodes
from h2.exceptions import H2Error
from hypercorn.config import Config
from hypercorn.events import Updated
from hypercorn.protocol import ProtocolWrapper
from hypercorn.protocol.h2 import H2Protocol, StreamBuffer
from hypercorn.protocol.http_stream import HTTPStream
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer as _TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import wrap_app

from plasma_trio.seams.base import Requirement, verify

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

__all__ = [
    "ConnectionState",
    "H2Protocol",
    "Lifespan",
    "TCPServer",
    "WorkerContext",
    "check",
    "flush",
    "h2_stream_of",
    "requirements",
    "reset_stream",
    "wait_sent",
    "wrap_app",
]


class TCPServer(_TCPServer):
    """Hypercorn's connection server, telling its owner (the hooks below)
    when reading ends, when the server closes the connection, and when the
    connection goes idle (between requests) or busy."""

    def read_ended(self) -> None:
        """The client closed, or the connection broke (override)."""

    def closing(self) -> None:
        """Hypercorn's idle timeout, or shutdown, is closing the connection (override)."""

    def idle_changed(self, idle: bool) -> None:
        """Between requests (``idle``) or not (override)."""

    async def _read_data(self) -> None:
        await super()._read_data()
        self.read_ended()

    async def _initiate_server_close(self) -> None:
        self.closing()
        await super()._initiate_server_close()

    async def protocol_send(self, event: Any) -> None:
        if isinstance(event, Updated):
            self.idle_changed(event.idle)
        await super().protocol_send(event)


def h2_stream_of(server: _TCPServer, scope: dict[str, Any]) -> tuple[Any, int | None]:
    """The connection's protocol, and the id of the HTTP/2 stream whose
    request ``scope`` is (``None`` on HTTP/1.1, or once the stream is gone)."""
    protocol = getattr(getattr(server, "protocol", None), "protocol", None)
    if isinstance(protocol, H2Protocol):
        for stream_id, http_stream in protocol.streams.items():
            if getattr(http_stream, "scope", None) is scope:
                return protocol, stream_id
    return protocol, None


async def wait_sent(protocol: H2Protocol, stream_id: int, limit: int) -> None:
    """Return once Hypercorn holds at most ``limit`` unsent bytes of the stream
    (waiting until its buffer is empty, or closed, when it holds more)."""
    buffer = protocol.stream_buffers.get(stream_id)
    if buffer is not None and len(buffer.buffer) > limit:
        await buffer.drain()


async def reset_stream(protocol: H2Protocol, stream_id: int) -> bool:
    """Reset the stream (CANCEL) as if the client had: the app is told to
    disconnect, a parked write wakes up. ``False`` if it had ended already.
    The RST_STREAM goes out with the next :func:`flush`."""
    try:
        protocol.connection.reset_stream(stream_id, error_code=ErrorCodes.CANCEL)
    except H2Error:
        return False
    await protocol._close_stream(stream_id)
    buffer = protocol.stream_buffers.get(stream_id)
    if buffer is not None:
        await buffer.close()
    return True


async def flush(protocol: H2Protocol) -> None:
    """Write what h2 has queued on the connection."""
    await protocol._flush()


async def _nothing(_: object) -> None:
    pass


def _h2_protocol() -> H2Protocol:
    return H2Protocol(
        None,  # type: ignore[arg-type]
        Config(),
        WorkerContext(None),
        None,  # type: ignore[arg-type]
        ConnectionState({}),
        False,
        None,
        None,
        _nothing,
    )


def _wrapper() -> ProtocolWrapper:
    send: Callable[[Any], Awaitable[None]] = _nothing
    return ProtocolWrapper(
        None,  # type: ignore[arg-type]
        Config(),
        WorkerContext(None),
        None,  # type: ignore[arg-type]
        ConnectionState({}),
        False,
        None,
        None,
        send,
        "h2",
    )


def requirements() -> list[Requirement]:
    """What this module relies on (see the module docstring)."""
    return [
        Requirement(_TCPServer, "__init__", params=("app", "config", "context", "state", "stream")),
        Requirement(_TCPServer, "_read_data"),
        Requirement(_TCPServer, "_initiate_server_close"),
        Requirement(_TCPServer, "protocol_send"),
        Requirement(_TCPServer, "protocol", assigned_in="run"),
        Requirement(ProtocolWrapper, "protocol", _wrapper),
        Requirement(WorkerContext, "terminated", lambda: WorkerContext(None)),
        Requirement(Lifespan, "__init__", params=("app", "config", "state")),
        Requirement(Lifespan, "handle_lifespan"),
        Requirement(Lifespan, "wait_for_startup"),
        Requirement(Lifespan, "wait_for_shutdown"),
        Requirement(Updated, "idle", lambda: Updated(idle=True)),
        Requirement(H2Protocol, "streams", _h2_protocol),
        Requirement(H2Protocol, "stream_buffers", _h2_protocol),
        Requirement(H2Protocol, "connection", _h2_protocol),
        Requirement(H2Protocol, "_close_stream"),
        Requirement(H2Protocol, "_flush"),
        Requirement(HTTPStream, "scope", assigned_in="__init__"),
        Requirement(StreamBuffer, "buffer", lambda: StreamBuffer(WorkerContext.event_class)),
        Requirement(StreamBuffer, "drain"),
        Requirement(StreamBuffer, "close"),
    ]


def check() -> None:
    """Raise :class:`~plasma_trio.seams.SeamBroken` if Hypercorn lacks any of it."""
    verify("Hypercorn", requirements())
