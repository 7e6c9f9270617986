"""grpclib's undocumented objects, as the gRPC server and its streams use them.

grpclib's documented API is the ``Server`` (``start``, ``close``,
``wait_closed``) and the handler's ``Stream`` (messages, metadata). The
gRPC path needs more: our own HTTP/2 protocol class and settings per
connection, the connection's h2 state (for the direct frame writer of
``transports/grpc_direct.py``), a request reader that refuses what grpclib
takes on faith, and a reset of a stalled stream that does not wait for flow
control. Every grpclib attribute that is private or undocumented is used
here, and only here (grpclib 0.4.9):

``grpclib.server.Server._protocol_factory`` (overridden)
    the factory ``Server.start`` hands to ``loop.create_server``: overridden in
    :class:`Server` to build our protocol class directly (``H2Protocol``'s
    ``__init__(handler, config, h2_config)``), and, with TLS, to wrap it in our
    handshake protocol.
``Server._mapping``, ``._codec``, ``._status_details_codec``, ``.__dispatch__``,
``._config``, ``._h2_config``, ``._handlers``, ``.__gc_step__`` and
``grpclib.server.Handler(mapping, codec, status_details_codec, dispatch)``
    what grpclib's own factory does with them (a request ``Handler`` per
    connection, registered so that ``close``/``wait_closed`` see it).
``Handler._tasks``
    the connection's running request handlers (:meth:`Server.idle`).
``grpclib.protocol.H2Protocol.connection``, ``.processor`` and
``EventsProcessor.streams``, ``.process``, ``.close``
    the protocol's connection and event dispatch: :func:`feed` is
    ``H2Protocol.data_received`` with two hooks (a protocol error is counted;
    the events of a read are seen first); :func:`wake_senders` wakes the
    streams waiting for a window that a WINDOW_UPDATE read directly opened.
``grpclib.protocol.Connection._connection``, ``._transport``, ``.feed``,
``.flush``, ``.write_ready``, ``.data_sent``, ``.data_send_process``
    the connection's h2 state and transport (the direct writer writes on
    them), its "socket writable" event, its sent-bytes statistics.
``grpclib.server.Stream._stream``, ``._send_initial_metadata_done``
    the handler's HTTP/2 stream (:func:`h2_stream`); whether the response
    headers went out (:func:`send_initial_metadata_once`).
``grpclib.protocol.Stream._h2_connection``, ``._transport``, ``.recv_data``,
``.connection``, ``.id``, ``.window_updated``
    a stream's h2 state (:func:`h2_stream_state`), its raw reads
    (:func:`recv_exact`), the trailers and reset of :func:`reset_with_status`.
``grpclib.protocol.Buffer.read`` raising ``AssertionError``
    how grpclib says the stream ended in the middle of a read:
    :func:`recv_exact` turns it into :class:`TruncatedMessage` (and
    :func:`check` makes sure grpclib still does so).

Our direct writer of a connection is kept beside grpclib's ``Connection``
(``transports.grpc_direct.register_writer``, found by
:func:`stream_connection`), not on it.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, TypeVar

from grpclib.config import Configuration
from grpclib.const import Cardinality, Status
from grpclib.encoding.proto import ProtoCodec
from grpclib.events import _DispatchServerEvents
from grpclib.protocol import Buffer, Connection, EventsProcessor, H2Protocol
from grpclib.protocol import Stream as H2StreamHandle
from grpclib.server import Handler, Stream
from grpclib.server import Server as _GrpclibServer
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.exceptions import H2Error, ProtocolError

from plasma_trio.seams.base import Requirement, verify

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from h2.events import Event as H2Event
    from h2.stream import H2Stream


__all__ = [
    "H2StreamHandle",
    "Server",
    "TruncatedMessage",
    "check",
    "count_sent",
    "feed",
    "goaway",
    "h2_connection",
    "h2_stream",
    "h2_stream_state",
    "recv_exact",
    "requirements",
    "reset_with_status",
    "send_initial_metadata_once",
    "stream_connection",
    "transport",
    "wake_senders",
    "write_ready",
]

P = TypeVar("P", bound=H2Protocol)


class TruncatedMessage(Exception):
    """The client ended its stream in the middle of a message."""


# -- connections ---------------------------------------------------------------


def h2_connection(connection: Connection) -> H2Connection:
    """The connection's h2 state machine."""
    return connection._connection


def transport(connection: Connection) -> asyncio.Transport:
    """The connection's transport."""
    return connection._transport


