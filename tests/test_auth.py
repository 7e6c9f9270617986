"""Access control on a running server (SPEC 10), on every way a subscriber
arrives (SSE plain, TLS, HTTP/2 with httpx; gRPC with grpcio and grpclib),
and on /publish. Off by default: the rest of the suite runs without it."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import time
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import grpc
import httpx
import jwt
import pytest
import trio
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from httpx_sse import EventSource, aconnect_sse

from tests.grpc_clients import GrpcioStream
from tests.helpers import figures_of, running_server
from tests.server_process import start_server, stop_server
from tests.streams import grpcio_subscribed, next_grpc_payload, next_sse_event, sse_subscribed
from tests.test_session import WAYS, Harness, harness

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    import trustme

SECRET = "integration-test-secret-0123456789abcdef"
PUBLISH_TOKEN = "static-publish-token"


async def publish(h: Harness, client: httpx.AsyncClient, topic: str, data: Any) -> None:
    """Publish through /publish with the static token (/debug is closed with auth on)."""
    body = json.dumps({"meta": {"type": topic}, "data": data})
    response = await client.post(
        f"{h.base}/publish", content=body, headers={"Authorization": f"Bearer {PUBLISH_TOKEN}"}
    )
    assert response.status_code == 200, response.text


def token(**claims: Any) -> str:
    return jwt.encode({"sub": "alice", **claims}, SECRET, algorithm="HS256")


@asynccontextmanager
async def secured(
    way: str, ca: trustme.CA, tls_files: dict[str, str], tmp_path: Path, **extra: Any
) -> AsyncIterator[Harness]:
    settings = {"publish_token": PUBLISH_TOKEN, **extra}
    async with harness(
        way, ca, tls_files, auth_jwt_key=SECRET, subscriber_write_timeout=5.0, **settings
    ) as h:
        yield h


async def open_sse(
    h: Harness, client: httpx.AsyncClient, topic: str, *, how: str, value: str | None
) -> httpx.Response:
    """The SSE response's status (and the stream, for reading) with a token sent ``how``."""
    url = f"{h.base}/?eventType={topic}"
    headers = {"Accept": "text/event-stream"}
    cookies: dict[str, str] = {}
    if value is not None:
        if how == "header":
            headers["Authorization"] = f"Bearer {value}"
        elif how == "cookie":
            cookies["plasma_token"] = value
        else:
            url += f"&token={value}"
    client.cookies.clear()
    client.cookies.update(cookies)
    request = client.build_request("GET", url, headers=headers)
    return await client.send(request, stream=True)


