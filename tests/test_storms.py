"""Connection storms and the descriptor limit (SPEC 8, issue 22), on a real
server process, from raw sockets (and grpcio): a burst of 3,000 connects is
served whole, on the plain fast path, with heads that follow their connects
by 0.5 s, and over TLS; a server held to 256 open files answers the excess
with ``503`` / ``UNAVAILABLE`` while its probes and metrics port keep
answering, warns once, and serves again when the clients have gone."""

from __future__ import annotations

import json
import resource
import ssl
import time
from collections import Counter
from typing import TYPE_CHECKING

import grpc
import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.grpc_clients import GrpcioStream
from tests.server_process import Server, start_server, stop_server

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _descriptors() -> None:
    """This process holds thousands of client connections."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if min(hard, resource.getrlimit(resource.RLIMIT_NOFILE)[0]) < 7000:
        pytest.skip("needs 7,000 open files (client and server on one machine)")


def series(server: Server, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """One metric's samples from the metrics port, by their labels."""
    text = httpx.get(f"http://127.0.0.1:{server.ports['metrics']}/metrics", timeout=5).text
    return {
        tuple(sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    }


def total(server: Server, name: str) -> float:
    return sum(series(server, name).values())


class Clients:
    """SSE clients on raw sockets (TLS when the server has it), each
    counted by what it got: the response status, ``closed`` (the connection
    ended before a response head) or ``reset`` (an error on the socket)."""

    def __init__(self, server: Server, topic: str) -> None:
        self.server = server
        self.head = (
            f"GET /?eventType={topic} HTTP/1.1\r\nHost: localhost\r\n"
            "Accept: text/event-stream\r\n\r\n"
        ).encode()
        self.outcomes: Counter[str] = Counter()
        self.open: list[trio.abc.Stream] = []

    async def one(self, head_delay: float) -> None:
        try:
            stream: trio.abc.Stream = await trio.open_tcp_stream(
                "127.0.0.1", self.server.ports["main"]
            )
            if self.server.client_context is not None:
                stream = trio.SSLStream(
                    stream, self.server.client_context, server_hostname="localhost"
                )
                await stream.do_handshake()
            if head_delay:
                await trio.sleep(head_delay)
            await stream.send_all(self.head)
            received = b""
            while b"\r\n\r\n" not in received:
                data = await stream.receive_some(4096)
                if not data:
                    self.outcomes["closed"] += 1
                    return
                received += data
        except (OSError, trio.BrokenResourceError, ssl.SSLError) as exc:
            cause = exc.__cause__ or exc.__context__ or exc
            self.outcomes[f"reset ({type(cause).__name__}: {cause})"] += 1
            return
        status = received.split(b" ", 2)[1].decode()
        self.outcomes[status] += 1
        if status == "200":
            self.open.append(stream)  # held open (an SSE stream)
        else:
            await stream.aclose()

    async def burst(self, count: int, head_delay: float = 0.0) -> Counter[str]:
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                for _ in range(count):
                    nursery.start_soon(self.one, head_delay)
        return self.outcomes

    async def close(self) -> None:
        for stream in self.open:
            with trio.move_on_after(1):
                await trio.aclose_forcefully(stream)
        self.open.clear()


@pytest.fixture(params=["plain", "plain, heads 0.5 s late", "tls"])
def burst_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Server]:
    srv = start_server(tmp_path, tls=request.param == "tls")
    srv.head_delay = 0.5 if "late" in request.param else 0.0  # type: ignore[attr-defined]
    try:
        yield srv
    finally:
        stop_server(srv)


async def test_a_burst_of_3000_connects_is_served_whole(burst_server: Server) -> None:
    """3,000 clients connect at once (heads at once, or 0.5 s after the
    connect): every one gets its ``200`` and stays subscribed; none is reset,
    none closed unanswered, none dropped at the head bound."""
    server = burst_server
    clients = Clients(server, "storm")
    try:
        outcomes = await clients.burst(3000, server.head_delay)  # type: ignore[attr-defined]
        assert outcomes == {"200": 3000}, outcomes
        connections = await trio.to_thread.run_sync(series, server, "plasma_connections")
        assert connections[(("transport", "sse"),)] == 3000
        assert await trio.to_thread.run_sync(total, server, "plasma_connections_dropped_total") == 0
        errors = await trio.to_thread.run_sync(total, server, "plasma_connection_errors_total")
        assert errors == 0
    finally:
        await clients.close()


