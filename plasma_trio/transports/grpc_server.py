"""The gRPC server: grpclib's asyncio server, with our HTTP/2 connection.

:func:`serve_grpc` runs grpclib's ``Server`` on the trio-asyncio loop that
``app.serve`` opens around the root nursery, so it is started, supervised
and stopped by the same nursery as everything else; the streams themselves
are :class:`~plasma_trio.transports.grpc.StreamService`'s.

Per connection (:class:`_Protocol`, grpclib's ``H2Protocol`` subclassed):
our HTTP/2 settings (MAX_CONCURRENT_STREAMS), the direct frame writer of
:mod:`~plasma_trio.transports.grpc_direct` (a read of PINGs and
WINDOW_UPDATEs only is answered without h2's general path), containment
(a connection's failure is counted and closes that connection only), and
the bound on connections that have not sent their preface yet
(:class:`GrpcHeads`, with TLS handshakes run where they can be counted:
:class:`_TlsAccept`). grpclib's undocumented objects are reached through
:mod:`plasma_trio.seams.grpclib` only, asyncio's TLS protocol through
:mod:`plasma_trio.seams.asyncio_tls`.

``grpc.health.v1.Health`` (``""`` and ``proto.StreamService``, SERVING while
the source is healthy) and server reflection (v1 and v1alpha, from the
descriptor set generated next to the messages) are served on the same port.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import socket
import weakref
from typing import TYPE_CHECKING, Any, Final

import trio
import trio_asyncio
from google.protobuf import descriptor_pb2, descriptor_pool
from grpclib.encoding.proto import ProtoCodec
from grpclib.health.check import ServiceStatus
from grpclib.health.service import Health
from grpclib.protocol import H2Protocol
from grpclib.reflection.service import ServerReflection
from h2.events import RemoteSettingsChanged
from h2.settings import SettingCodes

from plasma_trio.logs import ERROR
from plasma_trio.seams import asyncio_tls
from plasma_trio.seams import grpclib as grpclib_seam
from plasma_trio.transports.grpc import StreamService
from plasma_trio.transports.grpc_direct import (
    ConnectionWriter,
    Control,
    FrameBatch,
    apply_control,
    parse_control,
    register_writer,
)
from plasma_trio.transports.grpc_heads import GrpcHeads

if TYPE_CHECKING:
    import ssl

    from h2.connection import H2Connection

    from plasma_trio.config import Config
    from plasma_trio.descriptors import Descriptors
    from plasma_trio.hub import Hub
    from plasma_trio.sources import Source
    from plasma_trio.transports.guard import ConnectionGuard

__all__ = ["PassThroughCodec", "serve_grpc"]

_log = ERROR.getChild("grpc")


class PassThroughCodec(ProtoCodec):
    """grpclib's proto codec, except that ``bytes`` are sent as they are (pre-encoded)."""

    def encode(self, message: Any, message_type: Any) -> bytes:
        if isinstance(message, bytes):
            return message
        return super().encode(message, message_type)


# Streams are long-lived, and proxies (Envoy, linkerd) multiplex many clients
# over one HTTP/2 connection: h2's default of 100 concurrent streams per
# connection would queue the 101st subscriber. The Go server allowed ~2**32.
MAX_CONCURRENT_STREAMS: Final = 1 << 20
# asyncio's TLS read buffer per gRPC connection (see _TlsAccept): asyncio's
# TLS protocol allocates it (256 KiB by default) for every connection up
# front, handshake pending or not; gRPC subscribers read little (Requests,
# PINGs, window updates): 32 KiB (two TLS records) is plenty.
TLS_READ_BUFFER: Final = 32 * 1024


