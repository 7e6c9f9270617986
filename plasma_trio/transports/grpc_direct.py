"""The gRPC fast path: the hub's fan-out writes DATA frames straight to each connection.

Theory of operation
-------------------
grpclib stays the gRPC server: it accepts connections, runs the handlers,
health and reflection, sends headers, trailers and GOAWAY, and keeps each
connection's ``h2`` state machine. What it does per message is the cost of
a fan-out, though: ``Stream.send_message`` runs in the stream's own asyncio
task (one wake-up per stream per event), goes through h2's frame objects and
stream state machine (~16 us per stream-message measured here) and issues
its own ``transport.write``. For 200 streams of one topic that is 200 task
wake-ups, 200 trips through h2 and 200 writes per event.

Here, instead, every message of a stream (live events from the hub's
fan-out, synchronously; replays, gap notices) goes through its
:class:`~plasma_trio.transports.grpc_writer.GrpcWriter`, the session's
writer, whose ``write_nowait`` hands the message (length-prefixed, encoded
once per event: :func:`~plasma_trio.transports.wire.grpc_message`) to its
connection's :class:`ConnectionWriter`, which (:meth:`ConnectionWriter.send`)

1. checks what may go now: the connection is writable (asyncio has not
   paused it: its socket buffer is below the high-water mark), the stream
   is open for sending, and how much both outbound flow-control windows
   allow, the connection's and the stream's, in DATA frames of at most
   16 KiB (the smallest ``SETTINGS_MAX_FRAME_SIZE`` a peer may set);
2. charges both windows in h2's own attributes
   (``H2Connection.outbound_flow_control_window`` and
   ``H2Stream.outbound_flow_control_window``, which h2's ``send_data``
   decrements and its WINDOW_UPDATE and SETTINGS handling increment), so
   h2's accounting stays exact for grpclib's own sends (through
   :mod:`plasma_trio.seams.h2`, where every h2 attribute used here is listed
   and checked at start-up);
3. appends the 9-byte DATA frame header (built by hand: length, type 0,
   no flags, stream id) and the shared message bytes (or the part of them
   the windows allow) to the connection's list of parts.

After each slice of the fan-out (``Hub.publish`` calls its flushers) the
:class:`FrameBatch` joins every touched connection's parts and writes them
with one ``transport.write``: one write per connection per event, whatever
the number of its streams (parts over :data:`FLUSH_AT` bytes are written at
once, so that a long replay meets the socket's back-pressure as it goes).
Nothing else writes to a connection during a slice (the slice runs without
a checkpoint, and grpclib's callbacks only run between slices); a cut-off in
the slice flushes the connection's parts before its trailers
(:meth:`ConnectionWriter.flush`), and anything h2 has queued goes before our
frames, so frames on a connection stay in order.

What may not go now waits in the session's outbox
(:class:`~plasma_trio.outbox.Outbox`, bounded like every queue), and the
stream waits with its connection:

* when the *connection* cannot take more (its window is spent, or asyncio
  paused it because its socket buffer is over the high-water mark), the
  stream joins the connection's line (:attr:`ConnectionWriter.waiting`),
  and while anyone waits there, new frames of every stream of that
  connection queue behind (first come, first served);
* when only the *stream's* window is spent (or a message was cut at its
  edge), the stream is parked (:attr:`ConnectionWriter.parked`) and holds
  up no other stream.

When the client opens a window (a WINDOW_UPDATE) or the socket drains
(``resume_writing``), :meth:`ConnectionWriter.drain` writes what the waiting
streams hold, in turns of :data:`DRAIN_QUANTUM` frames, in one write, from
the protocol callback itself: no task is woken (the stream's task is woken
only once all it held is written). This matters: a gRPC client's connection
window is often 64 KiB, a few events' worth for 50 streams, and a client
that pauses for a moment (a GC) spends it; with a per-stream catch-up (one
task wake-up and grpclib send per stream per event) the server fell into a
regime it could not leave, and cut off whole connections at a fifth of the
rate it holds now. A grant smaller than the next message takes part of it,
so a client granting little at a time is never stuck.

The bounds and the write deadline of the subscriber session apply
throughout: a client that keeps reading is never cut off, one that stops is
released after ``PLASMA_SUBSCRIBER_WRITE_TIMEOUT``.

Inbound, a receiving gRPC client answers many reads with a PING (grpc-go's
bandwidth estimator) and a WINDOW_UPDATE. With one stream per connection
that is one inbound read per delivered message; :func:`parse_control`
recognises a read made only of such frames and :func:`apply_control` does
what h2 would (windows charged, PINGs acknowledged: property-tested
against h2 itself), without h2's frame objects and events; anything else,
errors included, goes to h2.

Where the time goes (py-spy, 200 samples/s for 8 s, 200 streams of one
topic, 50 per connection, server on one core near saturation; the share of
samples; before = the previous design, a grpclib ``send_message`` per stream
per event from each stream's task):

=====================================================  ===========  ==========
                                                       before       after
                                                       (50,000/s)   (500,000/s)
=====================================================  ===========  ==========
grpclib ``send_message`` and h2's ``send_data``         38%          --
stream tasks (queue wake-ups, task steps)               26%          --
trio and trio-asyncio scheduling, other                 24%          27%
the offer, frames, windows (``offer``, ``send``)        7%           41%
the hub's fan-out (matching, slicing)                   3%           10%
connection writes (``flush``, ``transport.write``)      --           10%
the Redis source                                        2%           6%
inbound HTTP/2 (PING, WINDOW_UPDATE)                    --           1%
idle (epoll)                                            1%           5%
=====================================================  ===========  ==========

So before, two thirds of a saturated core went to grpclib's per-stream send
path and to waking one task per stream per event; after, the largest share
is the offer itself (41%), the whole server costs ~1.9 us of CPU per
delivery at 500,000/s, and the same core carries ten times the deliveries.

The figures (one core, the Go ``grpc_load`` client on the other core) are
in ``bench/RESULTS.md``.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections import deque
from typing import TYPE_CHECKING, Final, Protocol

from plasma_trio.seams import grpclib as grpclib_seam
from plasma_trio.seams import h2 as h2_seam

if TYPE_CHECKING:
    from collections.abc import Callable

    from grpclib.protocol import Connection
    from h2.connection import H2Connection
    from h2.stream import H2Stream

__all__ = [
    "ACK_DELAY",
    "DONE",
    "DRAIN_QUANTUM",
    "MAX_FRAME",
    "MORE",
    "STUCK",
    "Backlogged",
    "ConnectionWriter",
    "Control",
    "FrameBatch",
    "apply_control",
    "parse_control",
]

# The largest DATA frame written directly: the minimum SETTINGS_MAX_FRAME_SIZE
# (RFC 9113 6.5.2), so the peer's setting needs no look-up.
MAX_FRAME: Final = 16_384

# What a waiting stream's turn did (Backlogged.drain_turn).
DONE: Final = 0  # all it held is written: it leaves the line
MORE: Final = 1  # it wrote, and more waits
STUCK: Final = 2  # it wrote nothing (its own window, or its state)

# Bytes of frames gathered before they are written without waiting for the
# end of the slice: a long replay goes out as it is made, and the socket's
# back-pressure (asyncio pausing the connection) applies to it.
FLUSH_AT: Final = 64 * 1024

# How long a PING ACK may wait for the connection's next write, at most
# (RFC 9113 6.7 asks for a prompt answer, not an immediate one). A receiving
# gRPC client PINGs after reads (grpc-go's bandwidth estimator, one PING in
# flight): answered with the next frames, the ACK costs no write of its own.
# One timer for all connections sweeps what waited (a timer per connection
# and PING cost more than the writes saved).
ACK_DELAY: Final = 0.05

# Frames a waiting stream writes per turn when its connection drains: few,
# so that every stream of a busy connection moves at every grant.
DRAIN_QUANTUM: Final = 8


# A DATA frame header's length field, by length (the lengths seen so far).
_LENGTHS: dict[int, bytes] = {}


def _length(size: int) -> bytes:
    field = _LENGTHS[size] = size.to_bytes(3, "big")
    return field


class Backlogged(Protocol):
    """A stream waiting for its connection (``GrpcWriter``)."""

    def drain_turn(self, limit: int) -> int:
        """Write up to ``limit`` frames of what waits: :data:`DONE`,
        :data:`MORE` or :data:`STUCK`."""
        ...

    def progress(self, now: float) -> None:
        """Its connection is moving: the write deadline counts from ``now``."""
        ...

    def park(self) -> None:
        """It leaves the line to wait for its own window."""
        ...


class FrameBatch:
    """The connections with frames waiting for the end of the fan-out slice,
    and those with PING ACKs waiting for their next write (swept every
    :data:`ACK_DELAY` by one timer for them all)."""

    __slots__ = ("deferred", "dirty", "sweeping")

    def __init__(self) -> None:
        self.dirty: list[ConnectionWriter] = []
        self.deferred: set[ConnectionWriter] = set()
        self.sweeping = False

    def defer(self, writer: ConnectionWriter) -> None:
        """``writer`` holds control frames until its next write, or the sweep."""
        self.deferred.add(writer)
        if not self.sweeping:
            self.sweeping = True
            asyncio.get_running_loop().call_later(ACK_DELAY, self._sweep)

    def _sweep(self) -> None:
        deferred, self.deferred = self.deferred, set()
        self.sweeping = False
        for writer in deferred:
            writer.send_deferred()

    def flush(self) -> None:
        """Write every waiting connection's frames, one write per connection."""
        dirty = self.dirty
        if dirty:
            self.dirty = []
            for writer in dirty:
                writer.flush()


