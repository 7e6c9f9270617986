"""Hostile clients that hold connections or send too much (SPEC 10): slow
headers, half TLS handshakes, 10,000 topics, gRPC messages with lying
lengths. A real server process, attacked from raw sockets; other clients
must be served within a second throughout, and the server's memory stays
bounded."""

from __future__ import annotations

import json
import socket
import ssl
import struct
import time
from typing import TYPE_CHECKING

import grpc
import h2.events as h2events
import httpx
import pytest
import trio
from httpx_sse import EventSource
from prometheus_client.parser import text_string_to_metric_families

from plasma_trio.transports.acceptor import BATCH
from tests.grpc_clients import GrpcioStream
from tests.h2_raw import RawH2, grpc_frame, grpc_headers, grpc_request
from tests.server_process import Server, start_server, stop_server

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

pytestmark = pytest.mark.slow

HALF_HEAD = b"GET /?eventType=a HTTP/1.1\r\nHost: localhost\r\nAccept: text/event-stream\r\n"


def serving(request: pytest.FixtureRequest, tmp: Path, header_timeout: str) -> Iterator[Server]:
    srv = start_server(tmp, tls=request.param == "tls", PLASMA_HEADER_TIMEOUT=header_timeout)
    try:
        yield srv
    finally:
        stop_server(srv)


