"""Test helpers: real servers on free ports, polling, subprocess environment."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from contextlib import aclosing, asynccontextmanager
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import trio

from plasma_trio.app import Running, serve
from plasma_trio.config import Config
from plasma_trio.tasks import live_task_count

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    import httpx

# A mock interval long enough that demo events never disturb a test.
QUIET = 3600.0


# Test modules may change these (e.g. to run every SSE test on both paths).
DEFAULTS: dict[str, Any] = {}


def make_config(**overrides: Any) -> Config:
    """A config for in-process servers: ephemeral port, no demo events, quiet logs."""
    base = {
        "port": 0,
        "grpc_port": 0,
        "metrics_port": 0,
        "pprof_port": 0,
        "pprof_host": "127.0.0.1",
        "subscriber_mock_interval": QUIET,
        "access_log_out": "discard",
        "error_log_out": "discard",
        "shutdown_timeout": 5.0,
    }
    base.update(DEFAULTS)
    base.update(overrides)
    return Config(**base)


@asynccontextmanager
async def running_server(**overrides: Any) -> AsyncIterator[Running]:
    """Run the real server in this trio run; stop it (gracefully) on exit."""
    config = make_config(**overrides)
    async with trio.open_nursery() as nursery:
        running: Running = await nursery.start(serve, config)
        try:
            yield running
        finally:
            running.shutdown.set()


def base_url(running: Running) -> str:
    return f"http://127.0.0.1:{running.port}"


SSE_HEADERS = {"Accept": "text/event-stream"}


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    """Poll ``predicate`` until true; fail the test after ``timeout`` seconds."""
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.01)
        return
    pytest.fail(f"timed out waiting for {what or predicate}")


async def wait_for_task_baseline(baseline: int, timeout: float = 5.0) -> None:
    await wait_until(
        lambda: live_task_count() <= baseline, timeout, f"live tasks back to {baseline}"
    )


def plasma_env(**overrides: str) -> dict[str, str]:
    """Environment for a subprocess server: no inherited PLASMA_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLASMA_")}
    # Free ports: tests never collide on the fixed defaults.
    env.update(PLASMA_GRPC_PORT="0", PLASMA_METRICS_PORT="0", PLASMA_PPROF_PORT="0")
    env.update(overrides)
    return env


PYTHON = sys.executable


async def cli_publish(env: dict[str, str], *args: str) -> str:
    """Run ``plasma-trio publish *args`` as a separate process with ``env``
    (see :func:`plasma_env`); it must succeed; returns its stdout."""
    result = await trio.to_thread.run_sync(
        lambda: subprocess.run(
            [PYTHON, "-m", "plasma_trio", "publish", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


__all__ = [
    "PYTHON",
    "QUIET",
    "SSE_HEADERS",
    "base_url",
    "cli_publish",
    "figures_of",
    "free_port",
    "free_port_pair",
    "first_chunk",
    "plasma_env",
    "running_server",
    "make_config",
    "wait_for_figure",
    "wait_for_figures",
    "wait_for_task_baseline",
    "wait_until",
]


async def first_chunk(resp: httpx.Response) -> bytes:
    """The first body chunk of a streamed response (the generator is closed properly)."""
    async with aclosing(resp.aiter_bytes()) as chunks:
        return await anext(chunks)


_HANDED_OUT: set[int] = set()


def _metrics_port(server: Running | int) -> int:
    return server if isinstance(server, int) else server.metrics_port


async def figures_of(server: Running | int) -> dict[str, Any]:
    """The server's ``/metrics/plasma`` figures, read over HTTP from its metrics
    port (what an operator sees), not from the hub's memory. ``server``: an
    in-process server, or the metrics port of any (a subprocess's too)."""
    url = f"http://127.0.0.1:{_metrics_port(server)}/metrics/plasma"
    async with httpx.AsyncClient(timeout=5) as client:
        response = await client.get(url)
    assert response.status_code == 200
    result: dict[str, Any] = response.json()
    return result


async def wait_for_figures(
    server: Running | int,
    check: Callable[[dict[str, Any]], bool],
    timeout: float = 10,
    what: str = "",
) -> dict[str, Any]:
    """Poll ``/metrics/plasma`` until ``check(figures)``; those figures, or the
    test fails after ``timeout`` seconds (naming ``what`` and the last figures)."""
    figures: dict[str, Any] = {}
    with trio.move_on_after(timeout):
        while not check(figures := await figures_of(server)):
            await trio.sleep(0.02)
        return figures
    pytest.fail(f"timed out waiting for {what or check} in /metrics/plasma: {figures}")


async def wait_for_figure(
    server: Running | int, name: str, value: Any, timeout: float = 10
) -> dict[str, Any]:
    """Poll ``/metrics/plasma`` until its figure ``name`` is ``value``."""
    return await wait_for_figures(
        server, lambda figures: figures.get(name) == value, timeout, f"{name} == {value!r}"
    )


def free_port() -> int:
    """A port that was free a moment ago (for subprocess servers), and never
    handed out before in this test session: the kernel may give the same
    ephemeral port to two binds in a row, and a server started on, say,
    ``PLASMA_GRPC_PORT == PLASMA_METRICS_PORT`` fails to start (the likely
    cause of a CI failure: both workers could not bind the gRPC port)."""
    for _ in range(1000):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise AssertionError("no fresh free port in 1,000 tries")


def free_port_pair() -> int:
    """A port ``p`` such that ``p`` and ``p + 1`` were free a moment ago."""
    for _ in range(100):
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        if port + 1 in _HANDED_OUT:
            continue
        _HANDED_OUT.add(port + 1)
        return port
    pytest.fail("no two consecutive free ports")
