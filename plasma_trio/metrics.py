"""The figures behind the metrics endpoints and reporters (SPEC 6).

Pure functions from snapshots to plain dicts, so the JSON endpoints, the
log/syslog reporters and the Prometheus collector all report the same
numbers under the same meaning:

* ``connections`` / ``connections_sse`` / ``connections_grpc``: open streams.
* ``events_received``: valid events the hub published (from the source or HTTP).
* ``events_delivered`` (and per transport): event copies queued to subscribers.
* ``events_dropped``: copies not delivered because their subscriber was cut off.
* ``events_invalid``: messages rejected as not plasma events (never delivered).
* ``events_delivered`` (and per transport): event copies written to
  subscribers' sockets; ``events_queued``: copies handed to their queues.
* ``delivery_lag_*``: sampled time from the hub receiving an event to its
  write to a subscriber's socket (p50/p99 are bucket bounds);
  ``subscriber_queue_depth_*``: events waiting per subscriber, now.
* ``subscribers_cut_off`` (and per transport): slow subscribers cut off.
* ``redis_connected``: the Redis source's connection state (``null`` in mock mode).
* ``connection_errors`` (and ``_client`` / ``_internal``): connections whose
  failure was contained to them (see :mod:`plasma_trio.transports.guard`):
  client misbehaviour (resets, protocol errors) or an internal error.
* ``connections_dropped_head_timeout`` / ``_head_limit``: connections (all
  ports) dropped before completing their request head: late, or the slowest
  of 1,024 waiting, dropped to make room once it has waited 5 s for its
  client (SPEC 8, 10).

``runtime_figures`` is the counterpart of plasma's ``/metrics/go``: the
interpreter, the platform, live trio tasks, threads, memory and the garbage
collector's counts and pause times (measured by :class:`GcPauses`).
"""

from __future__ import annotations

import gc
import os
import platform
import resource
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from plasma_trio.tasks import live_task_count

if TYPE_CHECKING:
    from collections.abc import Mapping

    from plasma_trio.hub import Hub, HubStatistics
    from plasma_trio.sources import Source
    from plasma_trio.transports.guard import ConnectionGuard

__all__ = [
    "GC_PAUSES",
    "Figures",
    "GcPauses",
    "plasma_figures",
    "redis_state",
    "runtime_figures",
]


def redis_state(source: Source) -> bool | None:
    """The Redis source's connection state; ``None`` for sources without Redis."""
    connected = getattr(source, "connected", None)
    return connected if isinstance(connected, bool) else None


class Figures:
    """Where every report reads the server's figures: the metrics port's JSON
    and Prometheus endpoints and the log/syslog reporters, so that all say
    the same thing under the same name."""

    def __init__(self, hub: Hub, source: Source, guard: ConnectionGuard) -> None:
        self.hub = hub
        self.source = source
        self.guard = guard
        self.started_at = time.monotonic()

    def plasma(self) -> dict[str, Any]:
        """``/metrics/plasma``."""
        figures = plasma_figures(
            self.hub.statistics(),
            redis_connected=redis_state(self.source),
            connection_errors=self.guard.statistics(),
            connection_drops=self.guard.drops(),
            now_ns=time.time_ns(),
        )
        lag = self.hub.deliveries.lag
        depths = self.hub.queue_depths()
        figures.update(
            {
                # Sampled (one event in lag.SAMPLE), source receipt to socket write.
                "delivery_lag_samples": lag.count,
                "delivery_lag_p50_s": lag.quantile(0.5),
                "delivery_lag_p99_s": lag.quantile(0.99),
                "subscriber_queue_depth_max": max(depths, default=0),
                "subscriber_queue_depth_total": sum(depths),
            }
        )
        return figures

    def runtime(self) -> dict[str, Any]:
        """``/metrics/python``."""
        return runtime_figures(
            trio_tasks=live_task_count(), started_at=self.started_at, now=time.monotonic()
        )


