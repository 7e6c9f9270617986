"""The metrics port and the diagnostics port (SPEC 6), each its own Quart-trio app.

Metrics port (``PLASMA_METRICS_PORT``):

* ``GET /metrics/plasma``: plasma's JSON (``time``, ``connections``,
  ``connections_sse``, ``connections_grpc``) plus event counters and the Redis
  state (see :mod:`plasma_trio.metrics` for each field's meaning).
* ``GET /metrics/python``: the runtime figures (the counterpart of ``/metrics/go``).
* ``GET /metrics``: Prometheus exposition through ``prometheus-client``
  (text format 0.0.4, OpenMetrics when the ``Accept`` header asks for it),
  with the process collector's ``process_*`` series.

Diagnostics port (``PLASMA_PPROF_HOST:PLASMA_PPROF_PORT``): ``GET /``,
``/debug/pprof/`` or ``/debug/pprof/goroutine``: the live task tree and
every task's stack, as text.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from quart import Response, request
from quart_trio import QuartTrio

from plasma_trio.diagnostics import dump_tasks
from plasma_trio.metrics import GC_PAUSES, plasma_figures, runtime_figures
from plasma_trio.tasks import live_task_count

if TYPE_CHECKING:
    from collections.abc import Iterator

    from plasma_trio.hub import Hub
    from plasma_trio.sources import Source
    from plasma_trio.transports.guard import ConnectionGuard

__all__ = ["PlasmaCollector", "create_diagnostics_app", "create_metrics_app", "redis_state"]


def redis_state(source: Source) -> bool | None:
    """The Redis source's connection state; ``None`` for sources without Redis."""
    connected = getattr(source, "connected", None)
    return connected if isinstance(connected, bool) else None


class PlasmaCollector(Collector):
    """Reads the hub's counters at each scrape (nothing is counted twice)."""

    def __init__(self, hub: Hub, source: Source, guard: ConnectionGuard) -> None:
        self.hub = hub
        self.source = source
        self.guard = guard

    def collect(self) -> Iterator[Metric]:
        stats = self.hub.statistics()
        connections = GaugeMetricFamily(
            "plasma_connections", "Open subscriber streams.", labels=["transport"]
        )
        delivered = CounterMetricFamily(
            "plasma_events_delivered", "Event copies queued to subscribers.", labels=["transport"]
        )
        cut_off = CounterMetricFamily(
            "plasma_subscribers_cut_off", "Slow subscribers cut off.", labels=["transport"]
        )
        for transport in ("sse", "grpc"):
            connections.add_metric([transport], stats.connections[transport])
            delivered.add_metric([transport], stats.events_delivered[transport])
            cut_off.add_metric([transport], stats.cut_off[transport])
        yield connections
        yield CounterMetricFamily(
            "plasma_events_received",
            "Valid events published to the hub.",
            value=stats.events_received,
        )
        yield delivered
        yield CounterMetricFamily(
            "plasma_events_dropped",
            "Event copies not delivered because their subscriber was cut off.",
            value=stats.events_dropped,
        )
        yield CounterMetricFamily(
            "plasma_events_invalid",
            "Messages rejected as invalid events.",
            value=stats.events_invalid,
        )
        yield cut_off
        redis = redis_state(self.source)
        if redis is not None:
            yield GaugeMetricFamily(
                "plasma_redis_connected", "1 while the Redis source is connected.", value=int(redis)
            )
        errors = CounterMetricFamily(
            "plasma_connection_errors",
            "Connections whose failure was contained to them, by port and kind"
            " (client: resets and protocol errors; internal: a server-side error).",
            labels=["port", "kind"],
        )
        for (port, kind), count in self.guard.statistics().items():
            errors.add_metric([port, kind], count)
        yield errors
        yield GaugeMetricFamily("plasma_trio_tasks", "Live trio tasks.", value=live_task_count())


def _json(body: dict[str, Any]) -> Response:
    return Response(json.dumps(body), status=200, headers={"Content-Type": "application/json"})


def create_metrics_app(hub: Hub, source: Source, guard: ConnectionGuard) -> QuartTrio:
    app = QuartTrio("plasma_trio.metrics")
    started_at = time.monotonic()
    GC_PAUSES.install()
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    registry.register(PlasmaCollector(hub, source, guard))

    @app.route("/metrics/plasma")
    async def plasma() -> Response:
        return _json(
            plasma_figures(
                hub.statistics(),
                redis_connected=redis_state(source),
                connection_errors=guard.statistics(),
                now_ns=time.time_ns(),
            )
        )

    @app.route("/metrics/python")
    async def python() -> Response:
        return _json(
            runtime_figures(
                trio_tasks=live_task_count(), started_at=started_at, now=time.monotonic()
            )
        )

    @app.route("/metrics")
    async def prometheus() -> Response:
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        return Response(encoder(registry), status=200, headers={"Content-Type": content_type})

    return app


def create_diagnostics_app() -> QuartTrio:
    app = QuartTrio("plasma_trio.diagnostics")

    @app.route("/")
    @app.route("/debug/pprof/")
    @app.route("/debug/pprof/goroutine")
    async def tasks() -> Response:
        return Response(
            dump_tasks(), status=200, headers={"Content-Type": "text/plain; charset=utf-8"}
        )

    return app
