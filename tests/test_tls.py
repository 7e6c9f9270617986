"""TLS (SPEC 7): HTTPS with HTTP/1.1 and HTTP/2 (ALPN) on the main port, TLS on gRPC,
checked by clients that verify a throwaway CA."""

from __future__ import annotations

import json
import ssl
from contextlib import AsyncExitStack, aclosing
from pathlib import Path

import grpc
import httpx
import pytest
import trio
import trustme
from httpx_sse import aconnect_sse

from plasma_trio.core.events import Event
from tests.grpc_clients import GrpcioStream
from tests.helpers import running_server, wait_until


@pytest.mark.parametrize("http2", [False, True])
async def test_sse_over_https(ca: trustme.CA, tls_files: dict[str, str], http2: bool) -> None:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    with trio.fail_after(20):
        async with (
            running_server(**tls_files) as srv,
            httpx.AsyncClient(
                verify=context, http2=http2, base_url=f"https://localhost:{srv.port}"
            ) as client,
        ):
            hc = await client.get("/hc")
            assert hc.status_code == 200
            assert hc.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
            async with AsyncExitStack() as stack:
                source = await stack.enter_async_context(
                    aconnect_sse(client, "GET", "/?eventType=tls")
                )
                assert source.response.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
                events = await stack.enter_async_context(aclosing(source.aiter_sse()))
                await wait_until(lambda: bool(srv.hub.subscribers_of("tls")))
                await srv.hub.publish(Event("tls:1", b'{"secure":true}'))
                async for sse in events:
                    if sse.data:
                        assert json.loads(sse.data)["data"] == {"secure": True}
                        break
            # Plain HTTP is not served on a TLS port.
            with pytest.raises(httpx.HTTPError):
                await httpx.AsyncClient().get(f"http://127.0.0.1:{srv.port}/hc")


async def test_grpc_over_tls(ca: trustme.CA, tls_files: dict[str, str]) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=ca.cert_pem.bytes())
    with trio.fail_after(20):
        async with running_server(**tls_files) as srv:
            stream = GrpcioStream(srv.grpc_port, credentials=credentials, host="localhost")
            try:
                stream.send("g")
                await wait_until(lambda: bool(srv.hub.subscribers_of("g")))
                await srv.hub.publish(Event("g", b'"over tls"'))
                assert (await stream.receive()).data == '"over tls"'
            finally:
                stream.close()
            # A client that does not trust the CA is refused.
            untrusted = GrpcioStream(
                srv.grpc_port, credentials=grpc.ssl_channel_credentials(), host="localhost"
            )
            try:
                untrusted.send("g")
                _, code = await untrusted.rest()
                assert code == grpc.StatusCode.UNAVAILABLE
            finally:
                untrusted.close()


def test_unloadable_key_is_a_config_error(tmp_path: Path) -> None:
    import subprocess

    from tests.helpers import PYTHON, free_port, plasma_env

    bogus = tmp_path / "bogus.pem"
    bogus.write_text("not a certificate")
    result = subprocess.run(
        [PYTHON, "-m", "plasma_trio", "serve"],
        env=plasma_env(
            PLASMA_PORT=str(free_port()),
            PLASMA_TLS_CERT_FILE=str(bogus),
            PLASMA_TLS_KEY_FILE=str(bogus),
        ),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "PLASMA_TLS_CERT_FILE" in lines[0]
