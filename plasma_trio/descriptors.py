"""The process's open-file budget (SPEC 8, "Descriptors").

At start-up :meth:`Descriptors.claim` raises the soft ``RLIMIT_NOFILE`` to
the hard limit and counts the descriptors already open (the listeners, the
event loops, logs). Every connection a port accepts is counted while it is
open (:meth:`opened` / :meth:`closed`: the HTTP ports' acceptor, the gRPC
port's protocols); :meth:`watch` recounts what is really open now and then
(every second near the limit, every 10 s otherwise: about 7 ms at 15,000
descriptors), which also takes in Redis's connections and anything else.

Of the limit, :attr:`reserve` descriptors are kept for the server itself:
the Redis connections and their reconnects, the probes (``/livez``,
``/readyz``, ``/hc``) and the metrics port. Two marks follow:

* :attr:`streams_full`: at ``limit - reserve`` a new stream is refused at
  once (``503`` / ``UNAVAILABLE``, counted as ``descriptors``), whatever
  ``PLASMA_MAX_CONNECTIONS`` says; such a connection is answered and closed,
  so its descriptor comes back at once;
* :attr:`accept_room`: the subscriber-facing ports stop accepting at
  ``limit - reserve / 2`` (their connects wait in the listen backlog), so the
  last descriptors stay for the metrics port and Redis.

Near the limit one warning line, at most every 10 s, names the limit and how
to raise it.
"""

from __future__ import annotations

import os
import resource
import time
from typing import Final

import trio

from plasma_trio.logs import ERROR

__all__ = ["WARN_EVERY", "Descriptors"]

# At most one warning line per this many seconds.
WARN_EVERY: Final = 10.0

_log = ERROR.getChild("descriptors")


def _open_now() -> int:
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # (listdir's own descriptor)
    except OSError:  # no /proc: count what fstat finds
        return sum(1 for fd in range(resource.getrlimit(resource.RLIMIT_NOFILE)[0]) if _is_open(fd))


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def reserve_for(limit: int) -> int:
    """Descriptors kept for the server itself out of ``limit``: a twentieth,
    at least 32 and at most 1,024."""
    return min(1024, max(32, limit // 20))


class Descriptors:
    """The open-file budget of this process (see the module docstring)."""

    def __init__(self, limit: int, in_use: int, *, reserve: int | None = None) -> None:
        self.limit = limit
        self.reserve = reserve_for(limit) if reserve is None else reserve
        self.in_use = in_use
        self.raised_from: int | None = None
        self._warned_at = -WARN_EVERY
        # Woken when a descriptor is released (an acceptor waiting for room).
        self._released = trio.lowlevel.ParkingLot()

    @classmethod
    def claim(cls) -> Descriptors:
        """Raise the soft limit to the hard limit; count what is open now."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        raised_from = None
        if hard != resource.RLIM_INFINITY and soft < hard:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
                raised_from, soft = soft, hard
            except (ValueError, OSError):  # pragma: no cover (not allowed here: keep soft)
                pass
        budget = cls(int(soft) if soft != resource.RLIM_INFINITY else 1 << 20, _open_now())
        budget.raised_from = raised_from
        return budget

    # -- counting ------------------------------------------------------------

    def opened(self) -> None:
        self.in_use += 1

    def closed(self) -> None:
        self.in_use -= 1
        if self._released:
            self._released.unpark_all()

    # -- the marks -----------------------------------------------------------

    @property
    def streams_full(self) -> bool:
        """A new stream now would eat into the reserve: refuse it."""
        if self.in_use < self.limit - self.reserve:
            return False
        self.warn()
        return True

    @property
    def accept_room(self) -> bool:
        """A subscriber-facing port may accept one more connection."""
        return self.in_use < self.limit - self.reserve // 2

    async def watch(self) -> None:
        """Recount the open descriptors for ever (see the module docstring)."""
        while True:
            near = self.in_use >= self.limit // 2
            await trio.sleep(1.0 if near else 10.0)
            self.in_use = _open_now()

    async def wait_released(self) -> None:
        """Until a counted descriptor is released."""
        await self._released.park()

    def warn(self, *, exhausted: bool = False) -> None:
        """The warning line, at most once every WARN_EVERY seconds."""
        now = time.monotonic()
        if now - self._warned_at < WARN_EVERY:
            return
        self._warned_at = now
        what = "the open-file limit was reached" if exhausted else "near the open-file limit"
        _log.warning(
            f"{what}: {self.in_use} of {self.limit} descriptors in use"
            f" ({self.reserve} reserved for the server); new streams get 503 / UNAVAILABLE."
            " Raise the limit (ulimit -n, systemd LimitNOFILE=, podman/docker"
            " --ulimit nofile=N:N) or lower PLASMA_MAX_CONNECTIONS",
            extra={"limit": self.limit, "in_use": self.in_use, "reserve": self.reserve},
        )