@pytest.fixture(params=["plain", "tls"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Server]:
    yield from serving(request, tmp_path, "3s")


# The ``server`` fixture's PLASMA_HEADER_TIMEOUT: a flood holds until then.
HEADER_TIMEOUT = 3.0
# How long a real client may take with no flood holding (or one that holds
# for a minute, the ``patient_server``'s): a server kept busy by the flood
# would answer only at the header timeout, or not at all.
SERVED = 5.0


def still_held(socks: list[socket.socket]) -> None:
    """None of ``socks`` has been let go yet: whatever was served before this
    was served while they all still waited."""
    assert not dropped_now(socks), "the flood was let go before the check"


HALF_PREFACE = b"PRI * HTTP/2.0\r\n"  # the first half of HTTP/2's client preface
HALF_CLIENT_HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"  # a ClientHello's start


def open_half(server: Server, count: int, port: str = "main") -> list[socket.socket]:
    """``count`` connections that start and never finish: half a request head
    (plain: HTTP/1.1, or half the HTTP/2 preface on the gRPC port)
    or half a TLS handshake (a ClientHello cut short)."""
    socks = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", server.ports[port]))
        if server.client_context is not None:
            sock.sendall(HALF_CLIENT_HELLO)
        else:
            sock.sendall(HALF_PREFACE if port == "grpc" else HALF_HEAD)
        socks.append(sock)
    return socks


def open_silent(server: Server, count: int, port: str) -> list[socket.socket]:
    """``count`` connections that complete their TLS handshake, then send nothing."""
    assert server.client_context is not None
    socks = []
    for _ in range(count):
        raw = socket.create_connection(("127.0.0.1", server.ports[port]))
        socks.append(server.client_context.wrap_socket(raw, server_hostname="localhost"))
    return socks


def dropped(sock: socket.socket, wait: float) -> bool:
    """Whether the server has closed ``sock`` (waiting up to ``wait`` seconds)."""
    deadline = time.monotonic() + wait
    try:
        # (What the server wrote first, e.g. its HTTP/2 SETTINGS, is read past.)
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            if sock.recv(65536) == b"":
                return True
    except TimeoutError:
        return False
    except (ConnectionResetError, ssl.SSLError):
        return True
    return False


def dropped_now(socks: list[socket.socket]) -> list[int]:
    """The indexes of the sockets the server has closed (or reset) by now,
    reading past whatever it wrote first, without waiting."""
    found = []
    for index, sock in enumerate(socks):
        sock.setblocking(False)
        try:
            while sock.recv(65536):
                pass
        except (BlockingIOError, ssl.SSLWantReadError):
            continue
        except (ConnectionResetError, ssl.SSLError):
            pass
        found.append(index)
    return found


def drops(server: Server) -> dict[tuple[str, str], float]:
    """``plasma_connections_dropped_total`` by (port, reason), from /metrics."""
    text = httpx.get(f"http://127.0.0.1:{server.ports['metrics']}/metrics", timeout=5).text
    return {
        (sample.labels["port"], sample.labels["reason"]): sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "plasma_connections_dropped"
        for sample in family.samples
        if sample.name.endswith("_total")
    }


def served_over_grpc_within(server: Server, seconds: float) -> float:
    """A real gRPC client (grpcio) subscribes and gets a published event, timed."""
    started = time.monotonic()
    topic = f"hostile{next(server.topics)}"
    stream = GrpcioStream(server.ports["grpc"], credentials=_grpc_credentials(server))
    try:
        stream.send(topic)
        stream.call.initial_metadata()  # the subscription is live
        verify: ssl.SSLContext | bool = server.client_context or True
        body = json.dumps({"meta": {"type": topic}, "data": 1})
        with httpx.Client(verify=verify, timeout=seconds) as publisher:
            assert publisher.post(f"{server.url}/debug", content=body).status_code == 200
        payload = next(stream.call)
        assert payload.eventType.type == topic, payload
    finally:
        stream.close()
    elapsed = time.monotonic() - started
    assert elapsed < seconds, elapsed
    return elapsed


def served_within(server: Server, seconds: float) -> float:
    """A real client's /hc and a published event through SSE, timed."""
    started = time.monotonic()
    verify: ssl.SSLContext | bool = server.client_context or True
    with httpx.Client(verify=verify, timeout=seconds) as client:
        assert client.get(f"{server.url}/hc").status_code == 200
        with client.stream(
            "GET", f"{server.url}/?eventType=hostile", headers={"Accept": "text/event-stream"}
        ) as response:
            assert response.status_code == 200
            events = EventSource(response).iter_sse()
            assert next(events).retry is not None  # the retry block: subscribed
            body = json.dumps({"meta": {"type": "hostile"}, "data": 1})
            with httpx.Client(verify=verify, timeout=seconds) as publisher:
                assert publisher.post(f"{server.url}/debug", content=body).status_code == 200
            # (A read timeout fails the test; so does the stream's end.)
            assert any(sse.data for sse in events), "the SSE stream ended before the event"
    elapsed = time.monotonic() - started
    assert elapsed < seconds, elapsed
    return elapsed


def test_half_sent_heads_and_handshakes_do_not_keep_others_out(server: Server) -> None:
    """500 connections stuck in their head (or TLS handshake) on the main
    port and 500 on the gRPC port (half an HTTP/2 preface): others are served
    within a second, SSE and gRPC; at PLASMA_HEADER_TIMEOUT the stuck ones
    are closed (a 408 first on plain HTTP). Memory: a stuck connection
    costs at most 128 KiB while it lasts (a TLS handshake is most of it),
    and a second flood mostly reuses the first's memory."""
    rss_before = server.rss()
    flood(server)
    first = server.rss() - rss_before
    assert first < 1000 * 128 * 1024
    # Every stuck connection is counted, on its port, as late (none by the limit).
    counted = drops(server)
    assert (counted["main", "head_timeout"], counted["grpc", "head_timeout"]) == (500, 500)
    assert counted["main", "head_limit"] == counted["grpc", "head_limit"] == 0
    url = f"http://127.0.0.1:{server.ports['metrics']}/metrics/plasma"
    assert httpx.get(url, timeout=5).json()["connections_dropped_head_timeout"] == 1000
    flood(server)
    second = server.rss() - rss_before - first
    assert second < first / 2 + 8 * 1024 * 1024, (first, second)


def flood(server: Server) -> None:
    socks = open_half(server, 500)
    grpc_socks = open_half(server, 500, port="grpc")
    try:
        # Others are served while the flood holds: before the header timeout
        # lets any of it go (the oldest of each port are still there after).
        served_within(server, HEADER_TIMEOUT)
        served_over_grpc_within(server, HEADER_TIMEOUT)
        still_held(socks[:20])
        still_held(grpc_socks[:20])
        time.sleep(3.5)  # the header timeout (3s) passes
        closed = 0
        for sock in socks[:50]:
            sock.settimeout(2)
            data = b""
            try:
                while chunk := sock.recv(4096):
                    data += chunk
            except (ConnectionResetError, TimeoutError):
                pass
            else:
                closed += 1
            if server.client_context is None:
                assert data.startswith(b"HTTP/1.1 408"), data
        assert closed == 50
        assert all(dropped(sock, 2) for sock in grpc_socks[:50])
        served_within(server, SERVED)
        served_over_grpc_within(server, SERVED)
    finally:
        for sock in socks + grpc_socks:
            sock.close()


@pytest.mark.parametrize("server", ["plain"], indirect=True)
def test_waiting_heads_are_bounded(server: Server) -> None:
    """Beyond 1,024 connections waiting for their head, a new one waits in
    the listen backlog until the one waiting longest is slow (has waited
    SLOW_HEAD, capped at half the header timeout), and then replaces it: a
    flood cannot fill the port."""
    socks = open_half(server, 1100)
    try:
        assert_oldest_dropped(socks, server, "main")  # the oldest ones, before any timeout
        served_within(server, HEADER_TIMEOUT)
        # (The request drops one more; the dropped are among the oldest batch.)
        still_held(socks[1100 - 1024 + 1 + BATCH : 1100 - 1024 + 21 + BATCH])
    finally:
        for sock in socks:
            sock.close()


@pytest.mark.parametrize("server", ["tls"], indirect=True)
def test_silent_after_the_handshake_is_late_too(server: Server) -> None:
    """A TLS connection that completes its handshake and then sends nothing
    is closed at PLASMA_HEADER_TIMEOUT (main port: Hypercorn's idle timeout;
    gRPC port: no preface) and counted as late on its port; those that close
    by themselves are not counted, and leave the waiting at once."""
    socks = {port: open_silent(server, 5, port) for port in ("main", "grpc")}
    # Connections that leave by themselves before sending a head are not drops,
    # and stop counting among the waiting at once (1,100 of them evict nobody).
    for _ in range(1100):
        open_silent(server, 1, "main")[0].close()
    for _ in range(3):
        socket.create_connection(("127.0.0.1", server.ports["metrics"])).close()
    try:
        time.sleep(3.5)
        for port, group in socks.items():
            assert all(dropped(sock, 2) for sock in group), port
        counted = drops(server)
        assert (counted["main", "head_timeout"], counted["grpc", "head_timeout"]) == (5, 5)
        assert counted["metrics", "head_timeout"] == 0
        assert counted["main", "head_limit"] == 0
    finally:
        for group in socks.values():
            for sock in group:
                sock.close()


@pytest.mark.parametrize("server", ["plain"], indirect=True)
def test_the_metrics_and_diagnostics_ports_bound_their_heads_too(server: Server) -> None:
    """The side ports have the main port's bounds: 1,100 half heads on the
    metrics port (the 76 oldest dropped by the count bound, the rest at the
    header timeout) and 200 on the diagnostics port (all at the timeout),
    each counted under its port; both ports answer meanwhile."""
    metrics = open_half(server, 1100, port="metrics")
    pprof = open_half(server, 200, port="pprof")
    try:
        assert_oldest_dropped(metrics)
        # Both answer while the flood holds. (This request, arriving while
        # 1,024 wait, drops one more of them.)
        scrape = httpx.get(
            f"http://127.0.0.1:{server.ports['metrics']}/metrics/plasma", timeout=HEADER_TIMEOUT
        )
        dump = httpx.get(
            f"http://127.0.0.1:{server.ports['pprof']}/debug/pprof/goroutine",
            timeout=HEADER_TIMEOUT,
        )
        assert (scrape.status_code, dump.status_code) == (200, 200)
        still_held(pprof[:20])  # not before the timeout
        still_held(metrics[77 + BATCH : 97 + BATCH])
        time.sleep(3.5)  # the header timeout (3s) passes
        assert all(dropped(sock, 2) for sock in metrics[77 + BATCH : 127 + BATCH])
        assert all(dropped(sock, 2) for sock in pprof[:50])
        counted = drops(server)
        assert (counted["metrics", "head_limit"], counted["metrics", "head_timeout"]) == (77, 1023)
        assert (counted["pprof", "head_limit"], counted["pprof", "head_timeout"]) == (0, 200)
    finally:
        for sock in metrics + pprof:
            sock.close()


@pytest.fixture(params=["plain", "tls"])
def patient_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Server]:
    """A header timeout long enough that only the count bound drops."""
    yield from serving(request, tmp_path, "60s")


