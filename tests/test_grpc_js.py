"""The gRPC stream with grpc-js (Node.js), a third independent client, plain and TLS.

Its packages are in ``tests/js`` (``npm ci`` there; the nox ``tests`` session
does it, installing Node.js from the system's packages when it is missing).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trio

from plasma_trio.core.events import Event
from tests.helpers import running_server, wait_for_figure

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    import trustme

    from plasma_trio.app import Running

CLIENT = Path(__file__).parent / "js" / "grpc_client.mjs"
NODE = shutil.which("node")


@pytest.fixture(autouse=True)
def _grpc_js_installed() -> None:
    """Not a skip: a missing client would hide a broken server."""
    if NODE is None or not (CLIENT.parent / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.fail("grpc-js is not installed: `npm ci --prefix tests/js` (nox -s tests does it)")


class NodeClient:
    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.buffer = b""

    async def line(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        while b"\n" not in self.buffer:
            data = await self.process.stdout.receive_some(65536)
            assert data, f"grpc-js client exited: {self.buffer!r}"
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        result: dict[str, Any] = json.loads(line)
        return result


@asynccontextmanager
async def node_client(port: int, topics: str, *extra: str) -> AsyncIterator[NodeClient]:
    assert NODE is not None
    process = await trio.lowlevel.open_process(
        [NODE, str(CLIENT), str(port), topics, *extra], stdout=subprocess.PIPE
    )
    try:
        yield NodeClient(process)
    finally:
        process.kill()
        await process.wait()


@asynccontextmanager
async def server_for(
    tls: bool, ca: trustme.CA, tls_files: dict[str, str], tmp_path: Path, **settings: Any
) -> AsyncIterator[tuple[Running, list[str]]]:
    extra: list[str] = []
    if tls:
        settings.update(tls_files)
        ca_file = tmp_path / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        extra = ["--ca", str(ca_file)]
    async with running_server(**settings) as srv:
        yield srv, extra


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
async def test_grpc_js_receives_every_event_then_force_closes(
    tls: bool, ca: trustme.CA, tls_files: dict[str, str], tmp_path: Path
) -> None:
    with trio.fail_after(30):
        async with server_for(tls, ca, tls_files, tmp_path) as (srv, extra):
            async with node_client(srv.grpc_port, "js,other", "--count", "300", *extra) as node:
                assert await node.line() == {"ready": True}
                await wait_for_figure(srv, "topics", 2)  # "js" and "other"
                sent = [
                    await srv.hub.publish(Event("js:a", json.dumps({"n": n}).encode()))
                    for n in range(300)
                ]
                got = [await node.line() for _ in range(300)]
                assert got == [
                    {"type": "js:a", "data": json.dumps({"n": n}), "id": e.id}
                    for n, e in enumerate(sent)
                ]
                assert await node.line() == {"status": 0, "details": ""}


async def test_grpc_js_resumes_with_last_event_id(
    ca: trustme.CA, tls_files: dict[str, str], tmp_path: Path
) -> None:
    with trio.fail_after(30):
        async with server_for(False, ca, tls_files, tmp_path) as (srv, _):
            sent = [await srv.hub.publish(Event("r", str(n).encode())) for n in range(10)]
            async with node_client(
                srv.grpc_port, "r", "--last-event-id", sent[4].id, "--count", "6"
            ) as node:
                assert await node.line() == {"ready": True}
                await wait_for_figure(srv, "topics", 1)  # "r"
                sent.append(await srv.hub.publish(Event("r", b"10")))
                got = [(await node.line())["data"] for _ in range(6)]
                assert got == [str(n) for n in range(5, 11)]
                assert (await node.line())["status"] == 0
