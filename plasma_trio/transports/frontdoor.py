"""The front door of every HTTP port: fast-path SSE, everything else to Hypercorn.

Every connection on ``PLASMA_PORT`` is accepted here, and so is every
connection of the metrics and diagnostics ports (which have no fast path:
Hypercorn serves them from the first byte). Each connection's task runs under
the :class:`~plasma_trio.transports.guard.ConnectionGuard`: whatever it
raises is logged, counted and closed with that connection, never reaching
the server's nursery.

On the main port, the first request head is parsed with httptools
(:class:`~plasma_trio.transports.heads.HeadReader`). A plain
HTTP/1.1 ``GET /`` that asks for ``text/event-stream`` with valid topics,
while the hub accepts subscribers, is served by the fast path
(:mod:`plasma_trio.transports.sse_fast`). Any other connection (``/hc``,
``/debug``, ``/publish``, 4xx and 5xx answers, HTTP/1.0, h2c, malformed
heads, keep-alive and pipelined requests) is handed, with the bytes already
read, to the Quart-trio app on Hypercorn's trio ``TCPServer``, which serves
it exactly as it would have from its own listener. With TLS (or
``PLASMA_SSE_FAST_PATH=false``) every connection goes to Hypercorn from its
first byte (HTTP/1.1 and HTTP/2 through ALPN), SSE included, on the Quart
path; the front door still owns the connections, so that at the end of the
shutdown budget it closes those that are stuck.

The hand-off uses Hypercorn internals, all through
:mod:`plasma_trio.seams.hypercorn` (checked at start-up; Hypercorn pinned).
"""

from __future__ import annotations

import contextlib
import math
import os
from functools import partial
from typing import TYPE_CHECKING, Any

import trio

from plasma_trio.seams import hypercorn as hypercorn_seam
from plasma_trio.seams.hypercorn import (
    ConnectionState,
    Lifespan,
    WorkerContext,
    wrap_app,
)
from plasma_trio.session import Refused
from plasma_trio.transports.acceptor import serve_accepts
from plasma_trio.transports.handoff import Control, HandoffServer
from plasma_trio.transports.heads import (
    HEAD_TOO_LARGE,
    MAX_PENDING_HEADS,
    REQUEST_TIMEOUT,
    Head,
    HeadReader,
    HeadTooLarge,
    PrefixedStream,
    ReplayedTlsStream,
    Waiting,
)
from plasma_trio.transports.http import CONTROL, hypercorn_config
from plasma_trio.transports.listen import stream_options
from plasma_trio.transports.sse_fast import SocketWriter
from plasma_trio.transports.sse_requests import sse_session
from plasma_trio.transports.sse_tls import TlsSocketWriter
from plasma_trio.transports.tls import TlsContext
from plasma_trio.transports.wire import http1_refusal

if TYPE_CHECKING:
    import socket
    import ssl

    from quart_trio import QuartTrio

    from plasma_trio.config import Config
    from plasma_trio.descriptors import Descriptors
    from plasma_trio.hub import Hub
    from plasma_trio.session import Session
    from plasma_trio.transports.guard import ConnectionGuard

__all__ = ["MAX_PENDING_HEADS", "PrefixedStream", "serve_frontdoor"]