class _Protocol(H2Protocol):
    """grpclib's HTTP/2 connection, with our settings, a ``lost`` event for
    shutdown, and containment: a connection's failure is counted by the
    :class:`ConnectionGuard` and closes that connection only.

    grpclib already answers an HTTP/2 protocol error (garbage, a bad frame
    length, a broken preface) by closing the connection; we count those as
    client errors. Anything else its callbacks raise would reach the asyncio
    loop's exception handler with the connection left open: here it is
    recorded as an internal error and the connection is aborted.
    """

    lost: asyncio.Event
    guard: ConnectionGuard | None = None
    batch: FrameBatch | None = None
    peer = ""
    # The server's register of connections still waiting for their HTTP/2
    # preface (see GrpcHeads), and when this one was accepted.
    heads: GrpcHeads | None = None
    accepted = 0.0
    # TLS: asyncio hands over the first application data with the end of the
    # handshake, before _TlsAccept can call connection_made; kept until then.
    made = False
    early: list[bytes] | None = None
    # The connection's direct frame writer (with a batch: our server's connections).
    writer: ConnectionWriter | None = None
    # The process's open-file budget, which counts this connection until it is lost.
    descriptors: Descriptors | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.lost = asyncio.Event()
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # asyncio and grpclib set TCP_NODELAY only on sockets whose proto
            # is IPPROTO_TCP, and a socket from socket.create_server has proto
            # 0: without this, Nagle holds each write until the client's
            # delayed ACK (up to 40 ms) whenever events come faster than that.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peername = transport.get_extra_info("peername")
        if isinstance(peername, tuple):
            self.peer = f"{str(peername[0]).removeprefix('::ffff:')}:{peername[1]}"
        super().connection_made(transport)
        connection = self.connection
        h2 = grpclib_seam.h2_connection(connection)
        if self.batch is not None:
            self.writer = ConnectionWriter(
                self.batch, connection, h2, grpclib_seam.transport(connection), self._record
            )
            register_writer(connection, self.writer)
        h2.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS})
        connection.flush()
        if self.heads is not None:
            self.heads.admit(self, transport, self.accepted)
        self.made = True
        early, self.early = self.early, None
        for data in early or ():
            self.data_received(data)

    @property
    def waiting_head(self) -> bool:
        return self.heads is not None and self in self.heads.waiting

    def head_received(self, events: list[Any]) -> None:
        """The client's preface and SETTINGS are in: it no longer counts as waiting."""
        if self.heads is not None and any(isinstance(e, RemoteSettingsChanged) for e in events):
            self.heads.done(self)

    def data_received(self, data: bytes) -> None:
        if not self.made:
            self.early = [*(self.early or ()), data]
            return
        try:
            writer = self.writer
            if writer is None or self.waiting_head:
                self._feed(data)
                return
            h2 = grpclib_seam.h2_connection(self.connection)
            control = parse_control(h2, data)
            if control is None:
                self._feed(data)
            else:
                self._control(writer, h2, control)
            if writer.pending:
                writer.drain()  # a WINDOW_UPDATE may have come
        except Exception as exc:
            self._record(exc)
            self.connection.close()

    def _feed(self, data: bytes) -> None:
        """grpclib's handling of a read (h2, then its events), with a protocol
        error counted (grpclib closes the connection) and the client's
        preface and SETTINGS noticed."""
        grpclib_seam.feed(self, data, self._record, self._events)

    def _events(self, events: list[Any]) -> None:
        if self.waiting_head:
            self.head_received(events)

    def _control(self, writer: ConnectionWriter, h2: H2Connection, control: Control) -> None:
        """A read of PINGs and WINDOW_UPDATEs only: what h2 and grpclib would
        do with it, without their general path (see ``parse_control``)."""
        apply_control(h2, control)
        grpclib_seam.wake_senders(
            self, bool(control.connection_increment), control.stream_increments
        )
        if control.pings:
            writer.defer(control.ping_acks())  # (with the next frames: see ACK_DELAY)

    def resume_writing(self) -> None:
        super().resume_writing()
        writer = self.writer
        if writer is not None and writer.pending:
            writer.drain()

    def _record(self, exc: BaseException) -> None:
        if self.guard is not None:
            self.guard.record("grpc", exc, peer=self.peer)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.heads is not None:
            self.heads.done(self)
        if self.descriptors is not None:
            self.descriptors.closed()
            self.descriptors = None
        if not self.made:
            return  # lost between the TLS handshake and connection_made
        super().connection_lost(exc)
        self.lost.set()

    def goaway(self) -> None:
        """Tell the client this connection is done (GOAWAY); it hangs up when it has read all."""
        connection = self.connection
        if connection.is_closing():
            return
        grpclib_seam.goaway(connection)