def access_entries(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    """The access log's records, with every field (as JSON would carry them)."""
    return [
        {**r.__dict__, "message": r.getMessage()}
        for r in caplog.records
        if r.name == "plasma_trio.access"
    ]


@pytest.mark.parametrize("way", WAYS)
async def test_subscribers_need_a_token_that_allows_their_topics(
    way: str,
    ca: trustme.CA,
    tls_files: dict[str, str],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="plasma_trio.access")
    good = token(**{"plasma.subscribe": ["news"], "exp": int(time.time()) + 600})
    with trio.fail_after(40):
        async with secured(way, ca, tls_files, tmp_path) as h, h.client() as client:
            if way == "grpc":
                await _grpc_cases(h, good)
            else:
                for how in ("header", "cookie", "query"):
                    cases = [
                        (None, "news", 401),
                        ("garbage", "news", 401),
                        (token(**{"plasma.subscribe": ["news"], "exp": 1}), "news", 401),
                        (good, "sports", 403),
                        (good, "news,sports", 403),
                        (good, "news:uk", 200),
                    ]
                    for value, topic, status in cases:
                        response = await open_sse(h, client, topic, how=how, value=value)
                        try:
                            assert response.status_code == status, (how, value, topic)
                            if status == 401:
                                assert "Bearer" in response.headers["WWW-Authenticate"]
                        finally:
                            await response.aclose()
                # A granted stream receives events.
                response = await open_sse(h, client, "news", how="query", value=good)
                try:
                    events = EventSource(response).aiter_sse()
                    await sse_subscribed(events)
                    await publish(h, client, "news:uk", "hello")
                    sse = await next_sse_event(events, what="the granted topic's event")
                    assert json.loads(sse.data)["data"] == "hello"
                finally:
                    await response.aclose()
    entries = access_entries(caplog)
    assert entries
    text = repr(entries)
    assert good not in text
    assert "garbage" not in text
    ended = [e for e in entries if "stream ended" in e["message"] and e.get("events")]
    assert ended
    assert all(entry.get("subject") == "alice" for entry in ended)


async def _grpc_cases(h: Harness, good: str) -> None:
    port = h.srv.grpc_port

    async def status_of(metadata: list[tuple[str, str]], *topics: str) -> grpc.StatusCode:
        stream = GrpcioStream(port, metadata=metadata)
        try:
            stream.send(*topics)
            try:
                await stream.receive()
            except grpc.RpcError as exc:
                return exc.code()  # type: ignore[no-any-return]
            return grpc.StatusCode.OK
        finally:
            stream.close()

    assert await status_of([], "news") == grpc.StatusCode.UNAUTHENTICATED
    bad = [("authorization", "Bearer nope")]
    assert await status_of(bad, "news") == grpc.StatusCode.UNAUTHENTICATED
    ok = [("authorization", f"Bearer {good}")]
    assert await status_of(ok, "sports") == grpc.StatusCode.PERMISSION_DENIED
    # The same with grpclib (an asyncio client, in a thread of its own).
    for metadata, topic, expected in (
        ({}, "news", Status.UNAUTHENTICATED),
        ({"authorization": "Bearer nope"}, "news", Status.UNAUTHENTICATED),
        ({"authorization": f"Bearer {good}"}, "sports", Status.PERMISSION_DENIED),
        ({"authorization": f"Bearer {good}"}, "news:uk", Status.OK),
    ):
        got = await trio.to_thread.run_sync(asyncio.run, _grpclib_status(port, metadata, topic))
        assert got == expected, (metadata, topic, got)
    stream = GrpcioStream(port, metadata=ok)
    try:
        stream.send("news")
        await grpcio_subscribed(stream)
        async with httpx.AsyncClient() as client:
            await publish(h, client, "news:uk", "hello")
        assert (await next_grpc_payload(stream)).data == '"hello"'
        # A later Request may not widen the subscription beyond the claim.
        stream.send("news", "sports")
        with pytest.raises(grpc.RpcError) as info:
            await stream.receive()
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        stream.close()


@pytest.mark.parametrize("way", ["sse", "sse-tls", "sse-h2"])
async def test_the_token_cookie_takes_its_name_from_the_setting(
    way: str, ca: trustme.CA, tls_files: dict[str, str], tmp_path: Path
) -> None:
    """PLASMA_AUTH_COOKIE names the cookie a browser's token comes in: the
    fast path (plain) and the Quart path (TLS, HTTP/2) read that one only."""
    good = token(**{"plasma.subscribe": ["news"], "exp": int(time.time()) + 600})
    with trio.fail_after(30):
        async with (
            secured(way, ca, tls_files, tmp_path, auth_cookie="session_jwt") as h,
            h.client() as client,
        ):
            for name, status in (("plasma_token", 401), ("session_jwt", 200)):
                client.cookies.clear()
                client.cookies.set(name, good)
                request = client.build_request(
                    "GET", f"{h.base}/?eventType=news", headers={"Accept": "text/event-stream"}
                )
                response = await client.send(request, stream=True)
                try:
                    assert response.status_code == status, name
                finally:
                    await response.aclose()


async def _grpclib_status(port: int, metadata: dict[str, str], topic: str) -> Status:
    """The status a grpclib stream ends with: subscribe to ``topic``, then forceClose."""
    from grpclib.client import Channel

    from plasma_trio._proto.proto import EventType, Request, StreamServiceStub

    async def requests() -> AsyncIterator[Request]:
        yield Request(events=[EventType(type=topic)])
        yield Request(force_close=True)

    async with Channel("127.0.0.1", port) as channel:
        try:
            async for _ in StreamServiceStub(channel).events(requests(), metadata=metadata):
                pass
        except GRPCError as exc:
            return exc.status
    return Status.OK


@pytest.mark.parametrize("way", WAYS)
async def test_an_open_stream_ends_when_its_token_expires(
    way: str,
    ca: trustme.CA,
    tls_files: dict[str, str],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="plasma_trio.access")
    with trio.fail_after(40):
        async with secured(way, ca, tls_files, tmp_path) as h, h.client() as client:
            # Minted once the server is up: a slow (TLS) start cannot use it up.
            short = token(**{"plasma.subscribe": ["news"], "exp": int(time.time()) + 2})
            started = time.monotonic()
            if way == "grpc":
                stream = GrpcioStream(
                    h.srv.grpc_port, metadata=[("authorization", f"Bearer {short}")]
                )
                try:
                    stream.send("news")
                    _, status = await stream.rest()
                    assert status == grpc.StatusCode.UNAUTHENTICATED
                finally:
                    stream.close()
            else:
                headers = {"Authorization": f"Bearer {short}"}
                async with aconnect_sse(
                    client, "GET", f"{h.base}/?eventType=news", headers=headers
                ) as source:
                    assert source.response.status_code == 200
                    async for _ in source.aiter_sse():
                        pass  # the server ends the stream at exp
            ended_after = time.monotonic() - started
            with trio.fail_after(5):  # the stream is gone from the figures too
                while (await figures_of(h.srv))["connections"]:
                    await trio.sleep(0.05)
    assert 0.5 < ended_after < 6
    if way != "grpc":
        assert any(e.get("ending") == "token expired" for e in access_entries(caplog))


async def test_publish_takes_the_static_token_or_a_jwt_with_the_publish_claim(
    ca: trustme.CA, tls_files: dict[str, str], tmp_path: Path
) -> None:
    body = json.dumps({"meta": {"type": "news:uk"}, "data": 1})
    allowed = token(**{"plasma.publish": ["news"]})
    with trio.fail_after(30):
        async with (
            secured("sse", ca, tls_files, tmp_path, publish_token="static-token") as h,
            httpx.AsyncClient() as client,
        ):
            url = f"{h.base}/publish"

            async def post(value: str | None, content: str = body) -> int:
                headers = {"Authorization": f"Bearer {value}"} if value else {}
                return (await client.post(url, content=content, headers=headers)).status_code

            assert await post(None) == 401
            assert await post("wrong") == 401
            assert await post("static-token") == 200
            assert await post(allowed) == 200
            other = json.dumps({"meta": {"type": "sports"}, "data": 1})
            assert await post(allowed, other) == 403
            assert await post(token(**{"plasma.subscribe": ["news"]})) == 403
            # /debug publishes only as /publish does when access control is on.
            assert (await client.post(f"{h.base}/debug", content=body)).status_code == 401
            headers = {"Authorization": f"Bearer {allowed}"}
            debug = await client.post(f"{h.base}/debug", content=body, headers=headers)
            assert debug.status_code == 200
            assert (await figures_of(h.srv))["events_received"] == 3
    # Without the static token, a JWT alone opens /publish.
    async with (
        secured("sse", ca, tls_files, tmp_path, publish_token="") as h,
        httpx.AsyncClient() as client,
    ):
        response = await client.post(
            f"{h.base}/publish", content=body, headers={"Authorization": f"Bearer {allowed}"}
        )
        assert response.status_code == 200


async def test_open_by_default(ca: trustme.CA, tls_files: dict[str, str]) -> None:
    async with running_server() as srv, httpx.AsyncClient() as client:
        async with client.stream(
            "GET",
            f"http://127.0.0.1:{srv.port}/?eventType=news",
            headers={"Accept": "text/event-stream"},
        ) as response:
            assert response.status_code == 200


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_tokens_never_reach_any_log_line(tmp_path: Path, tls: bool) -> None:
    """A real server process, error log at debug, access log on: tokens sent
    in ?token=, the header, the cookie (SSE: fast path, Quart path, HTTP/2)
    and gRPC metadata, accepted and refused, appear in no line it writes;
    the access log names the subject instead."""
    good = token(**{"plasma.subscribe": ["news"], "exp": int(time.time()) + 600})
    refused = token(**{"plasma.subscribe": ["other"], "exp": int(time.time()) + 600})
    server = start_server(tmp_path, tls=tls, PLASMA_AUTH_JWT_KEY=SECRET)
    try:
        verify: Any = server.client_context or True
        for http2 in (False, True) if tls else (False,):
            with httpx.Client(verify=verify, http1=not http2, http2=http2, timeout=10) as client:
                for value in (good, refused):
                    for how in ("query", "header", "cookie"):
                        url = f"{server.url}/?eventType=news"
                        headers = {"Accept": "text/event-stream"}
                        client.cookies.clear()
                        if how == "query":
                            url += f"&token={value}"
                        elif how == "header":
                            headers["Authorization"] = f"Bearer {value}"
                        else:
                            client.cookies.set("plasma_token", value)
                        with client.stream("GET", url, headers=headers) as response:
                            assert response.status_code == (200 if value == good else 403)
        credentials = (
            grpc.ssl_channel_credentials(root_certificates=server.ca.cert_pem.bytes())
            if server.ca is not None
            else None
        )
        for value in (good, refused):
            stream = GrpcioStream(
                server.ports["grpc"],
                credentials=credentials,
                metadata=[("authorization", f"Bearer {value}")],
            )
            try:
                stream.send("news" if value == good else "news:x", force_close=True)
                with contextlib.suppress(grpc.RpcError):
                    list(stream.call)
            finally:
                stream.close()
    finally:
        records = stop_server(server)
    access = (tmp_path / "access.log").read_text()
    written = access + json.dumps(records)
    assert good not in written
    assert refused not in written
    assert good.split(".")[2] not in written  # not even the signature
    entries = [json.loads(line) for line in access.splitlines()]
    assert any(entry.get("subject") == "alice" for entry in entries), entries


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _forged(header: dict[str, Any], claims: dict[str, Any], secret: bytes | None) -> str:
    """A token built by hand: unsigned (``alg: none``) or HMAC-signed with
    ``secret`` (an attacker's key-confusion attempt: the server's public key as
    the HMAC secret). PyJWT refuses to build either, as it should."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    if secret is None:
        return signing_input + "."
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


@pytest.mark.parametrize("key_kind", ["pem", "jwks"])
@pytest.mark.parametrize("way", WAYS)
async def test_public_keys_audience_and_issuer_through_every_way(
    way: str, key_kind: str, ca: trustme.CA, tls_files: dict[str, str], tmp_path: Path
) -> None:
    """A server started with a PEM public key (RS256) or a JWKS file (ES256,
    key picked by ``kid``), PLASMA_AUTH_JWT_AUDIENCE and _ISSUER: a token
    signed by the key for that audience and issuer is admitted; wrong
    audience, wrong issuer, missing audience, another key, ``alg: none`` and
    the public key used as an HMAC secret are refused, on every way in."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    private: Any
    if key_kind == "pem":
        private, algorithm, headers = (
            rsa.generate_private_key(public_exponent=65537, key_size=2048),
            "RS256",
            {},
        )
        stranger: Any = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        public_text = private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        (tmp_path / "jwt-public.pem").write_bytes(public_text)
        key_setting = str(tmp_path / "jwt-public.pem")
    else:
        private, algorithm, headers = (
            ec.generate_private_key(ec.SECP256R1()),
            "ES256",
            {"kid": "k1"},
        )
        stranger = ec.generate_private_key(ec.SECP256R1())
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(private.public_key()))
        (tmp_path / "jwks.json").write_text(
            json.dumps({"keys": [{**jwk, "kid": "k1", "alg": "ES256"}]})
        )
        public_text = (tmp_path / "jwks.json").read_bytes()
        key_setting = str(tmp_path / "jwks.json")
    claims = {
        "sub": "alice",
        "aud": "plasma-clients",
        "iss": "https://login.example",
        "exp": int(time.time()) + 600,
        "plasma.subscribe": ["news"],
    }

    def signed(key: Any, **changes: Any) -> str:
        body = {k: v for k, v in {**claims, **changes}.items() if v is not None}
        return jwt.encode(body, key, algorithm=algorithm, headers=headers or None)

    refused = {
        "wrong audience": signed(private, aud="someone-else"),
        "no audience": signed(private, aud=None),
        "wrong issuer": signed(private, iss="https://evil.example"),
        "another key": signed(stranger),
        "alg none": _forged({"alg": "none", "typ": "JWT", **headers}, claims, None),
        "public key as HMAC secret": _forged(
            {"alg": "HS256", "typ": "JWT", **headers}, claims, public_text
        ),
    }
    good = signed(private)
    with trio.fail_after(40):
        async with harness(
            way,
            ca,
            tls_files,
            debug=False,
            auth_jwt_key=key_setting,
            auth_jwt_audience="plasma-clients",
            auth_jwt_issuer="https://login.example",
            publish_token=PUBLISH_TOKEN,
        ) as h:
            if way == "grpc":
                for name, value in refused.items():
                    code = await _grpcio_status(h, value, "news")
                    assert code == grpc.StatusCode.UNAUTHENTICATED, name
                assert await _grpcio_status(h, good, "news") == grpc.StatusCode.OK
                return
            async with h.client() as client:
                for name, value in refused.items():
                    response = await open_sse(h, client, "news", how="header", value=value)
                    try:
                        assert response.status_code == 401, name
                    finally:
                        await response.aclose()
                response = await open_sse(h, client, "news", how="header", value=good)
                try:
                    assert response.status_code == 200
                    events = EventSource(response).aiter_sse()
                    await sse_subscribed(events)
                    await publish(h, client, "news", "signed")
                    sse = await next_sse_event(events, what="the signed client's event")
                    assert json.loads(sse.data)["data"] == "signed"
                finally:
                    await response.aclose()


async def _grpcio_status(h: Harness, value: str, topic: str) -> grpc.StatusCode:
    """The status a grpcio stream with ``value`` as its bearer token ends
    with (a refused one at once), or OK once an event published to ``topic``
    arrives on it."""
    stream = GrpcioStream(h.srv.grpc_port, metadata=[("authorization", f"Bearer {value}")])
    try:
        stream.send(topic)
        call = stream.call
        with trio.fail_after(10):
            # The response headers: subscribed, or a refusal (trailers only).
            await trio.to_thread.run_sync(call.initial_metadata, abandon_on_cancel=True)
        if call.done():
            return call.code()  # type: ignore[no-any-return]
        async with httpx.AsyncClient() as client:
            await publish(h, client, topic, "signed")
        assert (await next_grpc_payload(stream, what="the signed client's event")).data == (
            '"signed"'
        )
        return grpc.StatusCode.OK
    finally:
        stream.close()
