"""A raw HTTP/2 client (the ``h2`` state machine on a trio stream) that really
stops reading: it grants the server a small flow-control window and never
sends WINDOW_UPDATE, so the server's writes to it stall, as they would to a
client whose application stopped consuming.

Used for SSE over HTTP/2 and for gRPC (a ``Request`` framed by hand)."""

from __future__ import annotations

import ssl
import struct
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import trio

from plasma_trio._proto.proto import EventType, Request


def grpc_frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message (not compressed)."""
    return struct.pack(">BI", 0, len(message)) + message


def grpc_request(*topics: str, last_event_id: str = "") -> bytes:
    return grpc_frame(
        bytes(Request(events=[EventType(type=t) for t in topics], last_event_id=last_event_id))
    )


class RawH2:
    """One HTTP/2 connection; ``window`` bytes of flow control per stream, never
    renewed unless ``ack`` is set (then every DATA frame read is acknowledged,
    as a client that consumes does). The h2 state machine checks every frame
    the server sends, flow control included."""

    def __init__(self, stream: trio.abc.Stream, window: int) -> None:
        self.stream = stream
        config = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        self.conn = h2.connection.H2Connection(config=config)
        self.conn.local_settings = h2.settings.Settings(
            client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window}
        )
        self.conn.initiate_connection()
        self.events: list[h2.events.Event] = []
        self.data: dict[int, bytearray] = {}
        self.closed = False
        self.ack = False

    @classmethod
    async def connect(
        cls,
        port: int,
        *,
        context: ssl.SSLContext | None = None,
        window: int = 1024,
        rcvbuf: int = 4096,
    ) -> RawH2:
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        tcp.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, rcvbuf)
        stream: trio.abc.Stream = tcp
        if context is not None:
            context.set_alpn_protocols(["h2"])  # (the caller's context: trust only)
            stream = trio.SSLStream(tcp, context, server_hostname="localhost")
            await stream.do_handshake()
            assert stream.selected_alpn_protocol() == "h2"
        client = cls(stream, window)
        await client.flush()
        return client

    async def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            await self.stream.send_all(data)

    async def request(
        self, path: str, headers: list[tuple[str, str]], body: bytes | None = None
    ) -> int:
        stream_id = self.conn.get_next_available_stream_id()
        self.conn.send_headers(stream_id, [(":path", path), *headers], end_stream=body is None)
        if body is not None:
            self.conn.send_data(stream_id, body)
        await self.flush()
        return stream_id

    async def send_data(self, stream_id: int, body: bytes) -> None:
        self.conn.send_data(stream_id, body)
        await self.flush()

    async def read_once(self) -> None:
        """Read what the server sent (no window is granted unless ``ack``)."""
        data = await self.stream.receive_some(65536)
        if not data:
            self.closed = True
            return
        for event in self.conn.receive_data(data):
            self.events.append(event)
            if isinstance(event, h2.events.DataReceived):
                self.data.setdefault(event.stream_id, bytearray()).extend(event.data)
                if self.ack:
                    self.conn.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id
                    )
        await self.flush()  # SETTINGS and PING acks (and WINDOW_UPDATEs if ack)

    def grant(self, size: int, stream_id: int | None = None) -> None:
        """Open a stream's window (or the connection's) by ``size`` bytes
        (sent with the next :meth:`flush`)."""
        self.conn.increment_flow_control_window(size, stream_id)

    def messages(self, stream_id: int) -> list[bytes]:
        """The complete gRPC messages received on ``stream_id`` so far."""
        data = bytes(self.data.get(stream_id, b""))
        out: list[bytes] = []
        at = 0
        while at + 5 <= len(data):
            flag, size = struct.unpack_from(">BI", data, at)
            assert flag == 0, "compressed flag set"
            if at + 5 + size > len(data):
                break
            out.append(data[at + 5 : at + 5 + size])
            at += 5 + size
        return out

    def ended(self, stream_id: int) -> Any:
        """The event that ended ``stream_id`` (StreamReset or StreamEnded), if any."""
        for event in self.events:
            if (
                isinstance(event, (h2.events.StreamReset, h2.events.StreamEnded))
                and event.stream_id == stream_id
            ):
                return event
        return None

    def answered(self, stream_id: int) -> bool:
        """Whether the response headers of ``stream_id`` have arrived. (A gRPC
        stream gets them at its first Request with topics: the server sets
        those topics in the same step, so it is subscribed from then on.)"""
        return any(
            isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream_id
            for event in self.events
        )

    def trailers(self, stream_id: int) -> dict[str, str]:
        for event in self.events:
            if isinstance(event, h2.events.TrailersReceived) and event.stream_id == stream_id:
                return dict(event.headers)
        return {}

    async def aclose(self) -> None:
        await self.stream.aclose()


def grpc_headers(authority: str) -> list[tuple[str, str]]:
    return [
        (":method", "POST"),
        (":scheme", "http"),
        (":authority", authority),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]


def sse_headers(authority: str, last_event_id: str = "") -> list[tuple[str, str]]:
    headers = [
        (":method", "GET"),
        (":scheme", "https"),
        (":authority", authority),
        ("accept", "text/event-stream"),
    ]
    if last_event_id:
        headers.append(("last-event-id", last_event_id))
    return headers


__all__ = ["RawH2", "grpc_frame", "grpc_headers", "grpc_request", "sse_headers"]