class _TlsAccept(asyncio.Protocol):
    """A TLS connection of the gRPC port until its handshake completes.

    asyncio's ``create_server(ssl=...)`` would run the handshake out of our
    sight (nothing can count or drop a connection that has not completed
    it, and each holds a TLS read buffer), so the port listens plain and
    this protocol upgrades each connection with ``loop.start_tls``, counted
    among the waiting connections (:class:`GrpcHeads`) from its accept. Once
    the handshake is done, grpclib's protocol takes the TLS transport.
    """

    def __init__(self, app: _Protocol, context: ssl.SSLContext, heads: GrpcHeads) -> None:
        self.app = app
        self.context = context
        self.heads = heads
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        # No read until start_tls has put its protocol in place.
        transport.pause_reading()
        self.heads.admit(self, transport, self.app.accepted)
        self.task = asyncio.ensure_future(self._upgrade(transport))

    async def _upgrade(self, transport: asyncio.Transport) -> None:
        loop = asyncio.get_running_loop()
        left = max(0.001, self.app.accepted + self.heads.timeout - loop.time())
        try:
            # loop.start_tls, with our (smaller) TLS read buffer.
            tls = await asyncio_tls.start_tls(
                transport,
                self.app,
                self.context,
                read_buffer=TLS_READ_BUFFER,
                ssl_handshake_timeout=left,
            )
        except OSError:  # (ssl.SSLError, TimeoutError, ConnectionError among them)
            if self in self.heads.waiting and loop.time() >= self.app.accepted + self.heads.timeout:
                # asyncio's own handshake timeout came first (same deadline).
                self.heads.guard.dropped("grpc", "head_timeout")
            transport.abort()  # a failed, late or dropped handshake: nothing else to report
            if self.app.descriptors is not None:
                self.app.descriptors.closed()
                self.app.descriptors = None
            return
        finally:
            self.heads.done(self)
        if tls is None or tls.is_closing():
            return
        self.app.connection_made(tls)

    def connection_lost(self, exc: BaseException | None) -> None:
        # (Only before start_tls took the transport over.)
        self.heads.done(self)


