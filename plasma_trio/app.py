"""``serve(config)``: the process's one root nursery and its lifecycle.

Start order: bind the listening sockets (a port in use is a
:class:`ConfigError` before anything serves), start the source (it reports
ready once it delivers), then the HTTP server. ``task_status.started`` hands
back the bound ports.

Shutdown (SIGINT/SIGTERM in the CLI, or ``shutdown.set()`` in code):

1. the HTTP server stops accepting;
2. the hub closes: every SSE stream receives its queued events and ends
   cleanly, new subscribers get 503;
3. the source is cancelled;
4. everything still running after ``PLASMA_SHUTDOWN_TIMEOUT`` is cancelled.

``serve`` then returns normally (exit status 0). A component that fails for
good raises out of the nursery, which cancels the rest; the CLI logs the
reason and exits non-zero.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import trio
import trio_asyncio

from plasma_trio.admission import TRANSPORTS, verifier_for
from plasma_trio.descriptors import Descriptors
from plasma_trio.hub import Hub
from plasma_trio.logs import ERROR
from plasma_trio.metrics import Figures
from plasma_trio.reporters import run_reporter
from plasma_trio.seams import check_all
from plasma_trio.sources import Source, make_source
from plasma_trio.transports.frontdoor import serve_frontdoor
from plasma_trio.transports.grpc_server import serve_grpc
from plasma_trio.transports.guard import ConnectionGuard
from plasma_trio.transports.http import create_app
from plasma_trio.transports.listen import bind
from plasma_trio.transports.metrics import create_diagnostics_app, create_metrics_app
from plasma_trio.transports.supervisor_metrics import serve_summed_metrics
from plasma_trio.transports.tls import CertificateReloader, server_context
from plasma_trio.watch import watch_subscribers
from plasma_trio.workers import BusSource, Supervisor, WorkerLink, worker_count

if TYPE_CHECKING:
    import socket
    from collections.abc import Awaitable, Callable

    from plasma_trio.config import Config
from plasma_trio.errors import ConfigError

__all__ = ["Running", "serve", "supervise"]


@dataclass(frozen=True)
class Running:
    """What a started server hands back: its hub, bound ports, and its trigger to stop."""

    hub: Hub
    source: Source
    guard: ConnectionGuard
    port: int
    grpc_port: int
    metrics_port: int
    pprof_port: int
    shutdown: trio.Event


async def serve(
    config: Config,
    *,
    handle_signals: bool = False,
    worker: WorkerLink | None = None,
    task_status: trio.TaskStatus[Running] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the server until shutdown. See the module docstring for the order of things.

    ``worker``: this process is one of ``serve --workers N``'s (see
    :mod:`plasma_trio.workers`): the ports are shared (``SO_REUSEPORT``), the
    metrics listen on 127.0.0.1 for the supervisor, and in ``mock`` mode
    events travel through the supervisor to every worker.
    """
    config.validate()
    # grpclib, h2, Hypercorn and asyncio's TLS still have every internal the
    # seams use (plasma_trio/seams): if not, the start stops here, naming it.
    check_all()
    # Read the TLS pair once, before anything listens (a bad pair: exit 2).
    ssl_context = server_context(config)
    verifier_for(config)  # access control's key, read once (a bad key: exit 2)
    source: Source = make_source(config)
    if worker is not None and config.subscriber_type == "mock":
        source = BusSource(source, worker, config.max_event_bytes)
    hub = Hub(
        history_size=config.history_size,
        max_connections=config.max_connections,
        transports=TRANSPORTS,
    )
    shutdown = trio.Event()
    # One connection's failure stays with that connection, on every port.
    guard = ConnectionGuard()
    figures = Figures(hub, source, guard)
    sockets: list[socket.socket] = []
    try:
        shared = worker is not None
        for port_number, variable, host, reuse_port in (
            (config.port, "PLASMA_PORT", "", shared),
            (config.grpc_port, "PLASMA_GRPC_PORT", "", shared),
            (config.metrics_port, "PLASMA_METRICS_PORT", "127.0.0.1" if shared else "", False),
            (config.pprof_port, "PLASMA_PPROF_PORT", config.pprof_host, False),
        ):
            sockets.append(
                bind(
                    port_number,
                    variable,
                    host=host,
                    backlog=config.listen_backlog,
                    reuse_port=reuse_port,
                )
            )
    except ConfigError:
        for sock in sockets:
            sock.close()
        raise
    main_sock, grpc_sock, metrics_sock, pprof_sock = sockets
    # The soft open-file limit raised to the hard one, and the budget that
    # keeps the server's own descriptors out of the streams' reach.
    descriptors = Descriptors.claim()
    hub.descriptors = descriptors
    port = main_sock.getsockname()[1]
    app = create_app(config, hub, source, figures)

    try:
        # grpclib is asyncio: one trio-asyncio loop around the whole nursery,
        # so every task sees it.
        async with trio_asyncio.open_loop(), trio.open_nursery() as outer:
            reloader = CertificateReloader(config, ssl_context) if ssl_context is not None else None
            if handle_signals:
                outer.start_soon(_watch_signals, shutdown, outer.cancel_scope)
                if reloader is not None:
                    outer.start_soon(_reload_on_sighup, reloader)
            if reloader is not None and config.tls_reload_interval > 0:
                outer.start_soon(reloader.watch, config.tls_reload_interval)
            if worker is not None:
                await worker.connect(metrics_sock.getsockname()[1])
            async with trio.open_nursery() as nursery:
                # The source runs until shutdown cancels this scope.
                # The source and the reporters run until shutdown cancels their scopes.
                background: list[trio.CancelScope] = [trio.CancelScope()]
                await nursery.start(_run_within, background[-1], partial(source.run, hub))
                await nursery.start(
                    partial(
                        serve_frontdoor,
                        app,
                        config,
                        hub,
                        main_sock,
                        shutdown=shutdown,
                        guard=guard,
                        descriptors=descriptors,
                        ssl_context=ssl_context,
                    )
                )
                for name, side_app, side_sock in (
                    ("metrics", create_metrics_app(figures), metrics_sock),
                    ("pprof", create_diagnostics_app(), pprof_sock),
                ):
                    await nursery.start(
                        partial(
                            serve_frontdoor,
                            side_app,
                            config,
                            None,
                            side_sock,
                            shutdown=shutdown,
                            guard=guard,
                            descriptors=descriptors,
                            name=name,
                        )
                    )
                # One write deadline for every subscriber, whatever its
                # transport, and the SSE heartbeats.
                background.append(trio.CancelScope())
                await nursery.start(
                    _run_within,
                    background[-1],
                    partial(
                        _started,
                        watch_subscribers,
                        hub,
                        config.subscriber_write_timeout,
                        config.sse_heartbeat_interval,
                    ),
                )
                background.append(trio.CancelScope())
                await nursery.start(
                    _run_within, background[-1], partial(_started, descriptors.watch)
                )
                if config.metrics_type:
                    background.append(trio.CancelScope())
                    await nursery.start(
                        _run_within,
                        background[-1],
                        partial(_started, run_reporter, config, figures),
                    )
                grpc_port = await nursery.start(
                    partial(
                        serve_grpc,
                        config,
                        hub,
                        source,
                        grpc_sock,
                        shutdown=shutdown,
                        guard=guard,
                        descriptors=descriptors,
                        ssl_context=ssl_context,
                    )
                )
                running = Running(
                    hub=hub,
                    source=source,
                    guard=guard,
                    port=port,
                    grpc_port=grpc_port,
                    metrics_port=metrics_sock.getsockname()[1],
                    pprof_port=pprof_sock.getsockname()[1],
                    shutdown=shutdown,
                )
                ERROR.info(
                    "plasma-trio serving",
                    extra={
                        "port": running.port,
                        "grpc_port": running.grpc_port,
                        "metrics_port": running.metrics_port,
                        "pprof_port": running.pprof_port,
                        "source": config.subscriber_type,
                        "tls": config.tls_enabled,
                    },
                )
                task_status.started(running)

                await shutdown.wait()
                ERROR.info("shutting down", extra={"timeout": config.shutdown_timeout})
                # From here on, everything gets PLASMA_SHUTDOWN_TIMEOUT to finish.
                nursery.cancel_scope.deadline = trio.current_time() + config.shutdown_timeout
                hub.close()
                for scope in background:
                    scope.cancel()
            if nursery.cancel_scope.cancelled_caught:
                ERROR.warning("shutdown timeout reached; remaining streams were cancelled")
            # Everything has ended: stop watching for signals.
            outer.cancel_scope.cancel()
    finally:
        for sock in sockets:
            sock.close()
    ERROR.info("stopped")


