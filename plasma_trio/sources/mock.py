"""The ``mock`` source (plasma's default): demo events on a timer.

Every ``PLASMA_SUBSCRIBER_MOCK_INTERVAL`` it publishes one event, cycling
through the types ``poll``, ``program`` and ``other`` with a small JSON
object as data, so ``plasma-trio serve`` shows live events with nothing else
running. Events posted to ``/debug`` or ``/publish`` go straight into the
hub, which makes this mode a usable single-node broker.
"""

from __future__ import annotations

import itertools
import time
from typing import TYPE_CHECKING

import msgspec
import trio

from plasma_trio.core.events import Event

if TYPE_CHECKING:
    from plasma_trio.hub import Hub

__all__ = ["MOCK_TYPES", "MockSource"]

MOCK_TYPES = ("poll", "program", "other")


class MockSource:
    def __init__(self, interval: float) -> None:
        self.interval = interval

    async def run(
        self, hub: Hub, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        for n in itertools.count(1):
            await trio.sleep(self.interval)
            event_type = MOCK_TYPES[(n - 1) % len(MOCK_TYPES)]
            data = msgspec.json.encode({"n": n, "time": time.time_ns() // 1_000_000})
            await hub.publish(Event(type=event_type, data=data))

    async def healthy(self) -> bool:
        return True

    async def publish(self, hub: Hub, event: Event) -> str:
        return (await hub.publish(event)).id