def write_ready(connection: Connection) -> asyncio.Event:
    """Set while asyncio has not paused the connection (its socket buffer is
    below the high-water mark)."""
    return connection.write_ready


def count_sent(connection: Connection, size: int) -> None:
    """``size`` bytes of DATA written on the connection (grpclib's statistics)."""
    connection.data_sent += size
    connection.data_send_process()


def goaway(connection: Connection) -> None:
    """Send GOAWAY on the connection (it is done; the client hangs up when it has read all)."""
    connection._connection.close_connection()
    connection.flush()


def stream_connection(stream: Stream[Any, Any]) -> Connection:
    """The connection of a handler's stream (the direct writer of our server's
    connections is found by it: ``grpc_direct.writer_of``)."""
    return stream._stream.connection


# -- protocols -----------------------------------------------------------------


def feed(
    protocol: H2Protocol,
    data: bytes,
    on_protocol_error: Callable[[ProtocolError], object],
    on_events: Callable[[list[H2Event]], object],
) -> None:
    """``H2Protocol.data_received`` (grpclib 0.4.9), with ``on_protocol_error``
    told of an HTTP/2 protocol error before grpclib closes the connection,
    and ``on_events`` shown the read's events before they are processed."""
    connection = protocol.connection
    try:
        events = connection.feed(data)
    except ProtocolError as exc:
        on_protocol_error(exc)
        protocol.processor.close("Protocol error")
        return
    on_events(events)
    connection.flush()
    for event in events:
        protocol.processor.process(event)
    connection.flush()


def wake_senders(protocol: H2Protocol, everyone: bool, stream_ids: Iterable[int]) -> None:
    """Wake the streams waiting in grpclib's send for a window that a
    WINDOW_UPDATE opened: all of the connection's (``everyone``), or those of
    ``stream_ids``."""
    streams = protocol.processor.streams
    if everyone:
        for stream in streams.values():
            stream.window_updated.set()
    for stream_id in stream_ids:
        waiting = streams.get(stream_id)
        if waiting is not None:
            waiting.window_updated.set()


class Server(_GrpclibServer):
    """grpclib's ``Server``, whose connections are made by :meth:`accept`
    (instead of grpclib's fixed ``H2Protocol``), with :meth:`idle`."""

    def new_protocol(self, protocol_class: type[P]) -> P:
        """A connection's protocol of ``protocol_class``, as grpclib's
        factory builds its own (with its request handler, registered)."""
        self.__gc_step__()
        handler = Handler(self._mapping, self._codec, self._status_details_codec, self.__dispatch__)
        self._handlers.add(handler)
        return protocol_class(handler, self._config, self._h2_config)

    def accept(self) -> asyncio.BaseProtocol:
        """The protocol of a connection just accepted (override)."""
        return self.new_protocol(H2Protocol)

    def _protocol_factory(self) -> asyncio.BaseProtocol:  # type: ignore[override]
        # (asyncio's create_server takes any protocol; grpclib only passes it on.)
        return self.accept()

    def idle(self) -> bool:
        """No request handler is still running (trailers included)."""
        return all(task.done() for handler in self._handlers for task in handler._tasks.values())


# -- streams -------------------------------------------------------------------


def h2_stream(stream: Stream[Any, Any]) -> H2StreamHandle:
    """The handler stream's HTTP/2 stream (grpclib's)."""
    return stream._stream


async def send_initial_metadata_once(stream: Stream[Any, Any]) -> None:
    """Send the response headers unless they went out already."""
    if not stream._send_initial_metadata_done:
        await stream.send_initial_metadata()


def h2_stream_state(handle: H2StreamHandle) -> H2Stream | None:
    """h2's state of the stream (``None`` once h2 has forgotten it)."""
    if handle.id is None:
        return None
    return handle._h2_connection.streams.get(handle.id)


async def recv_exact(handle: H2StreamHandle, size: int) -> bytes:
    """``size`` bytes of the stream's DATA, or ``b""`` at its end (before any
    byte of them); :class:`TruncatedMessage` when it ends in between."""
    try:
        return await handle.recv_data(size)
    except AssertionError:  # grpclib's Buffer.read: "Received less data than expected"
        raise TruncatedMessage from None


