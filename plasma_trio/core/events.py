"""Events: the JSON wire form, its validation, and the stamped event the hub fans out.

Wire form (Redis message body, HTTP publish body), as plasma defined it::

    {"meta": {"type": "<event type>"}, "data": <any JSON value>}

Invariants:

* ``parse`` never raises for any input bytes: it returns an :class:`Event` or
  an :class:`InvalidEvent` naming the reason.
* ``Event.data`` holds the ``data`` member's JSON text exactly as published
  (``None`` when the member is absent), so gRPC can deliver it verbatim and
  SSE can deliver it compacted, without a decode/encode round trip that would
  change numbers or escapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

__all__ = [
    "DEFAULT_MAX_EVENT_BYTES",
    "Event",
    "InvalidEvent",
    "make_event",
    "parse",
]

DEFAULT_MAX_EVENT_BYTES = 1 << 20

_MISSING = msgspec.Raw(b"")


class _Meta(msgspec.Struct):
    type: str


class _Wire(msgspec.Struct):
    meta: _Meta
    data: msgspec.Raw = _MISSING


_decoder = msgspec.json.Decoder(_Wire)


@dataclass(frozen=True, slots=True)
class Event:
    """A validated event.

    Attributes:
        type: the non-empty ``meta.type``, e.g. ``program:1234:views``.
        data: the ``data`` member's JSON text as published, or ``None`` when
            the message had no ``data``.
    """

    type: str
    data: bytes | None = None

    def to_wire(self) -> bytes:
        """The compact wire form: ``{"meta":{"type":...},"data":...}``."""
        return (
            b'{"meta":{"type":'
            + msgspec.json.encode(self.type)
            + b'},"data":'
            + self.compact_data()
            + b"}"
        )

    def compact_data(self) -> bytes:
        """``data`` as one line of compact JSON (``null`` when absent)."""
        if self.data is None:
            return b"null"
        return msgspec.json.format(self.data, indent=-1)


@dataclass(frozen=True, slots=True)
class InvalidEvent:
    """Why a message was rejected. Returned, not raised, by :func:`parse`."""

    reason: str


def parse(
    body: bytes | bytearray | memoryview | str, max_bytes: int = DEFAULT_MAX_EVENT_BYTES
) -> Event | InvalidEvent:
    """Validate one wire-form message.

    Rejects (returning :class:`InvalidEvent`): a body over ``max_bytes``
    (``max_bytes <= 0`` disables the check), anything that is not a JSON
    object, an object without a string ``meta.type``, and an empty type.
    """
    raw = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else bytes(body)
    if max_bytes > 0 and len(raw) > max_bytes:
        return InvalidEvent(f"event of {len(raw)} bytes exceeds the limit of {max_bytes} bytes")
    try:
        wire = _decoder.decode(raw)
    except msgspec.ValidationError as exc:
        return InvalidEvent(f"not a plasma event: {_describe(exc)}")
    except msgspec.DecodeError as exc:
        return InvalidEvent(f"not valid JSON: {exc}")
    except RecursionError:
        return InvalidEvent("JSON nested too deeply")
    if not wire.meta.type:
        return InvalidEvent("meta.type is empty")
    data = bytes(wire.data)
    return Event(type=wire.meta.type, data=data or None)


def make_event(event_type: str, data_json: str | bytes | None) -> Event | InvalidEvent:
    """Build an event from a type and the JSON text of its data (publisher side)."""
    if not event_type:
        return InvalidEvent("meta.type is empty")
    if data_json is None:
        return Event(type=event_type)
    raw = data_json.encode() if isinstance(data_json, str) else data_json
    try:
        msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        return InvalidEvent(f"data is not valid JSON: {exc}")
    except RecursionError:
        return InvalidEvent("data is nested too deeply")
    return Event(type=event_type, data=raw.strip())


def _describe(exc: msgspec.ValidationError) -> str:
    text = str(exc)
    # msgspec says e.g. "Expected `object`, got `array`" or
    # "Object missing required field `type` - at `$.meta`".
    return text.replace("`$`", "the message").replace("$.", "")
