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

from tests.grpc_clients import GrpcioStream
from tests.h2_raw import RawH2, grpc_frame, grpc_headers, grpc_request
from tests.server_process import Server, start_server, stop_server

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

pytestmark = pytest.mark.slow

HALF_HEAD = b"GET /?eventType=a HTTP/1.1\r\nHost: localhost\r\nAccept: text/event-stream\r\n"


@pytest.fixture(params=["plain", "tls"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Server]:
    srv = start_server(tmp_path, tls=request.param == "tls", PLASMA_HEADER_TIMEOUT="3s")
    try:
        yield srv
    finally:
        stop_server(srv)


def open_half(server: Server, count: int) -> list[socket.socket]:
    """``count`` connections that start and never finish: half a request head
    (plain) or half a TLS handshake (a ClientHello cut short)."""
    socks = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", server.ports["main"]))
        if server.client_context is None:
            sock.sendall(HALF_HEAD)
        else:
            sock.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # a ClientHello's start
        socks.append(sock)
    return socks


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
            body = json.dumps({"meta": {"type": "hostile"}, "data": 1})
            with httpx.Client(verify=verify, timeout=seconds) as publisher:
                assert publisher.post(f"{server.url}/debug", content=body).status_code == 200
            for line in response.iter_lines():
                if line.startswith("data:"):
                    break
    elapsed = time.monotonic() - started
    assert elapsed < seconds, elapsed
    return elapsed


def test_half_sent_heads_and_handshakes_do_not_keep_others_out(server: Server) -> None:
    """500 connections stuck in their head (or TLS handshake): others are
    served within a second; at PLASMA_HEADER_TIMEOUT the stuck ones are
    closed (a 408 first on plain HTTP), and memory is back near its start."""
    rss_before = server.rss()
    socks = open_half(server, 500)
    try:
        served_within(server, 1.0)
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
        served_within(server, 1.0)
    finally:
        for sock in socks:
            sock.close()
    assert server.rss() - rss_before < 30 * 1024 * 1024


@pytest.mark.parametrize("server", ["plain"], indirect=True)
def test_waiting_heads_are_bounded(server: Server) -> None:
    """Beyond 1,024 connections waiting for their head, each new one drops
    the one waiting longest: a flood cannot fill the port."""
    socks = open_half(server, 1100)
    try:
        time.sleep(0.5)
        dropped = 0
        for sock in socks[:100]:
            sock.settimeout(0.5)
            try:
                if sock.recv(4096) == b"":
                    dropped += 1
            except ConnectionResetError:
                dropped += 1
            except TimeoutError:
                pass
        assert dropped == 1100 - 1024, dropped  # the oldest ones, before any timeout
        served_within(server, 1.0)
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
    stream = GrpcioStream(server.ports["grpc"], credentials=_grpc_credentials(server))
    try:
        stream.send(*(f"t{n}" for n in range(10_000)))
        with pytest.raises(grpc.RpcError) as info:
            next(stream.call)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        stream.close()
    served_within(server, 1.0)


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
