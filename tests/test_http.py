"""/hc, /debug and /publish on the main port (SPEC 5)."""

from __future__ import annotations

import json
from contextlib import AsyncExitStack, aclosing
from typing import TYPE_CHECKING

import httpx
import trio
from httpx_sse import aconnect_sse

from tests.helpers import SSE_HEADERS, base_url, figures_of, running_server
from tests.streams import next_sse_event, sse_subscribed

if TYPE_CHECKING:
    from plasma_trio.app import Running

EVENT = {"meta": {"type": "program:1:views"}, "data": {"views": 3}}


async def test_hc(client: httpx.AsyncClient) -> None:
    with trio.fail_after(10):
        resp = await client.get("/hc")
    assert resp.status_code == 200
    assert resp.text.strip() == "ok"


async def test_debug_is_404_unless_enabled(client: httpx.AsyncClient) -> None:
    with trio.fail_after(10):
        assert (await client.get("/debug")).status_code == 404
        assert (await client.post("/debug", json=EVENT)).status_code == 404


async def test_debug_page_and_publish_into_the_hub() -> None:
    with trio.fail_after(10):
        async with (
            running_server(debug=True) as srv,
            httpx.AsyncClient(base_url=base_url(srv)) as client,
        ):
            page = await client.get("/debug")
            assert page.status_code == 200
            assert page.headers["content-type"].startswith("text/html")
            for needle in ('id="eventType"', 'id="eventData"', "EventSource", '"eventType"'):
                assert needle in page.text
            async with AsyncExitStack() as stack:
                source = await stack.enter_async_context(
                    aconnect_sse(client, "GET", "/?eventType=program")
                )
                events = await stack.enter_async_context(aclosing(source.aiter_sse()))
                await sse_subscribed(events)
                resp = await client.post("/debug", content=json.dumps(EVENT))
                assert resp.status_code == 200
                assert resp.json()["status"] == "ok"
                sse = await next_sse_event(events, what="the event published through /debug")
                assert json.loads(sse.data) == EVENT


async def test_debug_rejects_invalid_events_and_counts_them() -> None:
    with trio.fail_after(10):
        async with (
            running_server(debug=True, max_event_bytes=100) as srv,
            httpx.AsyncClient(base_url=base_url(srv)) as client,
        ):
            for body, reason in [
                (b"not json", "not valid JSON"),
                (b"[]", "not a plasma event"),
                (b'{"meta":{"type":""}}', "meta.type is empty"),
                (
                    json.dumps({"meta": {"type": "a"}, "data": "x" * 200}).encode(),
                    "exceeds the limit",
                ),
            ]:
                resp = await client.post("/debug", content=body)
                assert resp.status_code == 400
                assert reason in resp.text
            assert (await figures_of(srv))["events_invalid"] == 4
            assert (await figures_of(srv))["events_received"] == 0


async def test_publish_needs_token() -> None:
    with trio.fail_after(10):
        async with running_server() as srv, httpx.AsyncClient(base_url=base_url(srv)) as client:
            assert (await client.post("/publish", json=EVENT)).status_code == 404
        async with (
            running_server(publish_token="s3cret") as srv,
            httpx.AsyncClient(base_url=base_url(srv)) as client,
        ):
            for headers in (
                {},
                {"Authorization": "Bearer wrong"},
                {"Authorization": "Basic s3cret"},
            ):
                resp = await client.post("/publish", json=EVENT, headers=headers)
                assert resp.status_code == 401
                assert resp.headers["www-authenticate"].startswith("Bearer")
            # Checked before the body: an invalid body with no token is still 401.
            assert (await client.post("/publish", content=b"garbage")).status_code == 401
            ok = {"Authorization": "Bearer s3cret"}
            assert (
                await client.post("/publish", content=b"garbage", headers=ok)
            ).status_code == 400
            resp = await client.post("/publish", json=EVENT, headers=ok)
            assert resp.status_code == 200
            # The mock source answers the event's id, the one subscribers see.
            assert resp.json() == {
                "status": "ok",
                "type": "program:1:views",
                "id": (await figures_of(srv))["last_event_id"],
            }
            assert (await figures_of(srv))["events_received"] == 1


async def test_hc_is_503_while_shutting_down(server: Running, client: httpx.AsyncClient) -> None:
    with trio.fail_after(10):
        assert (await client.get("/readyz")).status_code == 200  # mock: always delivering
        server.hub.close()
        assert (await client.get("/hc")).status_code == 503
        assert (await client.get("/readyz")).status_code == 503  # drain me
        assert (await client.get("/livez")).status_code == 200  # but do not kill me
        resp = await client.get("/?eventType=a", headers=SSE_HEADERS)
        assert resp.status_code == 503