class FrontDoor:
    """Owns every connection of one port (see the module docstring).

    ``hub`` is ``None`` on the side ports (metrics, diagnostics), which have
    no fast path: Hypercorn serves their connections from the first byte.
    Each connection runs under ``guard`` (its failures stay with it).
    """

    def __init__(
        self,
        app: QuartTrio,
        config: Config,
        hub: Hub | None,
        guard: ConnectionGuard,
        descriptors: Descriptors,
        *,
        name: str = "main",
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.config = config
        self.hub = hub
        self.guard = guard
        self.descriptors = descriptors
        self.name = name
        self.ssl_context = ssl_context
        self.tls = ssl_context is not None
        self.fast_path = hub is not None and config.sse_fast_path
        self.hc = hypercorn_config(config)
        self.wrapped = wrap_app(app, self.hc.wsgi_max_body_size, "asgi")
        self.context = WorkerContext(None)
        self.lifespan_state: dict[str, Any] = {}
        # Every open connection's socket, so that shutdown can close what is
        # still stuck when the deadline comes (Hypercorn writes under a
        # shielded scope: only closing the socket ends a write to a client
        # that stopped reading).
        self.sockets: set[trio.socket.SocketType] = set()
        # Connections waiting for their client's request head (or TLS
        # handshake), and those handed to Hypercorn: at shutdown, the idle
        # ones are closed at once (a browser's spare or kept-alive connection
        # must not hold the exit).
        self.waiting = Waiting(name, guard, config.header_timeout)
        self.handed_off: dict[trio.socket.SocketType, HandoffServer] = {}
        # HTTP/2 streams to reset (stalled SSE subscribers on the Quart path):
        # resetting one needs the connection's async send path.
        self._resets_in, self._resets_out = trio.open_memory_channel[tuple[Any, int, Any]](math.inf)

    async def _hand_off(
        self, stream: trio.abc.Stream, sock: trio.socket.SocketType, *, head_read: bool = False
    ) -> None:
        """Hypercorn serves the connection from here. Unless the front door
        has read its first head already, the connection still counts among
        those waiting for a head (MAX_PENDING_HEADS) until Hypercorn has one;
        Hypercorn's idle timeout (``PLASMA_HEADER_TIMEOUT``) bounds the wait."""
        state = self.lifespan_state.copy()
        server = HandoffServer(
            self.wrapped,
            self.hc,
            self.context,
            ConnectionState(state),
            stream,  # type: ignore[arg-type]
        )
        # Each request's scope carries (a copy of) this state: how an SSE
        # response on this connection sees and ends a stall of its client.
        state[CONTROL] = Control(self, sock, server)
        self.handed_off[sock] = server
        if not head_read:
            self.waiting.add(sock, sock.close)
            deadline = trio.current_time() + self.config.header_timeout

            def waited(late: bool) -> None:
                if late and trio.current_time() >= deadline:  # (not a shutdown, not a drop)
                    self.guard.dropped(self.name, "head_timeout")
                self.waiting.done(sock)

            server.on_waited = waited
        try:
            await server
        finally:
            self.handed_off.pop(sock, None)
            self.waiting.done(sock)

    def release(self, sock: trio.socket.SocketType, protocol: Any, stream_id: int | None) -> None:
        """End a response now: its client stopped reading.

        HTTP/1.1: the connection is the stream; close it (Hypercorn's write is
        shielded, only a close ends it). HTTP/2: reset just that stream, so
        the other streams of the connection keep flowing.
        """
        if stream_id is not None:
            self._resets_in.send_nowait((protocol, stream_id, sock))
        else:
            sock.close()

    async def reset_streams(self) -> None:
        """Reset the HTTP/2 streams queued by :meth:`release`, one at a time.

        A failure while resetting one stream is that connection's failure:
        counted by the guard, the connection closed, the others go on.
        """
        async for protocol, stream_id, sock in self._resets_out:
            try:
                await self._reset_stream(protocol, stream_id, sock)
            except Exception as exc:
                self.guard.record(self.name, exc)
                sock.close()

    async def _reset_stream(self, protocol: Any, stream_id: int, sock: Any) -> None:
        # As if the client had reset it: the app is told to disconnect
        # (Quart cancels the response), a parked write wakes up.
        if not await hypercorn_seam.reset_stream(protocol, stream_id):
            return  # the stream has ended meanwhile
        with trio.move_on_after(1.0) as scope:
            await hypercorn_seam.flush(protocol)
        if scope.cancelled_caught:
            sock.close()  # the connection itself does not write: close it

    def close_idle(self) -> None:
        """Close the connections that are between requests (shutdown)."""
        self.waiting.drop_all()  # (their wait ends with an error, as a reset would)
        for sock, server in list(self.handed_off.items()):
            if server.idle:
                sock.close()

    def close_all(self) -> None:
        """Close every open connection's socket (the end of the shutdown budget)."""
        for sock in list(self.sockets):
            sock.close()

    def fast_request(self, request: Head, peer: str) -> Session | Refused | None:
        """The admitted session of an SSE request, if the fast path serves it
        (see :func:`~plasma_trio.transports.sse_requests.sse_session`)."""
        if self.hub is None:
            return None
        return sse_session(request, peer, self.config, self.hub)

    async def handle(self, conn: socket.socket, address: Any) -> None:
        """One accepted connection, start to end; its failures stay with it."""
        self.waiting.started()
        sock = trio.socket.from_stdlib_socket(conn)
        host = str(address[0]).removeprefix("::ffff:") if isinstance(address, tuple) else ""
        peer = f"{host}:{address[1]}" if isinstance(address, tuple) else str(address)
        self.sockets.add(sock)
        try:
            await self.guard.run(self.name, partial(self._handle, sock, host), sock, peer)
        finally:
            self.sockets.discard(sock)
            sock.close()
            self.descriptors.closed()

    def _waiting_scope(self, sock: trio.socket.SocketType) -> trio.CancelScope:
        """The scope a connection waits for its client's head (or handshake)
        in: it ends at ``PLASMA_HEADER_TIMEOUT``, or when the port drops it
        as slow (see :class:`~plasma_trio.transports.heads.Waiting`)."""
        scope = trio.CancelScope(deadline=trio.current_time() + self.config.header_timeout)
        self.waiting.add(sock, scope.cancel)
        return scope

    async def _late(self, sock: trio.socket.SocketType, scope: trio.CancelScope) -> None:
        """A head wait that ended without one: late (408), dropped, or left."""
        if trio.current_time() >= scope.deadline:
            self.guard.dropped(self.name, "head_timeout")
            if not self.tls:
                # Best effort (the client may not read): 408, then close.
                with contextlib.suppress(OSError):
                    os.write(sock.fileno(), REQUEST_TIMEOUT)
        sock.close()
        await trio.lowlevel.checkpoint()

    async def _handle(self, sock: trio.socket.SocketType, host: str) -> None:
        if self.ssl_context is not None:
            # TLS (HTTP/1.1 and HTTP/2 by ALPN): the handshake within the
            # header timeout, then Hypercorn serves the connection, SSE
            # included (Quart path; its idle timeout bounds the head).
            stream = trio.SSLStream(
                PrefixedStream(trio.SocketStream(sock), waiting=self.waiting),
                self.ssl_context,
                server_side=True,
                https_compatible=True,
            )
            tls = self.ssl_context.take() if isinstance(self.ssl_context, TlsContext) else None
            with self._waiting_scope(sock) as scope:
                try:
                    await stream.do_handshake()
                finally:
                    self.waiting.done(sock)
            if scope.cancelled_caught:
                await self._late(sock, scope)
                return
            if tls is None or not self.fast_path or stream.selected_alpn_protocol() == "h2":
                await self._hand_off(stream, sock)
                return
            # HTTP/1.1 over TLS: the fast path takes SSE requests here too.
            session = await self._tls_session(stream, sock, host)
            if session is not None:
                await TlsSocketWriter(sock, session, stream, tls).run(self.config)
            return
        if not self.fast_path:
            plain = PrefixedStream(trio.SocketStream(sock), waiting=self.waiting)
            await self._hand_off(plain, sock)
            return
        session = await self._fast_session(sock, host)
        if session is not None:
            # (The stream's life: this frame holds no head, nor its bytes.)
            await SocketWriter(sock, session).run(self.config)

    async def _fast_session(self, sock: trio.socket.SocketType, host: str) -> Session | None:
        """The session of a plain connection whose head the fast path takes;
        ``None`` once anything else is done with it (refused, handed off to
        Hypercorn and served, dropped)."""
        head = await self._read_head(sock)
        if head is None:
            return None
        request, raw = head
        if request is None and not raw:
            return None  # (the client closed without a byte)
        session = self.fast_request(request, host) if request is not None else None
        if isinstance(session, Refused):
            with contextlib.suppress(OSError):  # (small: the socket's buffer takes it)
                os.write(sock.fileno(), http1_refusal(session))
            return None
        if session is None:
            prefixed = PrefixedStream(trio.SocketStream(sock), raw)
            await self._hand_off(prefixed, sock, head_read=True)
        return session

    async def _tls_session(
        self, stream: trio.SSLStream[Any], sock: trio.socket.SocketType, host: str
    ) -> Session | None:
        """:meth:`_fast_session` over TLS: the head read through ``stream``
        (within the header timeout, counted as waiting for the client)."""
        reader = HeadReader()
        head = None
        with self._waiting_scope(sock) as scope:
            try:
                while head is None:
                    head = reader.feed(bytes(await stream.receive_some(65536)))
            except HeadTooLarge:
                with trio.move_on_after(1), contextlib.suppress(trio.BrokenResourceError):
                    await stream.send_all(HEAD_TOO_LARGE)
                return None
            except trio.BrokenResourceError:
                return None  # (the client went away, or broke TLS)
            finally:
                self.waiting.done(sock)
        if head is None:
            await self._late(sock, scope)
            return None
        request, raw = head
        if request is None and not raw:
            return None  # (the client closed without a byte)
        session = self.fast_request(request, host) if request is not None else None
        if isinstance(session, Refused):
            with trio.move_on_after(1), contextlib.suppress(trio.BrokenResourceError):
                await stream.send_all(http1_refusal(session))
            return None
        if session is None:
            await self._hand_off(ReplayedTlsStream(stream, raw), sock, head_read=True)
        return session

    async def _read_head(self, sock: trio.socket.SocketType) -> tuple[Head | None, bytes] | None:
        """The connection's first request head: read as soon as it is in
        (in a storm it is, by the time the connection's task runs); the
        connection counts among those waiting for their client only if it
        is not. ``None``: answered already (431, 408) or dropped."""
        reader = HeadReader()
        fd = sock.fileno()
        try:
            try:
                head = reader.feed(os.read(fd, 65536))
            except BlockingIOError:
                head = None
            if head is not None:
                return head
            waiting = self.waiting
            with self._waiting_scope(sock) as scope:
                try:
                    while True:
                        waiting.park(sock)
                        try:
                            await trio.lowlevel.wait_readable(sock)
                        finally:
                            waiting.unpark(sock)
                        try:
                            data = os.read(fd, 65536)
                        except BlockingIOError:
                            continue
                        if (head := reader.feed(data)) is not None:
                            return head
                finally:
                    self.waiting.done(sock)
            await self._late(sock, scope)  # (the scope ended the wait)
            return None
        except HeadTooLarge:
            with contextlib.suppress(OSError):
                os.write(fd, HEAD_TOO_LARGE)
            return None


async def serve_frontdoor(
    app: QuartTrio,
    config: Config,
    hub: Hub | None,
    sock: socket.socket,
    *,
    shutdown: trio.Event,
    guard: ConnectionGuard,
    descriptors: Descriptors,
    name: str = "main",
    ssl_context: ssl.SSLContext | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve one HTTP port until ``shutdown``: stop accepting, let the streams
    (ended by the hub) and Hypercorn's requests finish within the shutdown
    timeout, then close what is still open.

    The main port passes its ``hub`` (the SSE fast path) and the server's
    ``ssl_context`` (built once, shared with gRPC) when TLS is on; the
    metrics and diagnostics ports pass ``hub=None``. Every connection runs
    under ``guard``; only a failure of the listener itself leaves this task.
    """
    door = FrontDoor(app, config, hub, guard, descriptors, name=name, ssl_context=ssl_context)
    stream_options(sock)  # (the fast path makes no trio SocketStream)
    lifespan = Lifespan(door.wrapped, door.hc, door.lifespan_state)
    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        async with trio.open_nursery() as reaper:
            reaper.start_soon(_close_all_when_cancelled, door)
            async with trio.open_nursery() as connections:
                async with trio.open_nursery() as accepting:
                    accepting.start_soon(
                        partial(
                            serve_accepts,
                            sock,
                            door.handle,
                            connections,
                            waiting=door.waiting,
                            descriptors=descriptors,
                            keep_reserve=hub is not None,
                        )
                    )
                    accepting.start_soon(door.waiting.clock)
                    if door.hub is not None:
                        accepting.start_soon(door.reset_streams)
                    task_status.started()
                    await shutdown.wait()
                    accepting.cancel_scope.cancel()
                sock.close()
                # Hypercorn's keep-alive connections close once idle; the hub
                # has ended the SSE streams. What still runs at the end of the
                # budget is closed, a little before the process-wide deadline,
                # so that the close (not a cancel, which Hypercorn's shielded
                # writes ignore) ends writes to clients that stopped reading.
                await door.context.terminated.set()
                deadline = trio.current_time() + config.shutdown_timeout
                connections.cancel_scope.deadline = deadline
                reaper.start_soon(_reap, door, deadline - min(0.5, config.shutdown_timeout / 10))
            reaper.cancel_scope.cancel()
        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()


async def _close_all_when_cancelled(door: FrontDoor) -> None:
    """If the server is cancelled (a second signal, a failing component), close
    every connection's socket: a write Hypercorn shields would otherwise wait
    for a client that stopped reading for ever, and the cancel never end."""
    try:
        await trio.sleep_forever()
    finally:
        door.close_all()


async def _reap(door: FrontDoor, end: float) -> None:
    """During shutdown: close idle connections as they appear; at ``end``, all."""
    while trio.current_time() < end:
        door.close_idle()
        await trio.sleep(min(0.05, max(0.0, end - trio.current_time())))
    door.close_all()
