"""Lifecycle (SPEC 7): the CLI serves, SIGINT/SIGTERM end every stream cleanly
and exit 0, and a component that fails for good ends the process non-zero."""

from __future__ import annotations

import json
import signal
import subprocess
import textwrap
from contextlib import aclosing, contextmanager
from typing import TYPE_CHECKING

import httpx
import pytest
import trio

from plasma_trio.app import serve
from plasma_trio.errors import SourceFailed
from tests.helpers import PYTHON, SSE_HEADERS, free_port, make_config, plasma_env

if TYPE_CHECKING:
    from collections.abc import Iterator

    from plasma_trio.hub import Hub


@contextmanager
def server_process(*argv: str, **env: str) -> Iterator[tuple[subprocess.Popen[str], int]]:
    port = free_port()
    proc = subprocess.Popen(
        argv or [PYTHON, "-m", "plasma_trio", "serve"],
        env=plasma_env(PLASMA_PORT=str(port), **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


async def wait_healthy(port: int, proc: subprocess.Popen[str]) -> None:
    async with httpx.AsyncClient() as client:
        for _ in range(200):
            assert proc.poll() is None, proc.communicate()
            try:
                if (await client.get(f"http://127.0.0.1:{port}/hc")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await trio.sleep(0.05)
    pytest.fail("server did not become healthy")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_signal_ends_streams_cleanly_and_exits_0(signum: signal.Signals) -> None:
    with server_process(PLASMA_SUBSCRIBER_MOCK_INTERVAL="50ms", PLASMA_SHUTDOWN_TIMEOUT="5s") as (
        proc,
        port,
    ):
        with trio.fail_after(20):
            await wait_healthy(port, proc)
            async with httpx.AsyncClient(timeout=10) as client:
                url = f"http://127.0.0.1:{port}/?eventType=poll,program,other"
                async with client.stream("GET", url, headers=SSE_HEADERS) as resp:
                    assert resp.status_code == 200
                    body = b""
                    async with aclosing(resp.aiter_bytes()) as chunks:
                        async for chunk in chunks:
                            body += chunk
                            if body.count(b"data: ") >= 3:
                                proc.send_signal(signum)
                                break
                        else:
                            pytest.fail(f"the stream ended before 3 events: {body!r}")
                        # The stream ends (cleanly: no exception from httpx) soon after.
                        async for chunk in chunks:
                            body += chunk
            assert b'data: {"meta":{"type":"poll"}' in body
            t0 = trio.current_time()
            while proc.poll() is None:
                await trio.sleep(0.05)
            assert trio.current_time() - t0 < 5
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    messages = [json.loads(line)["msg"] for line in err.splitlines()]
    assert "signal received" in messages
    assert messages[-1] == "stopped"
    access = [json.loads(line) for line in out.splitlines()]
    assert access
    assert access[0]["transport"] == "sse"
    assert access[0]["ending"] == "server shutdown"
    assert access[0]["topics"] == ["other", "poll", "program"]


FAILING_SOURCE = textwrap.dedent(
    """
    import trio
    import plasma_trio.sources as sources
    from plasma_trio.errors import SourceFailed

    class Failing:
        async def run(self, hub, *, task_status=trio.TASK_STATUS_IGNORED):
            task_status.started()
            await trio.sleep(0.3)
            raise SourceFailed("redis retries exhausted (test)")

        async def healthy(self):
            return True

        async def publish(self, hub, event):
            await hub.publish(event)

    sources.make_source = lambda config: Failing()
    import plasma_trio.app
    plasma_trio.app.make_source = sources.make_source
    from plasma_trio.cli import main
    main(["serve"])
    """
)


async def test_component_failure_exits_non_zero_with_reason() -> None:
    with server_process(PYTHON, "-c", FAILING_SOURCE) as (proc, _port):
        _out, err = proc.communicate(timeout=20)
    assert proc.returncode == 1
    assert "redis retries exhausted (test)" in err
    assert any(
        json.loads(line).get("level") == "CRITICAL"
        for line in err.splitlines()
        if line.startswith("{")
    )


async def test_failure_inside_serve_propagates(monkeypatch: pytest.MonkeyPatch) -> None:
    class Failing:
        async def run(
            self, hub: Hub, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
        ) -> None:
            task_status.started()
            raise SourceFailed("gone")

        async def healthy(self) -> bool:
            return True

    monkeypatch.setattr("plasma_trio.app.make_source", lambda config: Failing())
    with trio.fail_after(10), pytest.RaisesGroup(SourceFailed, flatten_subgroups=True):
        await serve(make_config())


def test_python_dash_m_is_the_cli() -> None:
    result = subprocess.run(
        [PYTHON, "-m", "plasma_trio", "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0
    assert "serve" in result.stdout


@pytest.mark.parametrize("fast_path", [True, False])
async def test_idle_connections_do_not_hold_shutdown(fast_path: bool) -> None:
    """A browser keeps spare and kept-alive connections open; they must not
    make a graceful shutdown wait for its whole budget."""
    from tests.helpers import running_server

    with trio.fail_after(30):
        async with httpx.AsyncClient() as client:
            spare = None
            async with running_server(shutdown_timeout=10.0, sse_fast_path=fast_path) as srv:
                # A kept-alive connection, idle after its request...
                assert (await client.get(f"http://127.0.0.1:{srv.port}/hc")).status_code == 200
                # ...and a connection that never sends a request.
                spare = await trio.open_tcp_stream("127.0.0.1", srv.port)
                await trio.sleep(0.1)
                started = trio.current_time()
            assert trio.current_time() - started < 2.0
            await spare.aclose()