class ConnectionWriter:
    """The direct DATA-frame writes of one HTTP/2 connection (see the module doc)."""

    __slots__ = (
        "_batch",
        "_connection",
        "_deferred",
        "_on_error",
        "_parts",
        "_size",
        "h2",
        "parked",
        "transport",
        "waiting",
        "write_ready",
    )

    def __init__(
        self,
        batch: FrameBatch,
        connection: Connection,
        h2: H2Connection,
        transport: asyncio.Transport,
        on_error: Callable[[BaseException], None],
    ) -> None:
        self._batch = batch
        self._connection = connection
        self._on_error = on_error
        self._parts: list[bytes | memoryview] = []
        self._size = 0  # bytes in _parts
        # Control frames (PING ACKs) waiting for the next write (at most
        # until the batch's next sweep).
        self._deferred = b""
        self.h2 = h2
        self.transport = transport
        self.write_ready = grpclib_seam.write_ready(connection)
        # Streams whose frames wait for this connection (its window or its
        # socket), first come first served: while any waits, new frames of
        # every stream queue behind them.
        self.waiting: deque[Backlogged] = deque()
        # Streams whose frames wait for their own window (or a message
        # being cut at the window's edge): they hold up no other stream.
        self.parked: dict[Backlogged, None] = {}

    @property
    def pending(self) -> bool:
        """Streams wait: call :meth:`drain` when the connection may have moved."""
        return bool(self.waiting or self.parked)

    def blocked(self) -> bool:
        """The connection itself takes nothing now (its window, or its socket)."""
        return not self.write_ready.is_set() or h2_seam.connection_window(self.h2) <= 0

    def send(self, stream: H2Stream, tail: bytes, data: bytes | memoryview) -> int:
        """Queue DATA frames of as much of ``data`` as may go now for this
        slice's write; how many bytes (0: none may go now).

        ``tail`` is the DATA frame header's last 6 bytes (RFC 9113 4.1, 6.1):
        type 0, no flags, the stream's id. Both send windows are charged in
        h2's own state (the h2 seam), frames are at most :data:`MAX_FRAME`.
        """
        if not self.write_ready.is_set():
            return 0
        size = len(data)
        h2 = self.h2
        taken = h2_seam.take(h2, stream, size, MAX_FRAME)
        if not taken:
            return 0
        parts = self._parts
        if not parts:
            self._batch.dirty.append(self)
        parts.append((_LENGTHS.get(taken) or _length(taken)) + tail)
        if taken == size:
            parts.append(data)
            self._size += taken
            if self._size >= FLUSH_AT:
                self.flush()
            return taken
        view = memoryview(data)
        parts.append(view[:taken])
        while taken < size:
            more = h2_seam.take(h2, stream, size - taken, MAX_FRAME)
            if not more:
                break
            parts.append((_LENGTHS.get(more) or _length(more)) + tail)
            parts.append(view[taken : taken + more])
            taken += more
        self._size += taken
        if self._size >= FLUSH_AT:
            self.flush()
        return taken

    def drain(self) -> None:
        """The connection can write again (a WINDOW_UPDATE, or its socket
        buffer drained): the waiting streams write what they hold, in turns
        of :data:`DRAIN_QUANTUM` frames, all in one write, until the
        connection blocks again (or every stream waits for its own window).
        A stream whose turn ends goes to the back of the line; while the
        connection moves, no waiting stream's write deadline runs (a client
        that reads is never cut off for its connection's other streams)."""
        waiting = self.waiting
        parts = self._parts
        before = len(parts)
        stuck = 0
        while waiting and stuck < len(waiting):
            if self.blocked():
                break
            turn = waiting[0].drain_turn(DRAIN_QUANTUM)
            if turn == DONE:
                waiting.popleft()
                stuck = 0
            elif turn == STUCK and not self.blocked():
                # It waits for its own window: out of the line (others go on).
                stream = waiting.popleft()
                stream.park()
                self.parked[stream] = None
            else:
                waiting.rotate(-1)
                stuck = stuck + 1 if turn == STUCK else 0
        parked = self.parked
        moved = not waiting
        while moved and parked:
            moved = False  # (turns in rounds, while any stream moves)
            for stream in list(parked):
                if self.blocked():
                    break
                if stream in parked:
                    turn = stream.drain_turn(DRAIN_QUANTUM)
                    if turn == DONE:
                        parked.pop(stream, None)
                    moved = moved or turn != STUCK
        if len(parts) > before:
            now = time.monotonic()
            for stream in waiting:
                stream.progress(now)
        self.flush()

    def write(self, data: bytes) -> None:
        """Write ``data`` (control frames) after everything queued before it."""
        self.flush()
        self._write(data)

    def defer(self, data: bytes) -> None:
        """Control frames that may wait for the connection's next write
        (PING ACKs): sent with it, or after :data:`ACK_DELAY` if none comes."""
        if not self._deferred:
            self._batch.defer(self)
        self._deferred += data

    def send_deferred(self) -> None:
        """Write the deferred control frames now (the sweep)."""
        if self._deferred:
            data, self._deferred = self._deferred, b""
            self._write(data)

    def flush(self) -> None:
        """Write the frames queued so far (after anything h2 itself has
        queued, and the control frames deferred)."""
        parts = self._parts
        if not parts:
            return
        data = b"".join(parts)
        parts.clear()
        self._size = 0
        deferred = self._deferred
        if deferred:
            self._deferred = b""  # (the sweep finds nothing left to send)
        if self._write(deferred + data if deferred else data):
            grpclib_seam.count_sent(self._connection, len(data))

    def _write(self, data: bytes) -> bool:
        """One ``transport.write`` of what h2 has queued, then ``data``;
        ``False`` when the connection is gone or broke (this one only)."""
        transport = self.transport
        if transport.is_closing():
            return False  # the connection is gone; its handlers are being cancelled
        try:
            queued = self.h2.data_to_send()
            transport.write(queued + data if queued else data)
        except Exception as exc:  # a broken transport: this connection only
            self._on_error(exc)
            transport.abort()
            return False
        return True


