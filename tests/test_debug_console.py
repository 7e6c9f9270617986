"""The /debug operator's console (issue 14): the page, loaded in headless
Chromium against a running server, shows the server's figures and draws
its charts; a screenshot is taken."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from typing import TYPE_CHECKING

import httpx
import pytest
import trio

from tests.grpc_clients import GrpcioStream
from tests.helpers import running_server, wait_for_figures

if TYPE_CHECKING:
    from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000"]


def chromium(*args: str) -> subprocess.CompletedProcess[bytes]:
    if CHROMIUM is None:
        pytest.fail("chromium is not installed: run the tests through nox (it installs it)")
    return subprocess.run([CHROMIUM, *FLAGS, *args], capture_output=True, timeout=120, check=False)


def text_of(dom: str, element_id: str) -> str:
    found = re.search(rf'id="{element_id}"[^>]*>([^<]*)<', dom)
    assert found, element_id
    return found.group(1)


async def test_console_shows_the_figures_and_charts(tmp_path: Path) -> None:
    async with running_server(debug=True) as srv, httpx.AsyncClient() as client:
        base = f"http://127.0.0.1:{srv.port}"
        async with trio.open_nursery() as nursery:
            for _ in range(2):
                nursery.start_soon(_sse, base)
            grpc = GrpcioStream(srv.grpc_port)
            try:
                grpc.send("console")
                await wait_for_figures(
                    srv,
                    lambda f: (f["connections_sse"], f["connections_grpc"]) == (2, 1),
                    what="2 SSE streams and 1 gRPC stream",
                )
                for n in range(40):  # enough for delivery-lag samples (1 in 16)
                    body = json.dumps({"meta": {"type": "console"}, "data": n})
                    assert (await client.post(f"{base}/debug", content=body)).status_code == 200
                await wait_for_figures(
                    srv, lambda f: f["delivery_lag_samples"] > 0, what="a delivery-lag sample"
                )
                dom = (
                    await trio.to_thread.run_sync(chromium, "--dump-dom", f"{base}/debug")
                ).stdout
                page = dom.decode()
                shot = tmp_path / "console.png"
                result = await trio.to_thread.run_sync(
                    chromium, "--window-size=1100,900", f"--screenshot={shot}", f"{base}/debug"
                )
            finally:
                grpc.close()
                nursery.cancel_scope.cancel()
    assert text_of(page, "conn-sse") == "2"
    assert text_of(page, "conn-grpc") == "1"
    assert text_of(page, "events-received") == "40"
    assert float(text_of(page, "lag-p99")) > 0
    assert text_of(page, "source") == "mock"
    # Every chart has drawn points.
    for chart in ("conn-sse", "conn-grpc", "events-rate", "delivered-rate", "lag-p99", "cut-off"):
        points = re.search(rf'id="chart-{chart}".*?points="([^"]*)"', page, flags=re.DOTALL)
        assert points is not None, chart
        assert points.group(1).strip(), chart
    assert result.returncode == 0, result.stderr[-2000:]
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) > 10_000


async def _sse(base: str) -> None:
    async with (
        httpx.AsyncClient(timeout=30) as client,
        client.stream(
            "GET", f"{base}/?eventType=console", headers={"Accept": "text/event-stream"}
        ) as r,
    ):
        async for _ in r.aiter_bytes():
            pass


async def test_console_figures_need_debug() -> None:
    async with running_server() as srv, httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{srv.port}/debug/figures")
        assert response.status_code == 404
