"""``serve --workers N``: a supervisor and N worker processes on the same ports (SPEC 9).

Theory of operation
-------------------
One plasma-trio process uses one core. With ``PLASMA_WORKERS`` above 1 (0:
one per core), ``plasma-trio serve`` becomes a *supervisor*: it starts N
workers, each an ordinary ``plasma-trio serve`` with the same settings,
which bind the main and gRPC ports with ``SO_REUSEPORT`` (the kernel hands
each new connection to one of them, by a hash of its addresses: it spreads
connections, not load, and a long-lived connection never moves).

The supervisor and its workers talk over a Unix socket (:class:`WorkerLink`
on the worker's side), one JSON object per line:

* ``{"hello": i, "pid": p, "metrics_port": m}``: worker i is serving; its
  metrics listen on 127.0.0.1:m, which the supervisor's metrics port sums
  over workers (``PLASMA_METRICS_PORT`` is the supervisor's);
* ``{"publish": "<event>"}`` (worker -> supervisor) and ``{"event":
  "<event>"}`` (supervisor -> every worker): in the default ``mock`` mode,
  an event published on any worker (``/publish``, ``/debug``; worker 0's
  demo events) goes through the supervisor to all of them, in one order. In
  the Redis modes each worker subscribes to Redis itself.

A worker that dies is started again (after 0.5 s, doubling up to 30 s while
it keeps dying within a minute); one that exits with status 2 (a
configuration error, e.g. a port in use) stops everything with status 2.
SIGTERM or SIGINT is passed to every worker, which drains its streams within
``PLASMA_SHUTDOWN_TIMEOUT``; a worker still running 5 s after that is
killed; the supervisor exits 0. SIGHUP is passed on (TLS reload). Workers
run in their own session (a terminal's Ctrl-C reaches them once, through the
supervisor; under systemd use ``KillMode=mixed``) and get SIGTERM if the
supervisor dies; whatever ends the supervisor, it kills what still runs.
``PLASMA_PPROF_PORT`` (when not 0) is worker i's plus i;
``PLASMA_MAX_CONNECTIONS`` applies per worker.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from plasma_trio.config import DurationType, settings
from plasma_trio.core.durations import format_duration
from plasma_trio.core.events import Event, InvalidEvent, parse
from plasma_trio.errors import PlasmaError
from plasma_trio.logs import ERROR

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from plasma_trio.config import Config
    from plasma_trio.hub import Hub
    from plasma_trio.sources import Source

__all__ = ["LINK_ENV", "BusSource", "Supervisor", "WorkerLink", "worker_count"]

_log = ERROR.getChild("workers")

# Set by the supervisor in each worker's environment: "<socket path>|<index>".
LINK_ENV = "PLASMA_WORKER_LINK"
EXIT_CONFIG = 2
KILL_GRACE = 5.0
BUS_BACKLOG = 10_000  # events a worker may be behind on the mock-mode bus
PR_SET_PDEATHSIG = 1


def worker_count(config: Config) -> int:
    """How many workers ``PLASMA_WORKERS`` asks for (0: one per core)."""
    return config.workers or os.cpu_count() or 1


# -- the worker's side -------------------------------------------------------


class WorkerLink:
    """A worker's connection to its supervisor (see the module doc)."""

    def __init__(self, path: str, index: int) -> None:
        self.path = path
        self.index = index
        self._stream: trio.SocketStream | None = None
        self._send_lock = trio.Lock()

    @classmethod
    def from_env(cls) -> WorkerLink | None:
        value = os.environ.get(LINK_ENV)
        if not value:
            return None
        path, _, index = value.rpartition("|")
        return cls(path, int(index))

    async def connect(self, metrics_port: int) -> None:
        self._stream = await trio.open_unix_socket(self.path)
        await self._send({"hello": self.index, "pid": os.getpid(), "metrics_port": metrics_port})

    async def _send(self, message: dict[str, Any]) -> None:
        if self._stream is None:
            raise PlasmaError("not connected to the supervisor")
        async with self._send_lock:
            await self._stream.send_all(json.dumps(message).encode() + b"\n")

    async def publish(self, event: Event) -> None:
        await self._send({"publish": event.to_wire().decode()})

    async def events(self, max_bytes: int) -> AsyncIterator[Event]:
        """The events the supervisor relays, in its order; ends when it goes away."""
        assert self._stream is not None
        async for line in _lines(self._stream):
            message = json.loads(line)
            event = parse(message["event"], max_bytes)
            if not isinstance(event, InvalidEvent):
                yield event


