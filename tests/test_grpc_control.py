"""The inbound control fast path (``grpc_direct.parse_control``): the same
result as h2's own handling, byte for byte, or h2 handles the read."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import h2.settings
from hypothesis import given, settings
from hypothesis import strategies as st

from plasma_trio.transports.grpc_direct import apply_control, parse_control

MAX_WINDOW = 2**31 - 1


def frame(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    return (
        len(payload).to_bytes(3, "big")
        + bytes([kind, flags])
        + stream_id.to_bytes(4, "big")
        + payload
    )


def ping(opaque: bytes, flags: int = 0) -> bytes:
    return frame(0x6, flags, 0, opaque)


def window_update(stream_id: int, increment: int) -> bytes:
    return frame(0x8, 0, stream_id, increment.to_bytes(4, "big"))


def server_with_stream(closed: bool = False) -> tuple[h2.connection.H2Connection, int]:
    """A server connection after the handshake, with client stream 1 open
    (its request sent, not ended), or closed."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    client.initiate_connection()
    server.initiate_connection()
    client.send_headers(
        1, [(":method", "POST"), (":path", "/x"), (":scheme", "http"), (":authority", "a")]
    )
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    server.send_headers(1, [(":status", "200")])
    if closed:
        server.reset_stream(1)
    server.data_to_send()
    return server, 1


frames = st.lists(
    st.one_of(
        st.binary(min_size=8, max_size=8).map(ping),
        st.tuples(st.sampled_from([0, 1]), st.integers(0, 2**32 - 1)).map(
            lambda t: window_update(*t)
        ),
    ),
    min_size=1,
    max_size=8,
)


def check_same_as_h2(raw: bytes) -> None:
    by_h2, stream_id = server_with_stream()
    ours, _ = server_with_stream()
    control = parse_control(ours, raw)
    try:
        events = by_h2.receive_data(raw)
    except h2.exceptions.ProtocolError:
        assert control is None  # h2's error to report (e.g. an overflowing window)
        return
    if control is None:
        return  # h2's to handle
    assert not any(isinstance(e, h2.events.StreamReset) for e in events)
    assert all(isinstance(e, (h2.events.PingReceived, h2.events.WindowUpdated)) for e in events), (
        events
    )
    apply_control(ours, control)
    assert ours.outbound_flow_control_window == by_h2.outbound_flow_control_window
    assert (
        ours.streams[stream_id].outbound_flow_control_window
        == by_h2.streams[stream_id].outbound_flow_control_window
    )
    assert control.ping_acks() == by_h2.data_to_send()


@given(frames)
@settings(max_examples=300)
def test_the_fast_path_does_what_h2_does(data: list[bytes]) -> None:
    check_same_as_h2(b"".join(data))


def test_anything_else_goes_to_h2() -> None:
    server, stream_id = server_with_stream()
    for raw in (
        window_update(0, 0),  # a zero increment: PROTOCOL_ERROR, h2's to send
        ping(b"12345678", flags=1),  # a PING ACK
        ping(b"1234"),  # a bad length
        frame(0x0, 0, stream_id, b"data"),  # DATA
        window_update(3, 10),  # a stream that does not exist
        window_update(0, 10)[:-1],  # half a frame
        ping(b"12345678") + b"\x00",  # a whole frame and the start of another
        window_update(0, MAX_WINDOW),  # overflows the connection window
        window_update(0, 0x80000001),  # the reserved bit set: h2 refuses it
    ):
        assert parse_control(server, raw) is None, raw
    closed, stream_id = server_with_stream(closed=True)
    assert parse_control(closed, window_update(stream_id, 10)) is None


@given(st.binary(max_size=64))
def test_any_bytes_parse_as_h2_would_or_go_to_h2(raw: bytes) -> None:
    check_same_as_h2(raw)


def test_what_a_receiving_client_sends_takes_the_fast_path() -> None:
    """Not only equal to h2 when taken: taken (with this h2's attributes)."""
    server, stream_id = server_with_stream()
    for raw in (
        ping(b"12345678"),
        window_update(0, 1000),
        window_update(stream_id, 1000),
        window_update(0, 1000) + ping(b"abcdefgh") + window_update(stream_id, 5),
    ):
        assert parse_control(server, raw) is not None, raw
