"""The connection guard (issue 9): what one connection's handler raises is
classified, counted and closed with that connection, over real sockets; the
listener keeps serving, and cancellation is not a failure."""

from __future__ import annotations

import errno
import ssl
from functools import partial

import h11
import pytest
import trio
import trio.testing

from plasma_trio.transports.guard import ConnectionGuard, classify


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (ConnectionResetError(errno.ECONNRESET, "reset"), "client"),
        (trio.BrokenResourceError(), "client"),
        (ssl.SSLError(1, "bad record"), "client"),
        (h11.RemoteProtocolError("bad head"), "client"),
        (ExceptionGroup("x", [trio.BrokenResourceError(), OSError()]), "client"),
        (ExceptionGroup("x", [ExceptionGroup("y", [trio.ClosedResourceError()])]), "client"),
        (trio.BusyResourceError(), "internal"),  # two server tasks on one stream: a bug
        (RuntimeError("bug"), "internal"),
        (ExceptionGroup("x", [trio.BrokenResourceError(), KeyError("bug")]), "internal"),
    ],
)
def test_classify(exc: BaseException, kind: str) -> None:
    assert classify(exc) == kind


async def _serve(guard: ConnectionGuard, handler, *, task_status=trio.TASK_STATUS_IGNORED) -> None:  # type: ignore[no-untyped-def]
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])

    async def contained(stream: trio.SocketStream) -> None:
        await guard.run("main", partial(handler, stream), stream.socket, "127.0.0.1:1")

    await trio.serve_listeners(contained, listeners)


async def test_failing_handlers_are_contained_and_the_listener_serves_on() -> None:
    guard = ConnectionGuard()
    served: list[bytes] = []

    async def handler(stream: trio.abc.Stream) -> None:
        request = await stream.receive_some(100)
        if request == b"bug":
            raise RuntimeError("a bug in one connection's handler")
        if request == b"group":
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.sleep_forever)
                raise ExceptionGroup("stack", [trio.BrokenResourceError("peer went away")])
        if request == b"reset":
            raise ConnectionResetError(errno.ECONNRESET, "reset by peer")
        served.append(request)
        await stream.send_all(b"ok")
        await stream.aclose()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(_serve, guard, handler)
            for request in (b"bug", b"group", b"reset", b"bug"):
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                await stream.send_all(request)
                # The guard closes the failed connection: the client sees EOF.
                assert await stream.receive_some(10) == b""
                await stream.aclose()
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"fine")
            assert await stream.receive_some(10) == b"ok"
            await stream.aclose()
            nursery.cancel_scope.cancel()
    assert served == [b"fine"]
    counts = guard.statistics()
    assert counts["main", "internal"] == 2
    assert counts["main", "client"] == 2
    assert counts["grpc", "client"] == counts["grpc", "internal"] == 0


async def test_cancellation_passes_through_and_is_not_counted() -> None:
    guard = ConnectionGuard()

    async def handler(stream: trio.abc.Stream) -> None:
        await trio.sleep_forever()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(_serve, guard, handler)
            streams = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(3)]
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        assert nursery.cancel_scope.cancelled_caught
    for stream in streams:
        await stream.aclose()
    assert sum(guard.statistics().values()) == 0
