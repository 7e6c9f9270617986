"""The supervisor's metrics port under ``serve --workers N``.

Each worker serves its own metrics on 127.0.0.1 (an ephemeral port it tells
the supervisor); at every scrape this port reads them all and answers with
the sums (:mod:`plasma_trio.workers_metrics` says how each figure adds up),
on the same hardened listener as every other HTTP port.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Protocol

import httpx
import trio
from quart import Response
from quart_trio import QuartTrio

from plasma_trio.descriptors import Descriptors
from plasma_trio.transports.frontdoor import serve_frontdoor
from plasma_trio.transports.guard import ConnectionGuard
from plasma_trio.transports.listen import bind
from plasma_trio.workers_metrics import CounterMemory, Sample, sum_figures, sum_prometheus

if TYPE_CHECKING:
    from collections.abc import Iterable

    from plasma_trio.config import Config

__all__ = ["WorkerPorts", "serve_summed_metrics"]


class WorkerPorts(Protocol):
    """Where the workers' metrics are (the supervisor)."""

    def metrics_ports(self) -> Iterable[tuple[int, int, int]]:
        """(index, pid, port) of each worker serving its metrics now."""
        ...


def create_summed_metrics_app(supervisor: WorkerPorts) -> QuartTrio:
    app = QuartTrio("plasma_trio.workers_metrics")
    plasma_memory: CounterMemory[str] = CounterMemory()
    python_memory: CounterMemory[str] = CounterMemory()
    prometheus_memory: CounterMemory[Sample] = CounterMemory()

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

    async def summed_json(path: str, memory: CounterMemory[str]) -> Response:
        parts = [(i, pid, json.loads(text)) for i, pid, text in await gather(path)]
        body = json.dumps(sum_figures(parts, memory))
        return Response(body, status=200, headers={"Content-Type": "application/json"})

    @app.route("/metrics/plasma")
    async def plasma() -> Response:
        return await summed_json("/metrics/plasma", plasma_memory)

    @app.route("/metrics/python")
    async def python() -> Response:
        return await summed_json("/metrics/python", python_memory)

    @app.route("/metrics")
    async def prometheus() -> Response:
        parts = await gather("/metrics")
        return Response(
            sum_prometheus(parts, len(parts), prometheus_memory),
            status=200,
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )

    # The probes, as each worker's metrics port answers them: alive while a
    # worker is, ready while every worker is.
    @app.route("/livez")
    async def livez() -> Response:
        alive = bool(await gather("/livez"))
        return _text("ok" if alive else "no worker answers", 200 if alive else 503)

    @app.route("/readyz")
    async def readyz() -> Response:
        workers = len(list(supervisor.metrics_ports()))
        ready = len(await gather("/readyz"))
        if workers and ready == workers:
            return _text("ok", 200)
        return _text(f"{ready} of {workers} workers ready", 503)

    return app


def _text(text: str, status: int) -> Response:
    return Response(
        text + "\n", status=status, headers={"Content-Type": "text/plain; charset=utf-8"}
    )


async def serve_summed_metrics(
    config: Config,
    supervisor: WorkerPorts,
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
            descriptors=Descriptors.claim(),
            name="metrics",
            task_status=task_status,
        )
    finally:
        sock.close()