def reset_with_status(
    stream: Stream[Any, Any],
    status: Status,
    message: str,
    *,
    flush: Callable[[], None] | None = None,
) -> None:
    """End the stream now with ``status``: trailers (HEADERS are not flow
    controlled) then RST_STREAM, as grpclib ends a stream with an error,
    after ``flush`` (the frames our direct writer holds for the connection,
    other streams', go first). When the
    connection itself cannot write (its socket buffer is full), it is
    aborted instead. A stream that ended meanwhile is left alone."""
    handle = stream._stream
    connection = handle.connection
    stream_id = handle.id
    assert stream_id is not None  # a request's stream has its id
    try:
        if connection.write_ready.is_set():
            if flush is not None:
                flush()
            h2 = handle._h2_connection
            try:
                h2.send_headers(
                    stream_id,
                    [("grpc-status", str(status.value)), ("grpc-message", message)],
                    end_stream=True,
                )
                state = h2.streams.get(stream_id)
                if state is not None and not state.closed:
                    # (A client that half-closed its side is closed by the
                    # trailers already: nothing to reset.)
                    h2.reset_stream(stream_id)
            finally:
                handle._transport.write(h2.data_to_send())
        else:
            handle._transport.abort()
    except H2Error:
        pass  # the stream has ended meanwhile


# -- check ---------------------------------------------------------------------


class _Transport(asyncio.Transport):
    """A transport that goes nowhere (the samples below)."""

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def write(self, data: Any) -> None:
        pass

    def is_closing(self) -> bool:
        return False


def _connection() -> Connection:
    h2 = H2Connection(H2Configuration(client_side=False, header_encoding="ascii"))
    return Connection(h2, _Transport(), config=Configuration().__for_server__())


def _handle() -> H2StreamHandle:
    connection = _connection()
    return H2StreamHandle(connection, h2_connection(connection), _Transport(), stream_id=1)


def _stream() -> Stream[Any, Any]:
    return Stream(
        _handle(),
        "/plasma.Check/Check",
        Cardinality.STREAM_STREAM,
        bytes,
        bytes,
        codec=ProtoCodec(),
        status_details_codec=None,
        dispatch=_DispatchServerEvents(),
    )


def _processor() -> EventsProcessor:
    return EventsProcessor(None, _connection())  # type: ignore[arg-type]


def _short_read_asserts() -> str | None:
    """grpclib's Buffer.read still raises AssertionError on a stream that
    ends in the middle of a read (what :func:`recv_exact` relies on)."""
    buffer = Buffer(lambda size: None)
    buffer.add(b"ab", 2)
    buffer.eof()
    read = buffer.read(5)
    try:
        read.send(None)  # (nothing to wait for: it all is in the buffer)
    except AssertionError:
        return None
    except BaseException as exc:
        outcome = repr(exc)
    else:
        outcome = "it waited"
    finally:
        read.close()
    return f"grpclib.protocol.Buffer.read no longer asserts on a short read ({outcome})"


def requirements() -> list[Requirement]:
    """What this module relies on (see the module docstring)."""
    return [
        Requirement(_GrpclibServer, "_protocol_factory"),
        Requirement(_GrpclibServer, "__gc_step__"),
        Requirement(_GrpclibServer, "start", params=("sock", "backlog")),
        *(
            Requirement(_GrpclibServer, name, assigned_in="__init__")
            for name in (
                "_mapping",
                "_codec",
                "_status_details_codec",
                "_config",
                "_h2_config",
                "_handlers",
                "__dispatch__",
            )
        ),
        Requirement(
            Handler, "__init__", params=("mapping", "codec", "status_details_codec", "dispatch")
        ),
        Requirement(Handler, "_tasks", assigned_in="__init__"),
        Requirement(H2Protocol, "__init__", params=("handler", "config", "h2_config")),
        Requirement(H2Protocol, "connection", assigned_in="connection_made"),
        Requirement(H2Protocol, "processor", assigned_in="connection_made"),
        Requirement(EventsProcessor, "streams", _processor),
        Requirement(EventsProcessor, "process"),
        Requirement(EventsProcessor, "close"),
        *(
            Requirement(Connection, name, _connection)
            for name in (
                "_connection",
                "_transport",
                "feed",
                "flush",
                "write_ready",
                "data_sent",
                "data_send_process",
            )
        ),
        Requirement(Stream, "_stream", _stream),
        Requirement(Stream, "_send_initial_metadata_done", _stream),
        Requirement(Stream, "send_initial_metadata"),
        *(
            Requirement(H2StreamHandle, name, _handle)
            for name in (
                "_h2_connection",
                "_transport",
                "recv_data",
                "connection",
                "id",
                "window_updated",
            )
        ),
    ]


def check() -> None:
    """Raise :class:`~plasma_trio.seams.SeamBroken` if grpclib lacks any of it."""
    verify("grpclib", requirements(), [_short_read_asserts])
