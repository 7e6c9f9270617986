"""Each transport's wire encoding of an event, built once per event and shared.

The hub hands every subscriber the same :class:`~plasma_trio.hub.StampedEvent`;
the first transport writer that needs an encoding builds it and keeps it in
the event's ``wire`` cache, so that an event to 10,000 subscribers is
encoded once per format, not once per subscriber:

* ``sse``: the SSE frame (``id:``/``data:`` lines), for Hypercorn's responses;
* ``chunk``: that frame as one HTTP/1.1 chunk, the fast path's bytes;

and each transport's status of a stream, for the access log.
* ``grpc``: the serialised ``Payload`` message;
* ``grpc-message``: that message length-prefixed as gRPC sends it, and
  ``grpc-head``, the first 5 bytes of its HTTP/2 DATA frame header (length,
  type, flags: the gRPC fast path adds each stream's id).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from plasma_trio._proto.proto import EventType, Payload
from plasma_trio.core.sse import HEARTBEAT, encode_event, gap_frame

if TYPE_CHECKING:
    from plasma_trio.hub import StampedEvent
    from plasma_trio.replay import Gap
    from plasma_trio.session import Ending, Refused

__all__ = [
    "CHUNK",
    "HEARTBEAT_CHUNK",
    "HTTP_REFUSAL",
    "LAST_CHUNK",
    "REASONS",
    "GRPC_HEAD",
    "GRPC_MESSAGE",
    "chunk",
    "gap_chunk",
    "grpc_message",
    "grpc_payload",
    "http1_refusal",
    "sse_chunk",
    "sse_frame",
    "sse_response_head",
    "sse_status",
]

SSE: Final = "sse"
CHUNK: Final = "chunk"
GRPC: Final = "grpc"
GRPC_MESSAGE: Final = "grpc-message"
GRPC_HEAD: Final = "grpc-head"


def chunk(data: bytes) -> bytes:
    """``data`` as one HTTP/1.1 chunk."""
    return b"%x\r\n%b\r\n" % (len(data), data)


def sse_frame(event: StampedEvent) -> bytes:
    """The event's SSE frame."""
    frame = event.wire.get(SSE)
    if frame is None:
        frame = event.wire[SSE] = encode_event(event.id, event.event)
    return frame


def gap_chunk(gap: Gap) -> bytes:
    """The gap notice's SSE frame as one HTTP/1.1 chunk."""
    return chunk(gap_frame(gap.requested, gap.oldest))


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


def grpc_message(event: StampedEvent) -> bytes:
    """The event's ``Payload`` as a gRPC message: not compressed, 4-byte length, bytes.

    Also caches ``grpc-head``, the DATA frame header's first 5 bytes for it.
    """
    data = event.wire.get(GRPC_MESSAGE)
    if data is None:
        payload = grpc_payload(event)
        data = event.wire[GRPC_MESSAGE] = b"\x00" + len(payload).to_bytes(4, "big") + payload
        event.wire[GRPC_HEAD] = min(len(data), 0xFFFFFF).to_bytes(3, "big") + b"\x00\x00"
    return data


# A refused SSE request's HTTP status, by refusal kind (SPEC 2, 10), and
# the reason phrase its body starts with (the same on both SSE paths).
HTTP_REFUSAL: Final = {"invalid": 400, "unauthenticated": 401, "forbidden": 403, "unavailable": 503}
REASONS: Final = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    503: "Service Unavailable",
}


def sse_status(ending: Ending, refused: Refused | None) -> int:
    """An SSE stream's HTTP status in the access log (both SSE paths)."""
    return HTTP_REFUSAL[refused.kind] if refused is not None else 200


# The fast path's HTTP/1.1 bytes besides events.
LAST_CHUNK: Final = b"0\r\n\r\n"
HEARTBEAT_CHUNK: Final = chunk(HEARTBEAT)


def http1_refusal(refused: Refused) -> bytes:
    """A whole refusal response (the connection closes after it), as the
    Quart app answers it."""
    status = HTTP_REFUSAL[refused.kind]
    body = f"{REASONS[status]}: {refused.message}\n".encode()
    extra = b'www-authenticate: Bearer realm="plasma"\r\n' if status == 401 else b""
    head = (
        f"HTTP/1.1 {status} {REASONS[status]}\r\n".encode()
        + b"content-type: text/plain; charset=utf-8\r\n"
        + extra
        + b"connection: close\r\ncontent-length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
    )
    return head + body


def sse_response_head(origin: str) -> bytes:
    """The fast path's status line and headers, the same as the Quart path sends."""
    lines = [
        b"HTTP/1.1 200 OK",
        b"content-type: text/event-stream",
        b"cache-control: no-cache",
        b"x-accel-buffering: no",
    ]
    if origin:
        lines.append(b"access-control-allow-origin: " + origin.encode("latin-1"))
    lines.append(b"transfer-encoding: chunked")
    return b"\r\n".join(lines) + b"\r\n\r\n"
