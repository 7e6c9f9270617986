"""Every line the server writes is one JSON object (log shippers rely on it):
our loggers, the libraries' (grpclib, coredis, h2, hypercorn, trio-asyncio,
asyncio) and the fatal line, driven through TLS, gRPC, garbage on
both ports and a Redis outage."""

from __future__ import annotations

import json
import subprocess
from typing import TYPE_CHECKING

import grpc
import httpx
import trio
from httpx_sse import aconnect_sse

from tests.grpc_clients import GrpcioStream
from tests.helpers import PYTHON, plasma_env
from tests.server_process import start_server, stop_server
from tests.streams import grpcio_subscribed, next_grpc_payload, next_sse_event, sse_subscribed

if TYPE_CHECKING:
    from pathlib import Path

    from tests.redis_server import RedisServer


async def garbage(port: int) -> None:
    with trio.move_on_after(2):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        try:
            await stream.send_all(b"\x16\x03\x01\x00\x05hello" + bytes(range(256)))
            await stream.receive_some(1024)
        except (trio.BrokenResourceError, OSError):
            pass
        finally:
            await stream.aclose()


async def test_every_line_is_json_through_tls_grpc_and_a_redis_outage(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    server = start_server(
        tmp_path,
        tls=True,
        PLASMA_ERROR_LOG_OUT="stderr",
        PLASMA_ACCESS_LOG_OUT="stdout",
        PLASMA_SUBSCRIBER_TYPE="redis",
        PLASMA_SUBSCRIBER_REDIS_ADDR=redis_server.addr,
        PLASMA_SUBSCRIBER_REDIS_CHANNELS="logs",
        PLASMA_SUBSCRIBER_REDIS_TIMEOUT="500ms",
        PLASMA_SUBSCRIBER_REDIS_RETRY_INTERVAL="100ms",
        PLASMA_SUBSCRIBER_REDIS_OVER_MAX_RETRY_BEHAVIOR="alive",
    )
    try:
        assert server.ca is not None
        context = server.client_context
        metrics = f"http://127.0.0.1:{server.ports['metrics']}/metrics/plasma"
        with trio.fail_after(60):
            async with httpx.AsyncClient(verify=context or True, timeout=10) as client:
                body = '{"meta":{"type":"logs"},"data":1}'
                # SSE over TLS, and gRPC over TLS (grpcio), each get an event.
                credentials = grpc.ssl_channel_credentials(server.ca.cert_pem.bytes())
                stream = GrpcioStream(
                    server.ports["grpc"], credentials=credentials, host="localhost"
                )
                try:
                    stream.send("logs")
                    async with aconnect_sse(client, "GET", f"{server.url}/?eventType=logs") as sse:
                        assert sse.response.status_code == 200
                        events = sse.aiter_sse()
                        await sse_subscribed(events)
                        await grpcio_subscribed(stream)
                        # /debug publishes through Redis: once subscribed there.
                        while not (await client.get(metrics)).json()["redis_connected"]:
                            await trio.sleep(0.05)
                        published = await client.post(f"{server.url}/debug", content=body)
                        assert published.status_code == 200
                        payload = await next_grpc_payload(stream, what="the event over TLS")
                        assert payload.data == "1"
                        event = await next_sse_event(events, what="the event over TLS")
                        assert json.loads(event.data)["data"] == 1
                finally:
                    stream.close()
                # Garbage on the TLS ports: the TLS and HTTP/2 layers complain.
                await garbage(server.ports["main"])
                await garbage(server.ports["grpc"])
                # A Redis outage: coredis and our source complain, then recover.
                redis_server.stop()
                while (await client.get(metrics)).json()["redis_connected"]:
                    await trio.sleep(0.05)
                redis_server.start()
                while not (await client.get(metrics)).json()["redis_connected"]:
                    await trio.sleep(0.05)
    finally:
        records = stop_server(server)
    loggers = {record.get("logger", "") for record in records}
    assert "plasma_trio.access" in loggers
    assert "plasma_trio.redis" in loggers
    # Libraries' own loggers made it out as JSON too, not as plain text.
    assert any(not name.startswith("plasma_trio") for name in loggers), loggers


def test_the_fatal_line_is_json_when_the_error_log_is_on_stderr(tmp_path: Path) -> None:
    """A source that gives up ends the process with status 1; with the error
    log on stderr, stderr holds only JSON (the reason included)."""
    result = subprocess.run(
        [PYTHON, "-m", "plasma_trio", "serve"],
        env=plasma_env(
            PLASMA_PORT="0",
            PLASMA_GRPC_PORT="0",
            PLASMA_METRICS_PORT="0",
            PLASMA_PPROF_PORT="0",
            PLASMA_SUBSCRIBER_TYPE="redis",
            PLASMA_SUBSCRIBER_REDIS_ADDR="127.0.0.1:1",
            PLASMA_SUBSCRIBER_REDIS_CHANNELS="x",
            PLASMA_SUBSCRIBER_REDIS_MAX_RETRY="1",
            PLASMA_SUBSCRIBER_REDIS_RETRY_INTERVAL="10ms",
            PLASMA_ERROR_LOG_OUT="stderr",
        ),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    records = [json.loads(line) for line in result.stderr.decode().splitlines()]
    assert any(r["level"] == "CRITICAL" and "fatal" in r["msg"] for r in records), records
    assert result.stdout == b""


WARNINGS_AND_STRAYS = """
import threading, warnings
from plasma_trio import logs
from tests.helpers import make_config

logs.configure(make_config(error_log_out="stderr", error_log_level="info"))

class Broken:
    def __del__(self):
        raise RuntimeError("broken finalizer")

warnings.warn("a library warns", DeprecationWarning, stacklevel=1)
Broken()  # its __del__ raises: nobody can catch that (sys.unraisablehook)
thread = threading.Thread(target=lambda: 1 / 0, name="stray")
thread.start()
thread.join()
print("plain stdout is the program's, not a log line")
"""


def test_warnings_unraisable_and_thread_exceptions_are_json_lines() -> None:
    """What no code can catch still reaches the error log as one JSON line:
    a Python warning, an exception in a finalizer, one in a thread."""
    result = subprocess.run(
        [PYTHON, "-W", "always", "-c", WARNINGS_AND_STRAYS],
        env=plasma_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stderr.splitlines()]  # every line JSON
    by_logger = {r["logger"]: r for r in records}
    assert "a library warns" in by_logger["py.warnings"]["msg"]
    assert by_logger["plasma_trio.unraisable"]["level"] == "ERROR"
    assert "broken finalizer" in by_logger["plasma_trio.unraisable"]["exc_info"]
    assert "stray" in by_logger["plasma_trio.thread"]["msg"]
    assert "ZeroDivisionError" in by_logger["plasma_trio.thread"]["exc_info"]
