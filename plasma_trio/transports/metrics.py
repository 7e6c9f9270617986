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
from typing import TYPE_CHECKING, Any, Final

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from quart import Response, request
from quart_trio import QuartTrio

from plasma_trio.diagnostics import dump_tasks
from plasma_trio.metrics import GC_PAUSES, Figures, redis_state
from plasma_trio.tasks import live_task_count

if TYPE_CHECKING:
    from collections.abc import Iterator


# Every reason a subscriber may be refused for (all reported, zero or not).
REFUSAL_REASONS: Final = (
    "invalid",
    "unauthenticated",
    "forbidden",
    "shutdown",
    "connection_limit",
    "descriptors",
)

__all__ = ["PlasmaCollector", "create_diagnostics_app", "create_metrics_app"]


class PlasmaCollector(Collector):
    """Reads the hub's counters at each scrape (nothing is counted twice)."""

    def __init__(self, figures: Figures) -> None:
        self.figures = figures

    def collect(self) -> Iterator[Metric]:
        stats = self.figures.hub.statistics()
        connections = GaugeMetricFamily(
            "plasma_connections", "Open subscriber streams.", labels=["transport"]
        )
        delivered = CounterMetricFamily(
            "plasma_events_delivered",
            "Event copies written to subscribers' sockets.",
            labels=["transport"],
        )
        queued = CounterMetricFamily(
            "plasma_events_queued",
            "Event copies handed to subscribers' queues.",
            labels=["transport"],
        )
        cut_off = CounterMetricFamily(
            "plasma_subscribers_cut_off", "Slow subscribers cut off.", labels=["transport"]
        )
        for transport in stats.connections:
            connections.add_metric([transport], stats.connections[transport])
            delivered.add_metric([transport], stats.events_delivered[transport])
            queued.add_metric([transport], stats.events_queued[transport])
            cut_off.add_metric([transport], stats.cut_off[transport])
        yield connections
        yield GaugeMetricFamily(
            "plasma_topics",
            "Distinct topics with subscribers on this instance.",
            value=stats.topics,
        )
        yield CounterMetricFamily(
            "plasma_events_received",
            "Valid events published to the hub.",
            value=stats.events_received,
        )
        yield delivered
        yield queued
        lag = self.figures.hub.deliveries.lag
        buckets = [
            (str(bound) if bound != float("inf") else "+Inf", count)
            for bound, count in lag.cumulative()
        ]
        yield HistogramMetricFamily(
            "plasma_delivery_lag_seconds",
            "Sampled time from the hub receiving an event to its write to a subscriber's socket.",
            buckets=buckets,
            sum_value=lag.sum,
        )
        depth = HistogramMetricFamily(
            "plasma_subscriber_queue_depth",
            "Events waiting per subscriber, at this scrape.",
            buckets=_depth_buckets(self.figures.hub.queue_depths()),
            sum_value=sum(self.figures.hub.queue_depths()),
        )
        yield depth
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
        yield CounterMetricFamily(
            "plasma_source_losses",
            "Times the source may have lost events (a pub/sub resubscribe after an outage);"
            " each time every subscriber got the live gap notice.",
            value=stats.source_losses,
        )
        yield cut_off
        redis = redis_state(self.figures.source)
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
        for (port, kind), count in self.figures.guard.statistics().items():
            errors.add_metric([port, kind], count)
        yield errors
        drops = CounterMetricFamily(
            "plasma_connections_dropped",
            "Connections dropped before completing their request head, by port and reason"
            " (head_timeout: not within PLASMA_HEADER_TIMEOUT, TLS handshake included;"
            " head_limit: the slowest of 1,024 waiting, once it has waited 5 s for its client).",
            labels=["port", "reason"],
        )
        for (port, reason), count in self.figures.guard.drops().items():
            drops.add_metric([port, reason], count)
        yield drops
        refused = CounterMetricFamily(
            "plasma_streams_refused",
            "Subscribers refused at admission, by transport and reason (invalid,"
            " unauthenticated, forbidden; shutdown, connection_limit: PLASMA_MAX_CONNECTIONS;"
            " descriptors: near the open-file limit).",
            labels=["transport", "reason"],
        )
        hub = self.figures.hub
        for transport in hub.transports:
            for reason in REFUSAL_REASONS:
                refused.add_metric([transport, reason], hub.refusals[transport, reason])
        yield refused
        descriptors = hub.descriptors
        if descriptors is not None:
            yield GaugeMetricFamily(
                "plasma_descriptors_limit",
                "The open-file limit in force (RLIMIT_NOFILE, raised to the hard limit at start).",
                value=descriptors.limit,
            )
            yield GaugeMetricFamily(
                "plasma_descriptors_reserved",
                "Descriptors kept for the server itself (Redis, probes, the metrics port):"
                " new streams are refused within them.",
                value=descriptors.reserve,
            )
            yield GaugeMetricFamily(
                "plasma_descriptors_open", "Open descriptors.", value=descriptors.in_use
            )
        yield GaugeMetricFamily("plasma_trio_tasks", "Live trio tasks.", value=live_task_count())


def _json(body: dict[str, Any]) -> Response:
    return Response(json.dumps(body), status=200, headers={"Content-Type": "application/json"})


_DEPTH_BOUNDS = (0, 1, 4, 16, 64, 256, 1024)


def _depth_buckets(depths: list[int]) -> list[tuple[str, int]]:
    out = [(str(bound), sum(1 for d in depths if d <= bound)) for bound in _DEPTH_BOUNDS]
    out.append(("+Inf", len(depths)))
    return out


def create_metrics_app(figures: Figures) -> QuartTrio:
    app = QuartTrio("plasma_trio.metrics")
    GC_PAUSES.install()
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    registry.register(PlasmaCollector(figures))

    @app.route("/metrics/plasma")
    async def plasma() -> Response:
        return _json(figures.plasma())

    @app.route("/metrics/python")
    async def python() -> Response:
        return _json(figures.runtime())

    @app.route("/metrics")
    async def prometheus() -> Response:
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        return Response(encoder(registry), status=200, headers={"Content-Type": content_type})

    # The main port's probes, here too: this port shares no listen backlog
    # with thousands of reconnecting subscribers (SPEC 8, "Connection storms").
    @app.route("/livez")
    async def livez() -> Response:
        return _text("ok", 200)

    @app.route("/readyz")
    async def readyz() -> Response:
        if figures.hub.closed:
            return _text("shutting down", 503)
        if await figures.source.healthy():
            return _text("ok", 200)
        return _text("source not delivering", 503)

    return app


def _text(text: str, status: int) -> Response:
    return Response(
        text + "\n", status=status, headers={"Content-Type": "text/plain; charset=utf-8"}
    )


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
