"""TLS (SPEC 7): HTTPS with HTTP/1.1 and HTTP/2 (ALPN) on the main port, TLS on gRPC,
checked by clients that verify a throwaway CA."""

from __future__ import annotations

import json
import signal
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
from tests.helpers import running_server
from tests.server_process import Server, start_server, stop_server
from tests.streams import grpcio_subscribed, next_grpc_payload, next_sse_event, sse_subscribed


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
                await sse_subscribed(events)
                await srv.hub.publish(Event("tls:1", b'{"secure":true}'))
                sse = await next_sse_event(events, what="the event over TLS")
                assert json.loads(sse.data)["data"] == {"secure": True}
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
                await grpcio_subscribed(stream)
                await srv.hub.publish(Event("g", b'"over tls"'))
                assert (await next_grpc_payload(stream)).data == '"over tls"'
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


# -- certificate rotation ----------------------------------------------------


def write_pair(ca: trustme.CA, directory: Path, *, key_of: trustme.LeafCert | None = None) -> None:
    """A certificate from ``ca`` (and its key, or ``key_of``'s: a mismatched pair)
    over the server's files, each replaced in one step."""
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    for name, pem in (
        ("cert.pem", leaf.private_key_and_cert_chain_pem),
        ("key.pem", (key_of or leaf).private_key_pem),
    ):
        tmp = directory / f".{name}.new"
        pem.write_to_path(str(tmp))
        tmp.replace(directory / name)


async def handshake_ok(port: int, ca: trustme.CA, *, alpn: str = "http/1.1") -> bool:
    """Whether a new TLS connection presents a certificate that ``ca`` signed."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    context.set_alpn_protocols([alpn])
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    stream = trio.SSLStream(tcp, context, server_hostname="localhost")
    try:
        await stream.do_handshake()
    except trio.BrokenResourceError as exc:
        if isinstance(exc.__cause__, ssl.SSLCertVerificationError):
            return False
        raise
    finally:
        await tcp.aclose()
    return True


NOT_RELOADED = "tls certificate not reloaded: keeping the current one"


async def wait_for_log(server: Server, message: str, timeout: float = 10) -> None:
    """Until the server's error log (JSON lines) has a record of ``message``."""

    def logged() -> bool:
        lines = server.log_file.read_text().splitlines() if server.log_file.exists() else []
        return any(json.loads(line).get("msg") == message for line in lines if line.strip())

    with trio.fail_after(timeout):
        while not logged():
            await trio.sleep(0.05)


async def wait_for_ca(server: Server, ca: trustme.CA, timeout: float = 10) -> None:
    with trio.fail_after(timeout):
        while not (
            await handshake_ok(server.ports["main"], ca)
            and await handshake_ok(server.ports["grpc"], ca, alpn="h2")
        ):
            await trio.sleep(0.05)


async def test_sighup_reloads_the_certificate_and_open_streams_stay(tmp_path: Path) -> None:
    """A new pair on SIGHUP: new connections (HTTPS and gRPC) get it, the
    streams opened before (SSE over HTTP/1.1 and HTTP/2, gRPC) keep
    receiving; then a mismatched pair is refused and the current one kept,
    with the reason logged."""
    server = start_server(tmp_path, tls=True, PLASMA_TLS_RELOAD_INTERVAL="0")
    try:
        assert server.ca is not None
        old_ca, new_ca = server.ca, trustme.CA()
        new_context = ssl.create_default_context()
        new_ca.configure_trust(new_context)
        grpc_stream = GrpcioStream(
            server.ports["grpc"],
            credentials=grpc.ssl_channel_credentials(root_certificates=old_ca.cert_pem.bytes()),
        )
        with trio.fail_after(40):
            async with (
                httpx.AsyncClient(verify=server.client_context or True, timeout=10) as old,
                aconnect_sse(old, "GET", f"{server.url}/?eventType=rot") as stream,
                httpx.AsyncClient(
                    verify=server.client_context or True, timeout=10, http1=False, http2=True
                ) as old_h2,
                aconnect_sse(old_h2, "GET", f"{server.url}/?eventType=rot") as h2_stream,
                httpx.AsyncClient(verify=new_context, timeout=10) as new,
                aclosing(stream.aiter_sse()) as events,
                aclosing(h2_stream.aiter_sse()) as h2_events,
            ):
                assert stream.response.status_code == 200
                assert (h2_stream.response.http_version, h2_stream.response.status_code) == (
                    "HTTP/2",
                    200,
                )
                grpc_stream.send("rot")
                # All three subscribed under the old certificate.
                await sse_subscribed(events)
                await sse_subscribed(h2_events)
                await grpcio_subscribed(grpc_stream)
                write_pair(new_ca, tmp_path)
                await trio.sleep(0.2)  # (a window for a reload that must not happen)
                assert await handshake_ok(server.ports["main"], old_ca)  # not yet: no SIGHUP
                server.proc.send_signal(signal.SIGHUP)
                await wait_for_ca(server, new_ca)
                assert not await handshake_ok(server.ports["main"], old_ca)
                # The streams opened under the old certificate still deliver.
                body = '{"meta":{"type":"rot"},"data":"after"}'
                assert (await new.post(f"{server.url}/debug", content=body)).status_code == 200
                for sse_events in (events, h2_events):
                    sse = await next_sse_event(sse_events, what="the event after the reload")
                    assert json.loads(sse.data)["data"] == "after"
                assert (await next_grpc_payload(grpc_stream)).data == '"after"'
                # A mismatched pair: refused, the current certificate stays.
                third = trustme.CA()
                write_pair(third, tmp_path, key_of=new_ca.issue_cert("localhost"))
                server.proc.send_signal(signal.SIGHUP)
                await wait_for_log(server, NOT_RELOADED)
                assert await handshake_ok(server.ports["main"], new_ca)
                assert await handshake_ok(server.ports["grpc"], new_ca, alpn="h2")
    finally:
        grpc_stream.close()
        records = stop_server(server)
    messages = [record["msg"] for record in records]
    assert messages.count("tls certificate reloaded") == 1
    assert messages.count(NOT_RELOADED) == 1


