"""h2's undocumented state, as the gRPC fast path (``transports/grpc_direct.py``) uses it.

h2's documented API sends frames through ``H2Connection`` methods
(``send_data`` and the like); the fast path writes DATA frames itself (one
write per connection per event for every stream of it) and answers a read
made only of PINGs and WINDOW_UPDATEs without h2's general path, so it keeps
h2's own accounting exact by hand. What it touches (h2 4.4.1):

``H2Connection.outbound_flow_control_window`` (read, charged, opened)
    the connection's send window: charged for every DATA frame written
    directly, opened by a WINDOW_UPDATE read directly, as h2's ``send_data``
    and WINDOW_UPDATE handling would.
``H2Stream.outbound_flow_control_window`` (read, charged, opened)
    the same for one stream.
``H2Stream.state_machine.state`` (``h2.stream.StreamState``)
    a DATA frame may go only on an OPEN or HALF_CLOSED_REMOTE stream.
``H2Connection.state_machine.state`` (``h2.connection.ConnectionState``)
    no fast read on a CLOSED connection.
``H2Connection.streams``
    the stream states by id (a WINDOW_UPDATE's stream; a gRPC stream's state).
``H2Connection.incoming_buffer._preamble_len``, ``._data``, ``._headers_buffer``
    (``h2.frame_buffer.FrameBuffer``): a read is answered directly only when
    h2's inbound buffer holds nothing (no preamble still expected, no partial
    frame, no header block in progress).

:func:`check` verifies all of it; a missing name stops the server's start
(there is no slow-path fallback: an h2 that names these otherwise is a
version this code has not been checked against).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from h2.config import H2Configuration
from h2.connection import ConnectionState, H2Connection
from h2.frame_buffer import FrameBuffer
from h2.stream import H2Stream, H2StreamStateMachine, StreamState

from plasma_trio.seams.base import Requirement, verify

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = [
    "check",
    "connection_closed",
    "connection_window",
    "inbound_idle",
    "open_windows",
    "requirements",
    "stream_sendable",
    "stream_window",
    "streams",
    "take",
]

_SENDABLE: Final = frozenset({StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE})


def take(h2: H2Connection, stream: H2Stream, size: int, largest: int) -> int:
    """Charge both send windows for one DATA frame of as much of ``size``
    bytes as they, the stream's state and ``largest`` allow; how many were
    charged (0: nothing may go now)."""
    connection_window = h2.outbound_flow_control_window
    stream_window = stream.outbound_flow_control_window
    if size > largest or size > connection_window or size > stream_window:
        # (Comparisons first: on every delivery's path, a whole message fits.)
        size = min(size, largest, connection_window, stream_window)
    if size <= 0 or stream.state_machine.state not in _SENDABLE:
        return 0
    h2.outbound_flow_control_window = connection_window - size
    stream.outbound_flow_control_window = stream_window - size
    return size


def connection_window(h2: H2Connection) -> int:
    """The connection's send window."""
    return h2.outbound_flow_control_window


def stream_window(stream: H2Stream) -> int:
    """A stream's send window."""
    return stream.outbound_flow_control_window


def stream_sendable(stream: H2Stream) -> bool:
    """Whether DATA may be sent on ``stream`` (OPEN or HALF_CLOSED_REMOTE)."""
    return stream.state_machine.state in _SENDABLE


def connection_closed(h2: H2Connection) -> bool:
    """Whether h2's connection state machine is CLOSED."""
    return h2.state_machine.state is ConnectionState.CLOSED


def streams(h2: H2Connection) -> Mapping[int, H2Stream]:
    """h2's stream states by id."""
    return h2.streams


def inbound_idle(h2: H2Connection) -> bool:
    """h2's inbound buffer holds nothing: no preamble still expected, no
    partial frame, no header block in progress."""
    buffer = h2.incoming_buffer
    return not (buffer._preamble_len or buffer._data or buffer._headers_buffer)


def open_windows(
    h2: H2Connection, connection_increment: int, stream_increments: Mapping[int, int]
) -> None:
    """Open the send windows as h2's own WINDOW_UPDATE handling would."""
    h2.outbound_flow_control_window += connection_increment
    states = h2.streams
    for stream_id, increment in stream_increments.items():
        states[stream_id].outbound_flow_control_window += increment


def _connection() -> H2Connection:
    return H2Connection(H2Configuration(client_side=False))


def _stream() -> H2Stream:
    return H2Stream(1, H2Configuration(client_side=False), 65535, 65535)


def requirements() -> list[Requirement]:
    """What this module relies on (see the module docstring)."""
    return [
        Requirement(H2Connection, "outbound_flow_control_window", _connection),
        Requirement(H2Connection, "streams", _connection),
        Requirement(H2Connection, "state_machine", _connection),
        Requirement(H2Connection, "incoming_buffer", _connection),
        Requirement(FrameBuffer, "_preamble_len", lambda: FrameBuffer(server=True)),
        Requirement(FrameBuffer, "_data", lambda: FrameBuffer(server=True)),
        Requirement(FrameBuffer, "_headers_buffer", lambda: FrameBuffer(server=True)),
        Requirement(H2Stream, "outbound_flow_control_window", _stream),
        Requirement(H2Stream, "state_machine", _stream),
        Requirement(H2StreamStateMachine, "state", lambda: H2StreamStateMachine(1)),
        Requirement(StreamState, "OPEN"),
        Requirement(StreamState, "HALF_CLOSED_REMOTE"),
        Requirement(ConnectionState, "CLOSED"),
    ]


def check() -> None:
    """Raise :class:`~plasma_trio.seams.SeamBroken` if h2 lacks any of it."""
    verify("h2", requirements())