def assert_oldest_dropped(
    socks: list[socket.socket], server: Server | None = None, port: str = ""
) -> None:
    """Exactly as many connections as are beyond 1,024 are dropped, the
    oldest (each once it has waited SLOW_HEAD, as the next one arrives).
    With ``server``: once the server has counted them all on ``port``, from
    /metrics on the metrics port (a count that cannot go past it: each drop
    takes a new connection beyond 1,024). Without (the flood is on the metrics
    port itself, where each scrape would drop one more): as the sockets show."""
    expected = len(socks) - 1024
    deadline = time.monotonic() + 10
    if server is not None:
        while drops(server).get((port, "head_limit"), 0) < expected:
            assert time.monotonic() < deadline, f"the server counted {drops(server)}"
            time.sleep(0.05)
        assert drops(server)[port, "head_limit"] == expected
    gone: set[int] = set()
    while True:
        gone.update(dropped_now(socks))
        if len(gone) >= expected:
            break
        assert time.monotonic() < deadline, f"{len(gone)} of {expected} dropped: {sorted(gone)}"
        time.sleep(0.1)  # (the server may still be accepting the last ones)
    if server is None:
        time.sleep(0.3)  # (a window for one drop too many to show)
        gone.update(dropped_now(socks))
    # The oldest: the connections of one accept batch start waiting in the
    # order trio runs their tasks (which it shuffles), not their connect order.
    assert len(gone) == expected, sorted(gone)
    assert max(gone) < expected + BATCH, sorted(gone)


