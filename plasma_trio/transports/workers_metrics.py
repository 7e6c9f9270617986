"""The supervisor's metrics port under ``serve --workers N``: the workers' figures, summed.

Each worker serves its own metrics on 127.0.0.1 (an ephemeral port it tells
the supervisor); at every scrape the supervisor reads them all and answers
on ``PLASMA_METRICS_PORT``:

* ``/metrics/plasma`` and ``/metrics/python``: every numeric field summed
  over workers (connections, events delivered, memory...), other fields
  from worker 0, plus ``workers``: each worker's index, pid and figures;
* ``/metrics``: every Prometheus sample summed over workers by name and
  labels (counters and gauges alike: a sum over processes is what a
  dashboard of the machine wants), plus ``plasma_workers``.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families
from quart import Response
from quart_trio import QuartTrio

from plasma_trio.transports.frontdoor import serve_frontdoor
from plasma_trio.transports.guard import ConnectionGuard
from plasma_trio.transports.listen import bind

if TYPE_CHECKING:
    from plasma_trio.config import Config
    from plasma_trio.workers import Supervisor

__all__ = ["serve_summed_metrics", "sum_figures", "sum_prometheus"]


# Numbers that describe a process or an instant, not an amount: from worker 0.
_NOT_SUMMED = frozenset({"time", "pid", "uptime_s", "cpu_num"})


def sum_figures(parts: list[tuple[int, int, dict[str, Any]]]) -> dict[str, Any]:
    """JSON figures of several workers -> one: amounts summed, the rest from the first."""
    total: dict[str, Any] = {}
    for _, _, figures in parts:
        for key, value in figures.items():
            if key in _NOT_SUMMED or isinstance(value, bool) or not isinstance(value, (int, float)):
                total.setdefault(key, value)
            else:
                total[key] = total.get(key, 0) + value
    total["workers"] = [{"index": index, "pid": pid, **figures} for index, pid, figures in parts]
    return total


def sum_prometheus(texts: list[str], workers: int) -> str:
    """Prometheus text of several workers -> one, samples summed by name and labels."""
    helps: dict[str, tuple[str, str]] = {}
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    order: list[tuple[str, tuple[tuple[str, str], ...]]] = []
    families: dict[str, list[tuple[str, tuple[tuple[str, str], ...]]]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            helps.setdefault(family.name, (family.documentation, family.type))
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in samples:
                    samples[key] = 0.0
                    order.append(key)
                    families.setdefault(family.name, []).append(key)
                samples[key] += sample.value
    lines = [
        "# HELP plasma_workers Worker processes serving.",
        "# TYPE plasma_workers gauge",
        f"plasma_workers {workers}",
    ]
    for name, keys in families.items():
        documentation, kind = helps[name]
        lines.append(f"# HELP {name} {documentation}")
        lines.append(f"# TYPE {name} {kind if kind != 'unknown' else 'untyped'}")
        for sample_name, labels in keys:
            label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
            value = samples[(sample_name, labels)]
            suffix = f"{{{label_text}}}" if label_text else ""
            lines.append(f"{sample_name}{suffix} {_number(value)}")
    return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    return str(int(value)) if value.is_integer() else repr(value)


def create_summed_metrics_app(supervisor: Supervisor) -> QuartTrio:
    app = QuartTrio("plasma_trio.workers_metrics")

    async def gather(path: str) -> list[tuple[int, int, str]]:
        results: list[tuple[int, int, str]] = []
        async with httpx.AsyncClient(timeout=5) as client:

            async def one(index: int, pid: int, port: int) -> None:
                try:
                    response = await client.get(f"http://127.0.0.1:{port}{path}")
                except httpx.HTTPError:
                    return  # a worker going away: counted when it is back
                if response.status_code == 200:
                    results.append((index, pid, response.text))

            async with trio.open_nursery() as nursery:
                for index, pid, port in supervisor.metrics_ports():
                    nursery.start_soon(one, index, pid, port)
        return sorted(results)

    async def summed_json(path: str) -> Response:
        parts = [(i, pid, json.loads(text)) for i, pid, text in await gather(path)]
        body = json.dumps(sum_figures(parts))
        return Response(body, status=200, headers={"Content-Type": "application/json"})

    @app.route("/metrics/plasma")
    async def plasma() -> Response:
        return await summed_json("/metrics/plasma")

    @app.route("/metrics/python")
    async def python() -> Response:
        return await summed_json("/metrics/python")

    @app.route("/metrics")
    async def prometheus() -> Response:
        texts = [text for _, _, text in await gather("/metrics")]
        return Response(
            sum_prometheus(texts, len(texts)),
            status=200,
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )

    return app


async def serve_summed_metrics(
    config: Config,
    supervisor: Supervisor,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the supervisor's metrics port until cancelled."""
    sock = bind(config.metrics_port, "PLASMA_METRICS_PORT")
    try:
        await serve_frontdoor(
            create_summed_metrics_app(supervisor),
            config,
            None,
            sock,
            shutdown=trio.Event(),
            guard=ConnectionGuard(),
            name="metrics",
            task_status=task_status,
        )
    finally:
        sock.close()
