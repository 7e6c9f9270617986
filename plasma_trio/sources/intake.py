"""Adaptive batching for a source that hands over one event at a time.

The Redis pub/sub source receives messages one by one: coredis parses what
one read of the socket brought, then hands the messages over one per turn
of the event loop (each ``get_message`` is a checkpoint). Published straight
to the hub, every event would be one fan-out, one write per subscriber.

An :class:`Intake` sits between the source and the hub: the source
:meth:`~Intake.put` s each event (never blocking), and the intake's task
(:meth:`~Intake.run`) publishes what arrived as one batch
(:meth:`Hub.publish_many <plasma_trio.hub.Hub.publish_many>`), which every
subscriber gets in one write. It waits for nothing but the event loop
itself, never for a timer:

* once woken by an event, it gives the source more turns of the loop as
  long as they bring more events (what was already read or parsed arrives
  that way, one per turn), until :data:`QUIET_TURNS` turns in a row bring
  none, at most :data:`BATCH_EVENTS` events or :data:`BATCH_BYTES` bytes
  of data;
* a lone event goes out after those turns (microseconds when the server
  is idle): at low rates nothing waits for more;
* events that arrive while a fan-out runs are the next batch: the busier
  the server, the larger the batches, and the cheaper each delivery.

Order is kept: batches are published one after the other, in arrival
order. A source that must announce a loss after its events (a resubscribe)
waits for :meth:`~Intake.drained` first. Beyond :data:`PENDING` events the
source waits for room (:meth:`~Intake.room`): Redis keeps the rest.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Final

import trio

if TYPE_CHECKING:
    from plasma_trio.core.events import Event
    from plasma_trio.hub import Hub

__all__ = ["BATCH_BYTES", "BATCH_EVENTS", "PENDING", "QUIET_TURNS", "Intake"]

# One batch holds at most this many events, and this many bytes of their
# data (past the event that crosses it).
BATCH_EVENTS: Final = 256
BATCH_BYTES: Final = 256 * 1024

# Turns of the event loop in a row that bring no event before a batch goes.
QUIET_TURNS: Final = 2

# Events waiting for the fan-out before the source waits for room.
PENDING: Final = 10_000


class Intake:
    """A source's events on their way to the hub, in batches (see the module doc)."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self._pending: deque[Event] = deque()
        self._arrived = trio.lowlevel.ParkingLot()  # the fan-out waits for events
        self._moved = trio.lowlevel.ParkingLot()  # the source waits for room, or drained
        self._publishing = False

    def put(self, event: Event) -> None:
        """Hand over one event (never blocks; see :meth:`room`)."""
        self._pending.append(event)
        if self._arrived:
            self._arrived.unpark()

    @property
    def full(self) -> bool:
        return len(self._pending) >= PENDING

    async def room(self) -> None:
        """Return once fewer than :data:`PENDING` events wait."""
        while self.full:
            await self._moved.park()

    async def drained(self) -> None:
        """Return once every event handed over is published."""
        while self._pending or self._publishing:
            await self._moved.park()

    async def run(self) -> None:
        """Publish what arrives, in batches, until cancelled."""
        pending = self._pending
        while True:
            if not pending:
                await self._arrived.park()
                continue
            # Give the source turns while they bring more events: until two
            # turns in a row bring none (trio runs a turn's tasks in a random
            # order, so one turn may pass between two of the source's steps).
            quiet = 0
            while quiet < QUIET_TURNS and len(pending) < BATCH_EVENTS:
                before = len(pending)
                await trio.lowlevel.checkpoint()
                quiet = quiet + 1 if len(pending) == before else 0
            batch = [pending.popleft()]
            size = _size(batch[0])
            while pending and len(batch) < BATCH_EVENTS and size < BATCH_BYTES:
                event = pending.popleft()
                batch.append(event)
                size += _size(event)
            self._publishing = True
            try:
                await self.hub.publish_many(batch)
            finally:
                self._publishing = False
                self._moved.unpark_all()


def _size(event: Event) -> int:
    data = event.data
    return len(data) if data is not None else 0