class _Server(grpclib_seam.Server):
    """grpclib's server with our protocol (our HTTP/2 settings, see
    MAX_CONCURRENT_STREAMS; the direct writer; the bound on heads), TLS
    handshakes we can see (:class:`_TlsAccept`), and which also closes its
    client connections when it stops (grpclib leaves them to the garbage
    collector)."""

    def __init__(
        self,
        *args: Any,
        guard: ConnectionGuard,
        batch: FrameBatch,
        header_timeout: float,
        descriptors: Descriptors,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.descriptors = descriptors
        self.protocols: weakref.WeakSet[_Protocol] = weakref.WeakSet()
        self.guard = guard
        self.batch = batch
        self.heads = GrpcHeads(header_timeout, guard)
        self.tls: ssl.SSLContext | None = None

    async def listen(
        self, sock: socket.socket, ssl_context: ssl.SSLContext | None, backlog: int
    ) -> None:
        """grpclib's ``start`` on a bound socket; with TLS, each connection's
        handshake runs in a :class:`_TlsAccept` (bounded like a head)."""
        self.tls = ssl_context
        await self.start(sock=sock, backlog=backlog)

    def accept(self) -> asyncio.BaseProtocol:
        protocol = self.new_protocol(_Protocol)
        protocol.guard = self.guard
        protocol.batch = self.batch
        protocol.heads = self.heads
        protocol.accepted = asyncio.get_running_loop().time()  # (this runs at accept)
        protocol.descriptors = self.descriptors
        self.descriptors.opened()
        self.protocols.add(protocol)
        if self.tls is not None:
            return _TlsAccept(protocol, self.tls, self.heads)
        return protocol

    async def close_connections(self, grace: float) -> None:
        """GOAWAY every client, give them ``grace`` seconds to hang up (so the
        last trailers are read, not reset), then close what remains."""
        protocols = [p for p in self.protocols if hasattr(p, "lost")]
        for protocol in protocols:
            protocol.goaway()
        waiting = [asyncio.ensure_future(p.lost.wait()) for p in protocols if not p.lost.is_set()]
        if waiting:
            _, pending = await asyncio.wait(waiting, timeout=grace)
            for future in pending:
                future.cancel()
        for protocol in protocols:
            if not protocol.connection.is_closing():
                protocol.connection.close()


def _reflection_pool() -> descriptor_pool.DescriptorPool:
    """A descriptor pool for server reflection: stream.proto (from the descriptor
    set generated next to the messages) plus the health and reflection protos.

    A pool of our own, not protobuf's default one, so that an application
    embedding plasma-trio may load its own ``stream_pb2`` without a clash.
    """
    from grpclib.health.v1 import health_pb2
    from grpclib.reflection.v1 import reflection_pb2
    from grpclib.reflection.v1alpha import reflection_pb2 as reflection_v1alpha_pb2

    pool = descriptor_pool.DescriptorPool()
    for module in (health_pb2, reflection_pb2, reflection_v1alpha_pb2):
        file_proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(file_proto)
        pool.Add(file_proto)
    raw = importlib.resources.files("plasma_trio._proto").joinpath("stream.desc").read_bytes()
    for file_proto in descriptor_pb2.FileDescriptorSet.FromString(raw).file:
        pool.Add(file_proto)
    return pool


async def serve_grpc(
    config: Config,
    hub: Hub,
    source: Source,
    sock: socket.socket,
    *,
    shutdown: trio.Event,
    guard: ConnectionGuard,
    descriptors: Descriptors,
    ssl_context: ssl.SSLContext | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the gRPC server on the bound ``sock`` until ``shutdown``; reports the port.

    ``ssl_context`` is the server's one TLS context (``transports/tls.py``).

    Must run inside ``trio_asyncio.open_loop()``. After ``shutdown`` the hub
    has ended every stream (status OK); this waits for them to finish, then
    closes the server (cancelling stragglers).
    """
    health_status = ServiceStatus()
    health_status.set(True)
    stream_service = StreamService(config, hub)
    services: list[Any] = [stream_service, Health({stream_service: [health_status]})]
    services = ServerReflection.extend(services, pool=_reflection_pool())
    batch = FrameBatch()
    server = _Server(
        services,
        codec=PassThroughCodec(),
        guard=guard,
        batch=batch,
        header_timeout=config.header_timeout,
        descriptors=descriptors,
    )
    # Only grpclib runs on the asyncio loop: whatever its callbacks raise
    # (reported to the loop's exception handler, never to trio) is a gRPC
    # connection's failure, logged and counted like the others.
    loop: asyncio.AbstractEventLoop = trio_asyncio.current_loop.get()  # type: ignore[assignment]
    loop.set_exception_handler(
        lambda _loop, context: guard.record(
            "grpc", context.get("exception") or RuntimeError(context.get("message", "?"))
        )
    )
    await trio_asyncio.aio_as_trio(server.listen)(sock, ssl_context, config.listen_backlog)  # type: ignore[no-untyped-call]
    port = int(sock.getsockname()[1])
    _log.info("grpc serving", extra={"port": port})
    # The fan-out writes the direct path's frames after each slice.
    hub.add_flusher(batch.flush)
    deadline: float | None = None
    try:
        task_status.started(port)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_track_health, source, health_status, shutdown)
            await shutdown.wait()
            deadline = trio.current_time() + config.shutdown_timeout
            health_status.set(False)
            # The hub has closed every stream's sink; let the handlers finish,
            # keeping a little of the budget for the GOAWAY below.
            with trio.move_on_at(deadline - min(1.0, config.shutdown_timeout / 4)):
                # The handlers end on the asyncio side (after grpclib has sent
                # their OK trailers), which has no trio.Event to signal; a
                # short poll during shutdown only is simplest.
                while hub.statistics().connections["grpc"] or not server.idle():  # noqa: ASYNC110
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    finally:
        server.close()
        # Shielded (a cancelled nursery must still close the server), but
        # within the shutdown budget as a whole.
        end = deadline if deadline is not None else trio.current_time() + config.shutdown_timeout
        with trio.CancelScope(shield=True), trio.move_on_at(end):
            await trio_asyncio.aio_as_trio(server.wait_closed)()  # type: ignore[no-untyped-call]
            grace = max(0.0, min(1.0, end - trio.current_time()))
            await trio_asyncio.aio_as_trio(server.close_connections)(grace)  # type: ignore[no-untyped-call]


async def _track_health(source: Source, status: ServiceStatus, shutdown: trio.Event) -> None:
    while not shutdown.is_set():
        status.set(await source.healthy())
        await trio.sleep(1.0)
