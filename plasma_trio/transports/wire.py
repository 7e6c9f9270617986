"""Each transport's wire encoding of an event, built once per event and shared.

The hub hands every subscriber the same :class:`~plasma_trio.hub.StampedEvent`;
the first transport writer that needs an encoding builds it and keeps it in
the event's ``wire`` cache, so that an event to 10,000 subscribers is
encoded once per format, not once per subscriber:

* ``sse``: the SSE frame (``id:``/``data:`` lines), for Hypercorn's responses;
* ``chunk``: that frame as one HTTP/1.1 chunk, the fast path's bytes;
* ``grpc``: the serialised ``Payload`` message.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from plasma_trio._proto.proto import EventType, Payload
from plasma_trio.core.sse import encode_event

if TYPE_CHECKING:
    from plasma_trio.hub import StampedEvent

__all__ = ["CHUNK", "chunk", "grpc_payload", "sse_chunk", "sse_frame"]

SSE: Final = "sse"
CHUNK: Final = "chunk"
GRPC: Final = "grpc"


def chunk(data: bytes) -> bytes:
    """``data`` as one HTTP/1.1 chunk."""
    return b"%x\r\n%b\r\n" % (len(data), data)


def sse_frame(event: StampedEvent) -> bytes:
    """The event's SSE frame."""
    frame = event.wire.get(SSE)
    if frame is None:
        frame = event.wire[SSE] = encode_event(event.id, event.event)
    return frame


def sse_chunk(event: StampedEvent) -> bytes:
    """The event's SSE frame as one HTTP/1.1 chunk."""
    data = event.wire.get(CHUNK)
    if data is None:
        data = event.wire[CHUNK] = chunk(sse_frame(event))
    return data


def grpc_payload(event: StampedEvent) -> bytes:
    """The event's ``Payload``, serialised (``data`` as JSON text, empty when missing)."""
    data = event.wire.get(GRPC)
    if data is None:
        raw = event.event.data
        data = event.wire[GRPC] = bytes(
            Payload(
                event_type=EventType(type=event.event.type),
                data=raw.decode("utf-8", "replace") if raw is not None else "",
                id=event.id,
            )
        )
    return data