@pytest.fixture(params=["plain", "tls"])
def limited_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Server]:
    srv = start_server(tmp_path, tls=request.param == "tls", nofile=256)
    try:
        yield srv
    finally:
        stop_server(srv)


def probes(server: Server) -> dict[str, int]:
    """The status of each probe and of the metrics port, asked once each."""
    verify: ssl.SSLContext | bool = server.client_context or True
    out = {}
    for path in ("/livez", "/readyz", "/hc"):
        out[path] = httpx.get(f"{server.url}{path}", verify=verify, timeout=2).status_code
    for path in ("/metrics", "/livez", "/readyz"):
        out[f"metrics {path}"] = httpx.get(
            f"http://127.0.0.1:{server.ports['metrics']}{path}", timeout=2
        ).status_code
    return out


async def test_at_the_descriptor_limit_the_excess_gets_503_and_the_probes_answer(
    limited_server: Server,
) -> None:
    """256 open files, 400 clients: those that fit are served, the others
    get ``503`` at once (none is reset or left unanswered); /livez, /readyz,
    /hc and the metrics port answer throughout; a gRPC stream gets
    UNAVAILABLE; one warning line names the limit; once the clients have
    gone, new ones are served again."""
    server = limited_server
    limit = await trio.to_thread.run_sync(series, server, "plasma_descriptors_limit")
    assert limit == {(): 256}
    clients = Clients(server, "full")
    answers: list[dict[str, int]] = []
    try:
        async with trio.open_nursery() as nursery:

            async def probe_meanwhile() -> None:
                while True:
                    answers.append(await trio.to_thread.run_sync(probes, server))
                    await trio.sleep(0.05)

            nursery.start_soon(probe_meanwhile)
            outcomes = (await clients.burst(400)).copy()
            while not answers:
                await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        assert set(outcomes) == {"200", "503"}, outcomes
        # (256, less the reserve, the server's own and the refused ones in flight)
        assert outcomes["200"] >= 100, outcomes
        all_ok = dict.fromkeys(
            ("/livez", "/readyz", "/hc", "metrics /metrics", "metrics /livez", "metrics /readyz"),
            200,
        )
        assert all(answer == all_ok for answer in answers), answers
        # The refused clients have closed; one at a time, new ones fill the
        # streams' share exactly, until one is refused.
        for _ in range(100):
            if (await clients.burst(1))["503"] > outcomes["503"]:
                break
        # At the limit: the probes answer, and a gRPC stream is refused.
        assert await trio.to_thread.run_sync(probes, server) == all_ok
        if not server.client_context:
            grpc_stream = GrpcioStream(server.ports["grpc"])
            try:
                grpc_stream.send("full")
                with trio.fail_after(10):
                    _, status = await grpc_stream.rest()
                assert status == grpc.StatusCode.UNAVAILABLE
            finally:
                grpc_stream.close()
        refused = await trio.to_thread.run_sync(series, server, "plasma_streams_refused_total")
        by_descriptors = refused[(("reason", "descriptors"), ("transport", "sse"))]
        assert by_descriptors == clients.outcomes["503"]
        if not server.client_context:
            assert refused[(("reason", "descriptors"), ("transport", "grpc"))] == 1
    finally:
        await clients.close()
    # The clients have gone: new ones are served again.
    deadline = time.monotonic() + 10
    while True:
        again = Clients(server, "again")
        outcomes = await again.burst(50)
        await again.close()
        if outcomes == {"200": 50} or time.monotonic() > deadline:
            break
        await trio.sleep(0.2)
    assert outcomes == {"200": 50}, outcomes
    warnings = [
        json.loads(line)
        for line in server.log_file.read_text().splitlines()
        if "open-file limit" in line
    ]
    assert len(warnings) == 1, warnings  # (at most one every 10 s)
    assert warnings[0]["level"] == "WARNING"
    assert "256" in warnings[0]["msg"]
    assert "ulimit -n" in warnings[0]["msg"]


def test_the_server_process_tunes_its_garbage_collector(tmp_path: Path) -> None:
    """``serve`` freezes what it loaded and makes full collections rare (a
    full collection over thousands of streams' objects every 70,000
    allocations cost a third of a storm's CPU)."""
    server = start_server(tmp_path, tls=False)
    try:
        figures = httpx.get(
            f"http://127.0.0.1:{server.ports['metrics']}/metrics/python", timeout=5
        ).json()
    finally:
        stop_server(server)
    assert figures["gc_threshold"] == [1000, 20, 100]
    assert figures["gc_frozen"] > 10_000  # (the loaded modules' objects)