async def _run_within(
    scope: trio.CancelScope,
    fn: Callable[..., Awaitable[object]],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``fn(task_status=...)`` inside ``scope`` (entered here, in the task)."""
    with scope:
        await fn(task_status=task_status)


async def _started(
    fn: Callable[..., Awaitable[object]],
    *args: object,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Adapt a task that has no ``task_status`` to ``nursery.start``."""
    task_status.started()
    await fn(*args)


async def _reload_on_sighup(reloader: CertificateReloader) -> None:
    """SIGHUP: load the TLS certificate and key again (open streams stay)."""
    with trio.open_signal_receiver(signal.SIGHUP) as signals:
        async for _ in signals:
            reloader.reload("SIGHUP")


async def _watch_signals(shutdown: trio.Event, root: trio.CancelScope) -> None:
    """First SIGINT/SIGTERM: graceful shutdown. A second one: stop at once."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            if not shutdown.is_set():
                ERROR.info("signal received", extra={"signal": signal.Signals(signum).name})
                shutdown.set()
            else:
                ERROR.warning("second signal: stopping now")
                root.cancel()
                return


async def supervise(config: Config) -> int:
    """``serve --workers N``: run the supervisor and its summed metrics port
    until SIGTERM/SIGINT; returns the exit status."""
    supervisor = Supervisor(config, worker_count(config))
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_summed_metrics, config, supervisor)
        status = await supervisor.run()
        nursery.cancel_scope.cancel()
    return status
