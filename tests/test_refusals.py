"""A refused subscriber gets the same answer on every path (issue 21, point 5).

The session decides the refusal; each writer only maps its kind to the
transport's status. Checked through public surfaces: the response (status,
body, ``WWW-Authenticate``) or the gRPC status, and the one access-log line.
Paths: SSE on the plain fast path, on Hypercorn with the fast path off, over
TLS, over HTTP/2, and gRPC (grpcio).
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import grpc
import httpx
import pytest
import trio
from httpx_sse import aconnect_sse

from plasma_trio.session import Refused
from plasma_trio.transports.wire import http1_refusal as refusal
from tests.grpc_clients import GrpcioStream
from tests.helpers import running_server
from tests.streams import sse_subscribed
from tests.test_session import Harness

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    import trustme

WAYS = ["sse", "sse-quart", "sse-tls", "sse-h2", "grpc"]
SSE = {"Accept": "text/event-stream"}


@asynccontextmanager
async def serving(
    way: str, ca: trustme.CA, tls_files: dict[str, str], **settings: Any
) -> AsyncIterator[Harness]:
    """A server reached the way ``way`` names (``sse-quart``: plain, fast path off)."""
    tls = tls_files if way in ("sse-tls", "sse-h2") else {}
    fast = {"sse_fast_path": False} if way == "sse-quart" else {}
    async with running_server(**tls, **fast, **settings) as srv:
        yield Harness(srv, "sse" if way == "sse-quart" else way, ca)


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [
        {**r.__dict__, "message": r.getMessage()}
        for r in caplog.records
        if r.name == "plasma_trio.access"
    ]


async def _refused(h: Harness, client: httpx.AsyncClient, query: str) -> tuple[Any, str]:
    """(status, body) of a subscription that should be refused."""
    if h.way == "grpc":
        stream = GrpcioStream(h.srv.grpc_port)
        try:
            stream.send(*query.split(","))
            got, code = await stream.rest()
            assert got == []
            return code, stream.call.details() or ""
        finally:
            stream.close()
    response = await client.get(f"{h.base}/?eventType={query}", headers=SSE)
    return response.status_code, response.text


@pytest.mark.parametrize("way", WAYS)
async def test_the_connection_limit_is_the_same_refusal_everywhere(
    way: str, ca: trustme.CA, tls_files: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="plasma_trio.access")
    with trio.fail_after(30):
        async with serving(way, ca, tls_files, max_connections=1, debug=True) as h:
            async with h.client() as client:
                # The one allowed subscriber (SSE, the same way in).
                url = f"{h.base}/?eventType=a"
                async with aconnect_sse(client, "GET", url) as holder:
                    events = holder.aiter_sse()  # kept: its finalizer would close the stream
                    await sse_subscribed(events)
                    status, body = await _refused(h, client, "a")
    if way == "grpc":
        assert status == grpc.StatusCode.UNAVAILABLE
        assert body == "connection limit of 1 reached"
    else:
        assert status == 503
        assert body == "Service Unavailable: connection limit of 1 reached\n"
    lines = access_lines(caplog)
    refusals = [line for line in lines if line["ending"].startswith("refused")]
    assert len(refusals) == 1, lines
    line = refusals[0]
    assert line["ending"] == "refused: connection limit of 1 reached"
    assert line["transport"] == ("grpc" if way == "grpc" else "sse")
    assert line["status"] == ("UNAVAILABLE" if way == "grpc" else 503)
    assert line["events"] == 0


@pytest.mark.parametrize("way", ["sse", "sse-quart", "sse-tls", "sse-h2"])
async def test_bad_topics_are_the_same_refusal_on_every_sse_path(
    way: str, ca: trustme.CA, tls_files: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="plasma_trio.access")
    with trio.fail_after(30):
        async with serving(way, ca, tls_files, max_topics=1) as h:
            async with h.client() as client:
                status, body = await _refused(h, client, "a,b")
    assert (status, body) == (400, "Bad Request: more than 1 topics in one subscription\n")
    [line] = access_lines(caplog)
    assert (line["status"], line["ending"]) == (
        400,
        "refused: more than 1 topics in one subscription",
    )


@pytest.mark.parametrize(
    ("kind", "status", "head"),
    [
        ("invalid", 400, b"HTTP/1.1 400 Bad Request\r\n"),
        ("unauthenticated", 401, b"HTTP/1.1 401 Unauthorized\r\n"),
        ("forbidden", 403, b"HTTP/1.1 403 Forbidden\r\n"),
        ("unavailable", 503, b"HTTP/1.1 503 Service Unavailable\r\n"),
    ],
)
def test_the_fast_paths_refusal_bytes_are_the_apps(kind: Any, status: int, head: bytes) -> None:
    """The fast path answers a refusal after locate itself (the Quart app
    answers the others): the same status line, type and body."""
    data = refusal(Refused(kind, "why"))
    assert data.startswith(head)
    head_part, body = data.split(b"\r\n\r\n", 1)
    reason = head.split(b" ", 2)[2].strip()
    assert body == reason + b": why\n"
    assert b"content-type: text/plain; charset=utf-8" in head_part
    assert (b"www-authenticate: Bearer" in head_part) == (status == 401)