@pytest.mark.parametrize(
    ("patient_server", "port"), [("tls", "main"), ("tls", "grpc")], indirect=["patient_server"]
)
def test_waiting_heads_are_bounded_after_the_handshake(patient_server: Server, port: str) -> None:
    """Connections that finish their TLS handshake and then send no request
    head (main port: Hypercorn serves them) or no HTTP/2 preface (gRPC port)
    still count among those waiting: beyond 1,024, each new one drops the one
    waiting longest."""
    server = patient_server
    socks = open_silent(server, 1100, port)
    try:
        assert_oldest_dropped(socks, server, port)
        served_within(server, SERVED)
        served_over_grpc_within(server, SERVED)
    finally:
        for sock in socks:
            sock.close()


@pytest.mark.parametrize("patient_server", ["plain"], indirect=True)
def test_waiting_grpc_prefaces_are_bounded(patient_server: Server) -> None:
    """The gRPC port's own bound: 1,100 half prefaces, the 76 oldest are dropped."""
    socks = open_half(patient_server, 1100, port="grpc")
    try:
        assert_oldest_dropped(socks, patient_server, "grpc")
        served_over_grpc_within(patient_server, SERVED)
    finally:
        for sock in socks:
            sock.close()


def test_oversized_heads_and_ten_thousand_topics(server: Server) -> None:
    """A head over 16 KiB is 431; 10,000 topics (in a head that fits, or in
    one gRPC Request) are refused with a reason; the server carries on."""
    verify: ssl.SSLContext | bool = server.client_context or True
    with httpx.Client(verify=verify, timeout=5) as client:
        big = client.get(
            f"{server.url}/?eventType=a",
            headers={"Accept": "text/event-stream", "X-Pad": "x" * 20000},
        )
        assert big.status_code == 431
        many = ",".join(f"t{n}" for n in range(10_000))
        response = client.post(f"{server.url}/", content=b"")
        assert response.status_code in (404, 405)
        # Too many topics for a head: refused before any subscription exists.
        response = client.get(
            f"{server.url}/?eventType={many}", headers={"Accept": "text/event-stream"}
        )
        assert response.status_code in (400, 414, 431)
    if server.client_context is not None:
        # HTTP/2 (ALPN): the same limit on the head's decoded size.
        with httpx.Client(verify=server.client_context, http1=False, http2=True) as h2client:
            big = h2client.get(
                f"{server.url}/?eventType=a",
                headers={"Accept": "text/event-stream", "X-Pad": "x" * 20000},
            )
            assert (big.http_version, big.status_code) == ("HTTP/2", 431)
            assert h2client.get(f"{server.url}/hc").status_code == 200  # the connection lives on
    stream = GrpcioStream(server.ports["grpc"], credentials=_grpc_credentials(server))
    try:
        stream.send(*(f"t{n}" for n in range(10_000)))
        with pytest.raises(grpc.RpcError) as info:
            next(stream.call)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        stream.close()
    served_within(server, SERVED)