# -- inbound: the control frames a receiving gRPC client sends ----------------

_PING: Final = 0x6
_WINDOW_UPDATE: Final = 0x8
_MAX_WINDOW: Final = 2**31 - 1
_PING_ACK_HEADER: Final = b"\x00\x00\x08\x06\x01\x00\x00\x00\x00"


class Control:
    """What a read made only of PINGs and WINDOW_UPDATEs asks for."""

    __slots__ = ("connection_increment", "pings", "stream_increments")

    def __init__(self) -> None:
        self.pings: list[bytes] = []
        self.connection_increment = 0
        self.stream_increments: dict[int, int] = {}

    def ping_acks(self) -> bytes:
        """The PING ACK frames to send back (RFC 9113 6.7), in order."""
        return b"".join(_PING_ACK_HEADER + opaque for opaque in self.pings)


def parse_control(h2: H2Connection, data: bytes) -> Control | None:
    """``data`` as a :class:`Control`, if it is nothing but whole, valid PING
    (not ACK) and WINDOW_UPDATE frames on an open connection and its open
    streams, with no window overflowing; otherwise ``None``, and h2 handles
    the read as usual (including every error case).

    A gRPC client receiving a stream of messages answers many of its reads
    with exactly this (grpc-go: a BDP PING and a WINDOW_UPDATE per read). With
    one stream per connection that is one inbound read per message: through
    h2's general path (frame objects, state machines, events, grpclib's
    dispatch) it cost ~70 us each here, more than the message itself.
    :func:`apply_control` does what h2 would: charge the windows and ACK
    the PINGs.
    """
    if not data or h2_seam.connection_closed(h2) or not h2_seam.inbound_idle(h2):
        return None
    control = Control()
    size = len(data)
    at = 0
    streams = h2_seam.streams(h2)
    while at < size:
        if at + 9 > size:
            return None
        length = int.from_bytes(data[at : at + 3], "big")
        kind = data[at + 3]
        flags = data[at + 4]
        stream_id = int.from_bytes(data[at + 5 : at + 9], "big") & 0x7FFFFFFF
        end = at + 9 + length
        if end > size or flags:
            return None
        if kind == _PING and length == 8 and not stream_id:
            control.pings.append(data[at + 9 : end])
        elif kind == _WINDOW_UPDATE and length == 4:
            increment = int.from_bytes(data[at + 9 : end], "big")
            if not 0 < increment <= _MAX_WINDOW:
                return None  # zero, or the reserved bit set: h2's to judge
            if not stream_id:
                control.connection_increment += increment
            else:
                stream = streams.get(stream_id)
                if stream is None or not h2_seam.stream_sendable(stream):
                    return None
                increments = control.stream_increments
                increments[stream_id] = increments.get(stream_id, 0) + increment
        else:
            return None
        at = end
    if h2_seam.connection_window(h2) + control.connection_increment > _MAX_WINDOW:
        return None
    for stream_id, increment in control.stream_increments.items():
        if h2_seam.stream_window(streams[stream_id]) + increment > _MAX_WINDOW:
            return None
    return control


def apply_control(h2: H2Connection, control: Control) -> None:
    """Open the windows as h2's own WINDOW_UPDATE handling would."""
    h2_seam.open_windows(h2, control.connection_increment, control.stream_increments)


# Our server's connections and their direct writers (composition: grpclib's
# Connection is left as it is; see grpc_server._Protocol).
_writers: weakref.WeakKeyDictionary[Connection, ConnectionWriter] = weakref.WeakKeyDictionary()


def register_writer(connection: Connection, writer: ConnectionWriter) -> None:
    """``writer`` writes the direct frames of ``connection``."""
    _writers[connection] = writer


def writer_of(connection: Connection) -> ConnectionWriter | None:
    """The direct writer of ``connection``; ``None`` when it is not one of
    our server's (then grpclib's own path only)."""
    return _writers.get(connection)
