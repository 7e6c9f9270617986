"""The one task that watches every session: write deadlines, token expiry, heartbeats.

Each session reports since when its writer's bytes wait for the client
(``stalled_since``); one over ``PLASMA_SUBSCRIBER_WRITE_TIMEOUT`` is cut off,
which releases its connection at once. A session whose token expired is
ended. An SSE session idle for ``PLASMA_SSE_HEARTBEAT_INTERVAL`` gets a
heartbeat. One pass for all of them, on a coarse clock, so that the write
path never reads the time.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Protocol, cast

import trio

if TYPE_CHECKING:
    from plasma_trio.hub import Hub

__all__ = ["HeartbeatClock", "heartbeat_due", "watch_subscribers"]


class HeartbeatClock(Protocol):
    """What the heartbeat clock reads (see :func:`heartbeat_due`)."""

    wrote: bool
    idle_since: float
    stalled_since: float | None


def heartbeat_due(clock: HeartbeatClock, now: float, interval: float) -> bool:
    """True when ``clock``'s stream has been sent nothing for ``interval``.

    Called every fraction of the interval with a coarse clock, so that the
    write path never reads the time: a write only sets ``wrote``. A stream
    whose writes wait (``stalled_since``) is not idle.
    """
    if clock.wrote or clock.stalled_since is not None:
        clock.wrote = False
        clock.idle_since = now
        return False
    return now - clock.idle_since >= interval


async def watch_subscribers(hub: Hub, write_timeout: float, heartbeat_interval: float) -> None:
    """Every session's write deadline, token expiry and SSE heartbeat, in one pass.

    A session stalled (:meth:`~plasma_trio.session.Session.stall`) for ``write_timeout`` is cut
    off, which releases its connection at once; one whose token expired is
    ended (:meth:`Hub.expire`); an SSE session idle for
    ``heartbeat_interval`` gets a heartbeat. The pass runs every quarter of
    the shorter of the two (at most every second), so a stalled client is
    released within 1.25 x ``write_timeout`` and heartbeats come every
    1-1.25 intervals of silence.
    """
    step = min(1.0, write_timeout / 4, heartbeat_interval / 4)
    while True:
        await trio.sleep(step)
        now = time.monotonic()
        for sub in hub.subscriptions():
            sink = sub.sink
            since = sink.stalled_since
            if sub.expires_at is not None and now >= sub.expires_at:
                hub.expire(sub)  # its token's exp: the stream ends
            elif since is not None and now - since >= write_timeout:
                hub.cut_off(sub)
            elif sink.heartbeats and heartbeat_due(
                cast("HeartbeatClock", sink), now, heartbeat_interval
            ):
                sink.heartbeat()