class BusSource:
    """The ``mock`` source of a worker: events go through the supervisor, so a
    publish on any worker reaches the subscribers of every worker (worker 0
    makes the demo events)."""

    def __init__(self, inner: Source, link: WorkerLink, max_bytes: int) -> None:
        self.inner = inner
        self.link = link
        self.max_bytes = max_bytes

    async def run(
        self, hub: Hub, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with trio.open_nursery() as nursery:
            if self.link.index == 0:
                nursery.start_soon(self._demo, hub)
            task_status.started()
            async for event in self.link.events(self.max_bytes):
                await hub.publish(event)
            raise PlasmaError("the supervisor went away")

    async def _demo(self, hub: Hub) -> None:
        # The mock generator only calls publish: hand it the bus instead of a hub.
        await self.inner.run(_Relay(self.link), task_status=trio.TASK_STATUS_IGNORED)  # type: ignore[arg-type]

    async def healthy(self) -> bool:
        return True

    async def publish(self, hub: Hub, event: Event) -> None:
        await self.link.publish(event)


class _Relay:
    """What the mock generator publishes to, in worker 0: the bus."""

    def __init__(self, link: WorkerLink) -> None:
        self.link = link

    async def publish(self, event: Event) -> None:
        await self.link.publish(event)


async def _lines(stream: trio.abc.ReceiveStream) -> AsyncIterator[bytes]:
    buffer = b""
    while True:
        data = await stream.receive_some(65536)
        if not data:
            return
        buffer += data
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if line:
                yield line


# -- the supervisor ------------------------------------------------------------


@dataclass
class _Worker:
    index: int
    process: trio.Process | None = None
    stream: trio.SocketStream | None = None
    outbox: trio.MemorySendChannel[bytes] | None = None
    link: trio.CancelScope | None = None
    pid: int = 0
    metrics_port: int = 0
    restarts: int = 0
    started_at: float = 0.0


@dataclass
class Supervisor:
    """Runs and watches the workers; see the module doc."""

    config: Config
    count: int
    workers: list[_Worker] = field(default_factory=list)
    exit_status: int = 0

    def __post_init__(self) -> None:
        self.workers = [_Worker(i) for i in range(self.count)]
        self._stop = trio.Event()
        self._all_serving = trio.Event()
        self._dir = tempfile.mkdtemp(prefix="plasma-trio-")
        self.path = str(Path(self._dir) / "control.sock")

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def worker_env(self, index: int) -> dict[str, str]:
        """Every setting as its environment variable (the supervisor may have
        had options on its command line), and the worker's own."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PLASMA_")}
        env.update(config_env(self.config))
        env["PLASMA_WORKERS"] = "1"
        env[LINK_ENV] = f"{self.path}|{index}"
        env["PLASMA_METRICS_PORT"] = "0"  # 127.0.0.1, summed by the supervisor's
        if self.config.pprof_port:
            env["PLASMA_PPROF_PORT"] = str(self.config.pprof_port + index)
        return env

    async def run(
        self, *, task_status: trio.TaskStatus[Supervisor] = trio.TASK_STATUS_IGNORED
    ) -> int:
        listener_sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await listener_sock.bind(self.path)
        listener_sock.listen(64)
        listener = trio.SocketListener(listener_sock)
        try:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(trio.serve_listeners, self._control, [listener])
                    for worker in self.workers:
                        nursery.start_soon(self._keep_running, worker, nursery.cancel_scope)
                    with trio.move_on_after(30):
                        await self._all_serving.wait()
                    _log.info(
                        "workers serving",
                        extra={"workers": self.count, "pids": [w.pid for w in self.workers]},
                    )
                    task_status.started(self)
                    async for signum in signals:
                        name = signal.Signals(signum).name
                        _log.info("signal received", extra={"signal": name})
                        if signum == signal.SIGHUP:
                            self._signal_all(signal.SIGHUP)  # TLS certificates: reload
                            continue
                        await self.stop(nursery.cancel_scope)
                        break
        finally:
            # However the supervisor ends, no worker outlives it.
            for worker in self.workers:
                if worker.process is not None and worker.process.returncode is None:
                    worker.process.kill()
            with suppress(OSError):
                os.unlink(self.path)
            with suppress(OSError):
                os.rmdir(self._dir)
        return self.exit_status

    async def stop(self, scope: trio.CancelScope) -> None:
        """SIGTERM to every worker; kill what still runs after the shutdown timeout."""
        self._stop.set()
        self._signal_all(signal.SIGTERM)
        with trio.move_on_after(self.config.shutdown_timeout + KILL_GRACE):
            for worker in self.workers:
                if worker.process is not None:
                    await worker.process.wait()
        for worker in self.workers:
            if worker.process is not None and worker.process.returncode is None:
                _log.warning("worker killed", extra={"index": worker.index, "pid": worker.pid})
                worker.process.kill()
                await worker.process.wait()
        scope.cancel()

    def _signal_all(self, signum: int) -> None:
        for worker in self.workers:
            if worker.process is not None and worker.process.returncode is None:
                worker.process.send_signal(signum)

    async def _keep_running(self, worker: _Worker, scope: trio.CancelScope) -> None:
        delay = 0.5
        while not self._stop.is_set():
            worker.metrics_port = 0
            worker.started_at = time.monotonic()
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "plasma_trio", "serve"],
                env=self.worker_env(worker.index),
                stdin=subprocess.DEVNULL,
                # Signals reach workers through the supervisor only (a
                # terminal's Ctrl-C would otherwise hit them twice), and a
                # worker whose supervisor dies (even by SIGKILL) gets SIGTERM.
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
            worker.process = process
            worker.pid = process.pid
            status = await process.wait()
            if self._stop.is_set():
                return
            if status == EXIT_CONFIG:
                _log.error("worker refused its configuration", extra={"index": worker.index})
                self.exit_status = EXIT_CONFIG
                await self.stop(scope)
                return
            worker.restarts += 1
            if time.monotonic() - worker.started_at > 60:
                delay = 0.5
            _log.error(
                "worker died: starting it again",
                extra={"index": worker.index, "pid": worker.pid, "status": status, "in": delay},
            )
            await trio.sleep(delay)
            delay = min(delay * 2, 30.0)

    async def _control(self, stream: trio.SocketStream) -> None:
        worker: _Worker | None = None
        outbox, queued = trio.open_memory_channel[bytes](BUS_BACKLOG)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._send_bus, stream, queued, nursery.cancel_scope)
                async for line in _lines(stream):
                    message = json.loads(line)
                    if "hello" in message:
                        worker = self.workers[int(message["hello"])]
                        worker.stream = stream
                        worker.outbox = outbox
                        worker.link = nursery.cancel_scope
                        worker.pid = int(message["pid"])
                        worker.metrics_port = int(message["metrics_port"])
                        if all(w.metrics_port for w in self.workers):
                            self._all_serving.set()
                    elif "publish" in message:
                        self._broadcast(message["publish"])
                nursery.cancel_scope.cancel()
        except (
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            ValueError,  # not JSON, or a bad hello
            KeyError,
            IndexError,
        ):
            pass
        finally:
            if worker is not None and worker.stream is stream:
                worker.stream = None
                worker.outbox = None
            await trio.aclose_forcefully(stream)

    @staticmethod
    async def _send_bus(
        stream: trio.SocketStream,
        queued: trio.MemoryReceiveChannel[bytes],
        scope: trio.CancelScope,
    ) -> None:
        """One worker's writer: its own pace, never the others'."""
        async with queued:
            async for data in queued:
                try:
                    await stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    scope.cancel()
                    return

    def _broadcast(self, event: str) -> None:
        """Queue an event for every worker, in one order. A worker that falls
        BUS_BACKLOG events behind is cut off: its link closes, it exits and
        is started again (its subscribers reconnect elsewhere)."""
        data = json.dumps({"event": event}).encode() + b"\n"
        for worker in self.workers:
            if worker.outbox is None:
                continue
            try:
                worker.outbox.send_nowait(data)
            except trio.WouldBlock:
                _log.error("worker too slow for the bus: cut off", extra={"index": worker.index})
                worker.outbox = None
                if worker.link is not None:
                    worker.link.cancel()  # its link closes; it exits and is restarted
            except trio.ClosedResourceError:
                worker.outbox = None

    def metrics_ports(self) -> list[tuple[int, int, int]]:
        """(index, pid, metrics port) of every worker serving now."""
        return [(w.index, w.pid, w.metrics_port) for w in self.workers if w.metrics_port]


def _die_with_parent() -> None:
    """In the worker before exec: SIGTERM when the supervisor dies (Linux)."""
    with suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def config_env(config: Config) -> dict[str, str]:
    """Every setting of ``config`` as its environment variable's text."""
    env: dict[str, str] = {}
    for f, setting in settings():
        value = getattr(config, f.name)
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, tuple):
            text = ",".join(value)
        elif isinstance(setting.type, DurationType):
            text = format_duration(value)
        else:
            text = str(value)
        env[setting.variable] = text
    return env
