"""A gRPC stream's protocol pieces, free of the stream's life: its Requests as
read off the wire, its metadata, its statuses, and the gap notice's Payload.

:func:`requests` reads a stream's Requests as grpclib's ``recv_message``
does, but refusing what grpclib would take on faith (SPEC 10).
"""

from __future__ import annotations

import json
import struct
from typing import TYPE_CHECKING, Any, Final

from grpclib.const import Status
from grpclib.exceptions import GRPCError

from plasma_trio._proto.proto import EventType, Payload, Request
from plasma_trio.seams.grpclib import TruncatedMessage, h2_stream, recv_exact
from plasma_trio.session import Ending

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from grpclib.server import Stream

    from plasma_trio.session import Gap, Refused

__all__ = ["GAP_TYPE", "GRPC_STATUS", "gap_payload", "grpc_status", "metadata", "requests"]

GAP_TYPE: Final = "plasma-gap"


def gap_payload(gap: Gap) -> bytes:
    """The gap notice as a ``Payload`` (SPEC 3): type ``plasma-gap``, no id."""
    data = json.dumps({"requested": gap.requested, "oldest": gap.oldest}, separators=(",", ":"))
    return bytes(Payload(event_type=EventType(type=GAP_TYPE), data=data, id=""))


GRPC_STATUS: Final = {
    "invalid": Status.INVALID_ARGUMENT,
    "unavailable": Status.UNAVAILABLE,
    "unauthenticated": Status.UNAUTHENTICATED,
    "forbidden": Status.PERMISSION_DENIED,
}
_ENDING_STATUS: Final = {
    Ending.CUT_OFF: Status.RESOURCE_EXHAUSTED,
    Ending.TOKEN_EXPIRED: Status.UNAUTHENTICATED,
    Ending.CLIENT_CLOSED: Status.CANCELLED,
    Ending.SHUTDOWN_DEADLINE: Status.CANCELLED,
}


def grpc_status(ending: Ending, refused: Refused | None) -> str:
    """A stream's gRPC status name in the access log."""
    if refused is not None:
        return GRPC_STATUS[refused.kind].name
    return _ENDING_STATUS.get(ending, Status.OK).name


async def requests(stream: Stream[Request, Any], limit: int) -> AsyncIterator[Request]:
    """The stream's Requests, read as grpclib's ``recv_message`` does but
    refusing what it would take on faith (SPEC 10): a length prefix over
    ``limit`` (grpclib would buffer up to 4 GiB, acknowledging as it goes), a
    compressed message (no encoding is negotiated), a message cut short by
    the client's END_STREAM, bytes that are not a Request."""
    handle = h2_stream(stream)
    while True:
        try:
            meta = await recv_exact(handle, 5)
        except TruncatedMessage:  # fewer than 5 bytes before END_STREAM
            raise GRPCError(Status.INVALID_ARGUMENT, "truncated message") from None
        if not meta:
            return
        compressed, length = struct.unpack(">BI", meta)
        if compressed:
            raise GRPCError(Status.UNIMPLEMENTED, "compressed requests are not supported")
        if length > limit:
            raise GRPCError(
                Status.RESOURCE_EXHAUSTED, f"a Request of {length} bytes (at most {limit})"
            )
        try:
            body = await recv_exact(handle, length) if length else b""
        except TruncatedMessage:  # the stream ended before the message did
            raise GRPCError(Status.INVALID_ARGUMENT, "truncated message") from None
        try:
            request = Request.parse(body)
        except Exception:  # betterproto2 raises several kinds on garbage
            raise GRPCError(Status.INVALID_ARGUMENT, "not a Request message") from None
        yield request


def metadata(stream: Stream[Request, Any], name: str) -> str | None:
    """A request metadata value (the first), as text."""
    value = stream.metadata.get(name) if stream.metadata is not None else None
    if isinstance(value, bytes):
        return value.decode("latin-1")
    return value if isinstance(value, str) else None
