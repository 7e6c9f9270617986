"""Redis stream entry ids and the positions built from them (pure).

With the ``redis-streams`` source an event's id says where it is in the
streams (SPEC 4): with one key, the entry id ``<ms>-<n>``; with several keys,
the *position*: the comma-joined last entry id read on each key, in the order
of ``PLASMA_SUBSCRIBER_REDIS_STREAMS`` (``0-0`` for a key with nothing read
yet), so that a client resuming from it continues every key.

An entry id is kept as the tuple ``(ms, n)``, which orders like Redis does.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "ZERO",
    "EntryId",
    "Position",
    "format_entry",
    "format_position",
    "parse_entry",
    "parse_position",
]

EntryId = tuple[int, int]
Position = tuple[EntryId, ...]

ZERO: Final[EntryId] = (0, 0)
_MAX: Final = (1 << 64) - 1  # Redis ids are two unsigned 64-bit numbers


def parse_entry(text: str | bytes) -> EntryId | None:
    """``"<ms>-<n>"`` -> ``(ms, n)``; ``None`` when it is not a full entry id."""
    if isinstance(text, bytes):
        try:
            text = text.decode("ascii")
        except UnicodeDecodeError:
            return None
    ms, sep, n = text.strip().partition("-")
    if not (sep and ms.isascii() and ms.isdigit() and n.isascii() and n.isdigit()):
        return None
    entry = int(ms), int(n)
    if entry[0] > _MAX or entry[1] > _MAX:
        return None
    return entry


def format_entry(entry: EntryId) -> str:
    return f"{entry[0]}-{entry[1]}"


def parse_position(text: str, keys: int) -> Position | None:
    """A client's last id -> one entry id per key; ``None`` when it is not a
    position of ``keys`` keys (another mode's id, a wrong count, garbage)."""
    parts = text.split(",")
    if len(parts) != keys:
        return None
    position: list[EntryId] = []
    for part in parts:
        entry = parse_entry(part)
        if entry is None:
            return None
        position.append(entry)
    return tuple(position)


def format_position(position: Position) -> str:
    return ",".join(format_entry(entry) for entry in position)