def plasma_figures(
    stats: HubStatistics,
    *,
    redis_connected: bool | None,
    connection_errors: Mapping[tuple[str, str], int],
    connection_drops: Mapping[tuple[str, str], int],
    now_ns: int,
) -> dict[str, Any]:
    """``/metrics/plasma``: plasma's fields first, then ours."""
    by_kind = {"client": 0, "internal": 0}
    for (_port, kind), count in connection_errors.items():
        by_kind[kind] += count
    drops = {"head_timeout": 0, "head_limit": 0}
    for (_port, reason), count in connection_drops.items():
        drops[reason] += count
    return {
        "time": now_ns,
        "connections": stats.connections_total,
        "connections_sse": stats.connections["sse"],
        "connections_grpc": stats.connections["grpc"],
        "topics": stats.topics,
        "events_received": stats.events_received,
        "events_delivered": sum(stats.events_delivered.values()),
        "events_delivered_sse": stats.events_delivered["sse"],
        "events_delivered_grpc": stats.events_delivered["grpc"],
        "events_queued": sum(stats.events_queued.values()),
        "events_dropped": stats.events_dropped,
        "events_invalid": stats.events_invalid,
        "source_losses": stats.source_losses,
        "subscribers_cut_off": sum(stats.cut_off.values()),
        "subscribers_cut_off_sse": stats.cut_off["sse"],
        "subscribers_cut_off_grpc": stats.cut_off["grpc"],
        "redis_connected": redis_connected,
        "last_event_id": stats.last_id,
        "connection_errors": sum(by_kind.values()),
        "connection_errors_client": by_kind["client"],
        "connection_errors_internal": by_kind["internal"],
        "connections_dropped_head_timeout": drops["head_timeout"],
        "connections_dropped_head_limit": drops["head_limit"],
    }


class GcPauses:
    """Measures every garbage collection's pause through ``gc.callbacks``."""

    def __init__(self, keep: int = 256) -> None:
        self.total_s = 0.0
        self.count = 0
        self.recent: list[float] = []
        self._keep = keep
        self._started = 0.0
        self._installed = False

    def install(self) -> None:
        if not self._installed:
            gc.callbacks.append(self._callback)
            self._installed = True

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started:
            pause = time.perf_counter() - self._started
            self._started = 0.0
            self.total_s += pause
            self.count += 1
            self.recent.append(pause)
            if len(self.recent) > self._keep:
                del self.recent[: len(self.recent) - self._keep]


GC_PAUSES = GcPauses()


_peak_rss = 0


def _memory() -> tuple[int, int]:
    """Resident set size and its peak, in bytes.

    From ``/proc/self/status`` (``VmRSS``, ``VmHWM``). The kernel updates its
    peak lazily (``getrusage``'s ``ru_maxrss`` read below the current RSS),
    so the peak reported is also never below any RSS read before.
    """
    global _peak_rss  # one process, one peak
    fields: dict[str, int] = {}
    try:
        with open("/proc/self/status") as status:
            for line in status:
                name, _, value = line.partition(":")
                if name in ("VmRSS", "VmHWM"):
                    fields[name] = int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rss = fields.get("VmRSS", peak)
    _peak_rss = max(_peak_rss, rss, fields.get("VmHWM", peak))
    return rss, _peak_rss


def runtime_figures(*, trio_tasks: int, started_at: float, now: float) -> dict[str, Any]:
    """``/metrics/python``: the runtime counterpart of plasma's ``/metrics/go``."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    rss, max_rss = _memory()
    recent = GC_PAUSES.recent
    return {
        "python_version": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "os": sys.platform,
        "arch": platform.machine(),
        "cpu_num": os.cpu_count(),
        "pid": os.getpid(),
        "uptime_s": round(now - started_at, 3),
        "trio_tasks": trio_tasks,
        "threads": threading.active_count(),
        "memory_rss": rss,
        "memory_max_rss": max_rss,
        "cpu_user_s": usage.ru_utime,
        "cpu_system_s": usage.ru_stime,
        "gc_counts": list(gc.get_count()),
        "gc_threshold": list(gc.get_threshold()),
        "gc_frozen": gc.get_freeze_count(),
        "gc_collections": [generation["collections"] for generation in gc.get_stats()],
        "gc_collected": [generation["collected"] for generation in gc.get_stats()],
        "gc_num": GC_PAUSES.count,
        "gc_pause_total_s": round(GC_PAUSES.total_s, 6),
        "gc_pause_last_s": round(recent[-1], 6) if recent else None,
        "gc_pause_max_recent_s": round(max(recent), 6) if recent else None,
        "gc_pause": [round(p, 6) for p in recent[-16:]],
    }
