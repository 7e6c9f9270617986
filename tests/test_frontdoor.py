"""The main port's front door and the SSE fast path: partial writes, resets,
hand-off of keep-alive, pipelined, malformed and h2c requests to Hypercorn,
and 10,000 connect/disconnect cycles."""

from __future__ import annotations

import contextlib
import os
import socket
import struct

import httpx
import trio

from plasma_trio.core.events import Event
from plasma_trio.tasks import live_task_count
from tests.helpers import (
    base_url,
    figures_of,
    make_config,
    running_server,
    wait_for_figure,
    wait_for_task_baseline,
    wait_until,
)

SSE_REQUEST = b"GET /?eventType=t HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n"


async def exchange(
    port: int,
    data: bytes,
    *,
    until: bytes = b"",
    count: int = 1,
    eof: bool = False,
    timeout: float = 5,
) -> bytes:
    """Send raw bytes (then EOF if asked), read until ``until`` appeared ``count``
    times or the server closes."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(data)
    if eof:
        await stream.send_eof()
    got = b""
    with trio.move_on_after(timeout):
        while not (until and got.count(until) >= count):
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            got += chunk
    await stream.aclose()
    return got


async def test_slow_reader_with_tiny_buffer_gets_every_event_in_order() -> None:
    total, size = 300, 8192
    with trio.fail_after(60):
        async with running_server(subscriber_buffer=total + 10) as srv:
            sock = trio.socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            await sock.connect(("127.0.0.1", srv.port))
            await sock.send(SSE_REQUEST)
            await wait_for_figure(srv, "connections_sse", 1)
            for n in range(total):
                await srv.hub.publish(Event("t", b'"' + str(n).encode().rjust(size, b"0") + b'"'))
            # The kernel could not take it all: the rest waits in the backlog.
            body = b""
            while body.count(b"data: ") < total:
                body += await sock.recv(1024)  # slowly, in small pieces
                await trio.sleep(0)
            sock.close()
            ids = [line for line in body.split(b"\n") if line.startswith(b"id: ")]
            assert ids == [f"id: {srv.hub.epoch}-{n}".encode() for n in range(1, total + 1)]
            assert (await figures_of(srv))["subscribers_cut_off_sse"] == 0
            await wait_for_figure(srv, "connections_sse", 0)


async def test_reset_while_a_backlog_is_pending() -> None:
    with trio.fail_after(30):
        async with running_server() as srv:
            baseline = live_task_count()
            for _ in range(10):
                sock = trio.socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                await sock.connect(("127.0.0.1", srv.port))
                await sock.send(SSE_REQUEST)
                await wait_for_figure(srv, "connections_sse", 1)
                for _ in range(100):
                    await srv.hub.publish(Event("t", b'"' + b"r" * 16384 + b'"'))
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()  # RST with the server mid-backlog
                await wait_for_figure(srv, "connections_sse", 0)
                await srv.hub.publish(Event("t", b"1"))  # reaches nobody, fails nothing
            await wait_for_task_baseline(baseline)
            async with httpx.AsyncClient(base_url=base_url(srv)) as client:
                assert (await client.get("/hc")).status_code == 200


async def test_keep_alive_and_pipelined_requests_are_handed_off() -> None:
    with trio.fail_after(20):
        async with running_server() as srv:
            two = b"GET /hc HTTP/1.1\r\nHost: x\r\n\r\nGET /hc HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            got = await exchange(srv.port, two, until=b"ok\n", count=2)
            assert got.count(b"HTTP/1.1 200") == 2
            async with httpx.AsyncClient(base_url=base_url(srv)) as client:
                for _ in range(3):  # one kept-alive connection
                    assert (await client.get("/hc")).status_code == 200
                assert (await client.get("/nowhere")).status_code == 404
                resp = await client.get("/?eventType=", headers={"Accept": "text/event-stream"})
                assert resp.status_code == 400


async def test_head_fed_byte_by_byte_still_takes_the_fast_path() -> None:
    with trio.fail_after(20):
        async with running_server() as srv:
            stream = await trio.open_tcp_stream("127.0.0.1", srv.port)
            for byte in SSE_REQUEST:
                await stream.send_all(bytes([byte]))
            got = b""
            while b"retry:" not in got:
                got += await stream.receive_some(4096)
            assert got.startswith(b"HTTP/1.1 200 OK\r\n")
            await wait_for_figure(srv, "connections_sse", 1)
            await stream.aclose()
            await wait_for_figure(srv, "connections_sse", 0)


async def test_malformed_oversized_and_odd_requests() -> None:
    with trio.fail_after(30):
        async with running_server(debug=True) as srv:
            got = await exchange(srv.port, b"GARBAGE\r\n\r\n", until=b"\r\n\r\n")
            assert got.startswith(b"HTTP/1.1 400")
            huge = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n"
            got = await exchange(srv.port, huge, until=b"\r\n\r\n")
            assert got.startswith(b"HTTP/1.1 431")  # Request Header Fields Too Large
            # An unfinished head, then EOF: answered as Hypercorn would (400), promptly.
            with trio.fail_after(3):
                got = await exchange(srv.port, b"GET / HTTP/1.1\r\nHo", eof=True, timeout=10)
            assert got.startswith(b"HTTP/1.1 400")
            # HTTP/1.0 SSE goes to the Quart path, which still serves it.
            got = await exchange(
                srv.port,
                b"GET /?eventType=a HTTP/1.0\r\nAccept: text/event-stream\r\n\r\n",
                until=b"retry: 2000",
            )
            assert got.startswith(b"HTTP/1.1 200") or got.startswith(b"HTTP/1.0 200")
            # A POST whose body arrives with its head is handed off whole.
            body = b'{"meta":{"type":"p"},"data":1}'
            post = (
                b"POST /debug HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%b"
                % (
                    len(body),
                    body,
                )
            )
            assert (await exchange(srv.port, post, until=b"}")).startswith(b"HTTP/1.1 200")
            assert (await figures_of(srv))["events_received"] == 1
            # h2c with prior knowledge reaches Hypercorn's HTTP/2.
            async with httpx.AsyncClient(http1=False, http2=True, base_url=base_url(srv)) as h2:
                resp = await h2.get("/hc")
                assert resp.http_version == "HTTP/2"
                assert resp.status_code == 200


async def test_ten_thousand_connects_leave_tasks_and_fds_at_baseline() -> None:
    cycles, parallel = 10_000, 100
    with trio.fail_after(300):
        async with running_server() as srv:

            async def one() -> None:
                stream = await trio.open_tcp_stream("127.0.0.1", srv.port)
                await stream.send_all(SSE_REQUEST)
                got = b""
                while b"retry:" not in got:
                    got += await stream.receive_some(4096)
                await stream.aclose()

            await one()
            await wait_for_figure(srv, "connections_sse", 0)
            tasks, fds = live_task_count(), len(os.listdir("/proc/self/fd"))
            for _ in range(cycles // parallel):
                async with trio.open_nursery() as nursery:
                    for _ in range(parallel):
                        nursery.start_soon(one)
            await wait_for_figure(srv, "connections_sse", 0, 20)
            await wait_for_task_baseline(tasks, 20)
            await wait_until(
                lambda: len(os.listdir("/proc/self/fd")) <= fds, 20, "fds back to baseline"
            )
            assert (await figures_of(srv))["topics"] == 0


async def test_backlog_counts_frames_so_a_trickling_reader_is_cut_off() -> None:
    """A client that reads a little at every chance, but slower than events
    arrive, must reach the cut-off bound (the backlog counts undelivered
    frames, however they were written)."""
    from plasma_trio.hub import Hub
    from plasma_trio.session import Ask, admit
    from plasma_trio.transports.sse_fast import SocketWriter
    from plasma_trio.transports.wire import sse_status

    raw_server, client_side = socket.socketpair()
    raw_server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    client_side.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client_side.setblocking(False)
    server_side = trio.socket.from_stdlib_socket(raw_server)
    hub = Hub()
    session = admit(hub, make_config(subscriber_buffer=8), Ask("sse", sse_status, ("t",)))
    sink = SocketWriter(server_side, session)
    with session.subscribed(sink):
        sub, out = session.subscription, session.out
        assert sub is not None
        assert out is not None
        for n in range(5000):
            await hub.publish(Event("t", b'"' + b"x" * 200 + b'"'))
            assert session.queue_depth <= 8
            if sub.was_cut_off:
                break
            if n % 4 == 0:
                with contextlib.suppress(BlockingIOError):
                    client_side.recv(1024)
                out.flush()  # what the connection's task does when writable
        assert sub.was_cut_off, "never cut off: the backlog bound does not hold"
    assert hub.statistics().cut_off["sse"] == 1
    server_side.close()
    client_side.close()


async def test_stalled_client_is_disconnected_at_cut_off() -> None:
    with trio.fail_after(30):
        async with running_server(subscriber_buffer=4) as srv:
            stalled = trio.socket.socket()
            stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            await stalled.connect(("127.0.0.1", srv.port))
            await stalled.send(SSE_REQUEST)
            await wait_for_figure(srv, "connections_sse", 1)
            for _ in range(400):
                await srv.hub.publish(Event("t", b'"' + b"s" * 16384 + b'"'))
                await trio.sleep(0)
            assert (await figures_of(srv))["subscribers_cut_off_sse"] == 1
            # It never reads, yet its connection is gone at once.
            await wait_for_figure(srv, "connections_sse", 0, 5)
            stalled.close()


def _unread(sock: trio.socket.SocketType) -> int:
    """Bytes the kernel holds for ``sock`` that it has not read (FIONREAD)."""
    import fcntl
    import struct
    import termios

    raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    return int(struct.unpack("i", raw)[0])


async def test_stalled_client_on_the_quart_path_cannot_hold_shutdown() -> None:
    """Hypercorn writes under a shielded scope: a client that stopped reading
    would keep a Quart-path stream (TLS, or the fast path off) past any
    cancel. The front door closes such sockets at the end of the budget."""
    with trio.fail_after(30):
        stalled = trio.socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        async with running_server(sse_fast_path=False, shutdown_timeout=2.0) as srv:
            await stalled.connect(("127.0.0.1", srv.port))
            await stalled.send(SSE_REQUEST)
            await wait_for_figure(srv, "connections_sse", 1)
            for _ in range(300):
                await srv.hub.publish(Event("t", b'"' + b"q" * 65536 + b'"'))
                await trio.sleep(0)
            # The client's receive buffer is full and it reads nothing: the
            # response task is stuck in a write.
            await wait_until(lambda: _unread(stalled) >= 4096, 10, "the client's buffer full")
            started = trio.current_time()
        assert trio.current_time() - started < 4.0
        stalled.close()