async def test_changed_files_are_loaded_without_a_signal(tmp_path: Path) -> None:
    """cert-manager style: the files are replaced, the server notices. A pair
    caught half written (the new certificate, the old key) is refused and the
    current one kept, with the reason logged; the next change (the key
    arrives) is tried again and loaded."""
    server = start_server(tmp_path, tls=True, PLASMA_TLS_RELOAD_INTERVAL="100ms")
    try:
        new_ca = trustme.CA()
        write_pair(new_ca, tmp_path)
        await wait_for_ca(server, new_ca)
        third_ca = trustme.CA()
        third = third_ca.issue_cert("localhost", "127.0.0.1")
        replace_file(tmp_path / "cert.pem", third.private_key_and_cert_chain_pem)
        await wait_for_log(server, NOT_RELOADED)  # a poll saw the half-written pair
        await trio.sleep(0.3)  # (later polls, 100 ms apart, must not try it again)
        assert await handshake_ok(server.ports["main"], new_ca)
        assert await handshake_ok(server.ports["grpc"], new_ca, alpn="h2")
        replace_file(tmp_path / "key.pem", third.private_key_pem)
        await wait_for_ca(server, third_ca)
    finally:
        records = stop_server(server)
    messages = [record["msg"] for record in records]
    assert messages.count("tls certificate reloaded") == 2
    assert messages.count(NOT_RELOADED) == 1


def replace_file(path: Path, pem: trustme.Blob) -> None:
    """``pem`` over ``path`` in one step (a rename), as a Secret update does."""
    tmp = path.with_name(f".{path.name}.new")
    pem.write_to_path(str(tmp))
    tmp.replace(path)


async def _tls_sse(server: Server, topic: str) -> tuple[trio.SSLStream[trio.SocketStream], bytes]:
    """A raw HTTP/1.1 SSE client over TLS, subscribed (its retry block read)."""
    assert server.client_context is not None
    context = server.client_context
    context.set_alpn_protocols(["http/1.1"])
    tcp = await trio.open_tcp_stream("127.0.0.1", server.ports["main"])
    stream = trio.SSLStream(tcp, context, server_hostname="localhost")
    await stream.send_all(
        f"GET /?eventType={topic} HTTP/1.1\r\nHost: localhost\r\n"
        "Accept: text/event-stream\r\n\r\n".encode()
    )
    seen = b""
    with trio.fail_after(10):
        while b"retry:" not in seen:
            seen += await stream.receive_some(65536)
    return stream, seen


async def _connections(server: Server) -> int:
    async with httpx.AsyncClient(timeout=5) as client:
        url = f"http://127.0.0.1:{server.ports['metrics']}/metrics/plasma"
        return int((await client.get(url)).json()["connections_sse"])


async def test_tls_fast_path_clients_leave_cleanly_or_not(tmp_path: Path) -> None:
    """SSE over TLS on the fast path: a client that closes with close_notify,
    one that resets, and one that just stops are each noticed at once (the
    gauge goes back), with no event flowing; at shutdown a stream ends with
    its last chunk and a close_notify (the client sees a clean end)."""
    server = start_server(tmp_path, tls=True)
    try:
        polite, head = await _tls_sse(server, "leave")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        rude, _ = await _tls_sse(server, "leave")
        silent, _ = await _tls_sse(server, "leave")
        stays, _ = await _tls_sse(server, "leave")
        assert await _connections(server) == 4
        await polite.aclose()  # close_notify, then the TCP close
        rude.transport_stream.socket.setsockopt(
            trio.socket.SOL_SOCKET, trio.socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
        )
        await rude.transport_stream.aclose()  # RST, no close_notify
        await trio.aclose_forcefully(silent.transport_stream)  # FIN, no close_notify
        with trio.fail_after(10):
            while await _connections(server) != 1:
                await trio.sleep(0.05)
        server.proc.send_signal(signal.SIGTERM)
        tail = b""
        with trio.fail_after(10):
            while chunk := await stays.receive_some(65536):  # b"": a clean close_notify
                tail += chunk
        assert tail.endswith(b"0\r\n\r\n"), tail[-50:]
        await trio.aclose_forcefully(stays)
    finally:
        stop_server(server)
