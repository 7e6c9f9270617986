"""Server-Sent Events framing and the request-side decisions of SSE.

Byte-compatible with plasma: the stream starts with ``retry: <ms>``; each
event is ``id: <id>``, ``data: <json>``, blank line, where ``<json>`` is
``{"meta":{"type":"<E>"},"data":<D>}`` on one line. Compact JSON never holds
a raw CR or LF (JSON escapes them inside strings), so one ``data:`` line is
always a complete, correct frame.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from plasma_trio.core.events import Event

__all__ = [
    "HEARTBEAT",
    "accepts_event_stream",
    "encode_event",
    "encode_retry",
    "gap_frame",
]

HEARTBEAT = b":heartbeat\n\n"


def encode_event(event_id: str, event: Event) -> bytes:
    """One event frame. ``event_id`` must not contain CR, LF or NUL."""
    return b"id: " + event_id.encode("ascii") + b"\ndata: " + event.to_wire() + b"\n\n"


def gap_frame(requested: str | None, oldest: str | None) -> bytes:
    """The named ``plasma-gap`` event; no ``id:`` line, so the client's last id stays."""
    data = json.dumps({"requested": requested, "oldest": oldest}, separators=(",", ":"))
    return b"event: plasma-gap\ndata: " + data.encode() + b"\n\n"


def encode_retry(retry_ms: int) -> bytes:
    """The stream's first block: the client's reconnection delay."""
    return b"retry: " + str(retry_ms).encode("ascii") + b"\n\n"


def accepts_event_stream(accept: str | None) -> bool:
    """True when an ``Accept`` header lists ``text/event-stream`` with q > 0.

    Only an explicit ``text/event-stream`` counts (``*/*`` does not), so that
    browsers' page loads and ``curl`` without the header reach the other
    endpoints, as with plasma. Parameters other than ``q`` are ignored;
    media types compare case-insensitively; a malformed ``q`` counts as 1,
    as lenient parsers do.
    """
    if not accept:
        return False
    for item in accept.split(","):
        media, *params = item.split(";")
        if media.strip().lower() != "text/event-stream":
            continue
        quality = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value.strip())
                except ValueError:
                    quality = 1.0
        if quality > 0:
            return True
    return False
