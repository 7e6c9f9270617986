"""Batches: several events handed to a subscriber in one offer, and who gets which.

:meth:`Hub.publish_many <plasma_trio.hub.Hub.publish_many>` publishes events
that arrived together (what one Redis read brought, or what arrived while a
fan-out ran) as one batch: each subscriber is offered, in one call, every
event of the batch it matches, in publish order (:func:`plan`), and its
writer writes their frames in one write. One :class:`Batch` object is shared
by every subscriber that gets exactly the same events, so their joined
frames are built once per writer kind. No I/O here.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable

    from plasma_trio.stamped import StampedEvent

__all__ = ["Batch", "plan"]

S = TypeVar("S")  # a subscriber (the hub's Subscription)


class Batch:
    """Several events in publish order, handed to a subscriber in one offer.

    One object is shared by every subscriber that receives exactly these
    events (the common case: all of a batch's events are of topics they
    share). ``wire`` holds, per writer kind, the events' frames joined, built
    once (:meth:`joined`) and written to each of them in one write.
    """

    __slots__ = ("events", "sampled", "wire")

    def __init__(self, events: list[StampedEvent]) -> None:
        self.events = events
        # The events timed for the delivery lag (see StampedEvent.t0).
        self.sampled = [event for event in events if event.t0]
        self.wire: dict[str, bytes] = {}

    def joined(self, key: str, render: Callable[[StampedEvent], bytes]) -> bytes:
        """The events' frames for the writer kind ``key``, joined (built once)."""
        data = self.wire.get(key)
        if data is None:
            data = self.wire[key] = b"".join(
                event.wire.get(key) or render(event) for event in self.events
            )
        return data

    def __len__(self) -> int:
        return len(self.events)

    def __repr__(self) -> str:
        return f"<Batch of {len(self.events)}>"


def plan(stamped: list[StampedEvent], groups: list[list[set[S]]]) -> list[tuple[S, Batch]]:
    """Who gets which of ``stamped`` (events in publish order; ``groups``:
    each one's subscriber sets, one per matching topic, a subscriber possibly
    in several): each subscriber once, with the events it matches in order,
    as one :class:`Batch` per distinct list of events, shared by the
    subscribers that get it."""
    first = groups[0]
    if all(len(g) == len(first) and all(map(operator.is_, g, first)) for g in groups):
        # The common case (events of one topic, or of topics everyone
        # shares): every target gets every event.
        if not first:
            return []
        batch = Batch(stamped)
        targets = first[0] if len(first) == 1 else set().union(*first)
        return [(sub, batch) for sub in targets]
    wanted: dict[S, list[StampedEvent]] = {}
    for event, event_groups in zip(stamped, groups, strict=True):
        seen: set[S] | None = set() if len(event_groups) > 1 else None
        for subs in event_groups:
            for sub in subs:
                if seen is not None:
                    if sub in seen:
                        continue
                    seen.add(sub)
                got = wanted.get(sub)
                if got is None:
                    wanted[sub] = [event]
                else:
                    got.append(event)
    shared: dict[tuple[int, ...], Batch] = {}
    planned = []
    for sub, got in wanted.items():
        key = tuple(event.seq for event in got)
        known = shared.get(key)
        if known is None:
            known = shared[key] = Batch(got)
        planned.append((sub, known))
    return planned