def _grpc_credentials(server: Server) -> grpc.ChannelCredentials | None:
    if server.ca is None:
        return None
    return grpc.ssl_channel_credentials(root_certificates=server.ca.cert_pem.bytes())


async def test_grpc_messages_with_lying_lengths(server: Server) -> None:
    """gRPC length prefixes that claim 4 GiB, a compressed flag without an
    encoding, a message cut short by END_STREAM: each stream ends with an
    error status of its own; the connection and other streams live on."""
    port = server.ports["grpc"]
    context = server.client_context
    h2 = await RawH2.connect(port, context=context, window=1 << 20)
    h2.ack = True
    try:
        authority = f"localhost:{port}"
        headers = grpc_headers(authority)
        if context is not None:
            headers = [(k, "https" if k == ":scheme" else v) for k, v in headers]
        bad = [
            struct.pack(">BI", 0, 0xFFFFFFFF) + b"x" * 10,
            struct.pack(">BI", 1, 5) + b"hello",
            grpc_frame(b"\x0a\x03abc")[:-2],
        ]
        ids = []
        for body in bad:
            ids.append(await h2.request("/proto.StreamService/Events", headers, body))
            h2.conn.end_stream(ids[-1])
            await h2.flush()
        good = await h2.request("/proto.StreamService/Events", headers, grpc_request("fine"))
        with trio.move_on_after(10):
            while not all(h2.ended(i) is not None for i in ids):
                await h2.read_once()
                assert not h2.closed
        assert all(h2.ended(i) is not None for i in ids), [
            (i, h2.ended(i), h2.trailers(i)) for i in ids
        ]
        for stream_id, expected in zip(ids, ("8", "12", "3"), strict=True):
            # (trailers-only responses carry the status in the response headers)
            status = next(
                dict(e.headers).get("grpc-status")
                for e in h2.events
                if isinstance(e, (h2events.ResponseReceived, h2events.TrailersReceived))
                and e.stream_id == stream_id
                and "grpc-status" in dict(e.headers)
            )
            assert status == expected, (stream_id, status)
        verify: ssl.SSLContext | bool = context or True
        async with httpx.AsyncClient(verify=verify) as client:
            body = json.dumps({"meta": {"type": "fine"}, "data": 1})
            assert (await client.post(f"{server.url}/debug", content=body)).status_code == 200
        with trio.fail_after(10):
            while not h2.messages(good):
                await h2.read_once()
    finally:
        await h2.aclose()
