"""Event parsing and SSE framing (SPEC 1, 2): pure, property-tested."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from plasma_trio.core.events import Event, InvalidEvent, make_event, parse
from plasma_trio.core.sse import HEARTBEAT, accepts_event_stream, encode_event, encode_retry

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
event_types = st.text(min_size=1, max_size=30)


def wire(
    event_type: Any, data: Any = None, *, with_data: bool = True, indent: int | None = None
) -> bytes:
    body: dict[str, Any] = {"meta": {"type": event_type}}
    if with_data:
        body["data"] = data
    return json.dumps(body, indent=indent, ensure_ascii=False).encode()


@given(st.binary(max_size=300))
def test_parse_never_raises_on_bytes(body: bytes) -> None:
    assert isinstance(parse(body), Event | InvalidEvent)


@given(st.text(max_size=300))
def test_parse_never_raises_on_text(body: str) -> None:
    assert isinstance(parse(body), Event | InvalidEvent)


@given(event_types, json_values, st.sampled_from([None, 2]))
def test_valid_events_keep_type_and_data(event_type: str, data: Any, indent: int | None) -> None:
    event = parse(wire(event_type, data, indent=indent))
    assert isinstance(event, Event)
    assert event.type == event_type
    assert event.data is not None
    assert json.loads(event.data) == data
    # SSE's data is compact, one line, and the same JSON value.
    line = event.to_wire()
    assert b"\n" not in line
    assert b"\r" not in line
    assert json.loads(line) == {"meta": {"type": event_type}, "data": data}


def test_data_is_kept_exactly_as_published() -> None:
    body = b'{"meta":{"type":"a"},"data": {"n": 1.50, "s": "\\u00e9"}}'
    event = parse(body)
    assert isinstance(event, Event)
    assert event.data == b'{"n": 1.50, "s": "\\u00e9"}'
    assert event.compact_data() == b'{"n":1.50,"s":"\\u00e9"}'


def test_string_data_stays_a_string() -> None:
    event = parse(wire("a", "x"))
    assert isinstance(event, Event)
    assert event.data == b'"x"'
    assert event.to_wire() == b'{"meta":{"type":"a"},"data":"x"}'


def test_missing_data_is_null_on_sse() -> None:
    event = parse(wire("a", with_data=False))
    assert event == Event(type="a", data=None)
    assert event.to_wire() == b'{"meta":{"type":"a"},"data":null}'
    explicit_null = parse(wire("a", None))
    assert isinstance(explicit_null, Event)
    assert explicit_null.data == b"null"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "not valid JSON"),
        (b"{", "not valid JSON"),
        (b"not json", "not valid JSON"),
        (b"[1,2]", "not a plasma event"),
        (b'"string"', "not a plasma event"),
        (b"{}", "not a plasma event"),
        (b'{"meta": 1}', "not a plasma event"),
        (b'{"meta": {}}', "not a plasma event"),
        (b'{"meta": {"type": 5}}', "not a plasma event"),
        (b'{"meta": {"type": null}}', "not a plasma event"),
        (b'{"meta": {"type": ""}}', "meta.type is empty"),
        (b'{"meta": {"type": "a"}, "data": }', "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
    ],
)
def test_invalid_events(body: bytes, reason: str) -> None:
    result = parse(body)
    assert isinstance(result, InvalidEvent)
    assert reason in result.reason


def test_size_limit() -> None:
    body = wire("a", "x" * 100)
    assert isinstance(parse(body, max_bytes=len(body)), Event)
    too_big = parse(body, max_bytes=len(body) - 1)
    assert isinstance(too_big, InvalidEvent)
    assert "exceeds the limit" in too_big.reason


def test_deep_nesting_is_parsed_or_rejected_cleanly() -> None:
    deep = b'{"meta":{"type":"a"},"data":' + b"[" * 5000 + b"]" * 5000 + b"}"
    assert isinstance(parse(deep), Event | InvalidEvent)
    moderate = b'{"meta":{"type":"a"},"data":' + b"[" * 100 + b"]" * 100 + b"}"
    event = parse(moderate)
    assert isinstance(event, Event)
    assert event.to_wire().count(b"[") == 100


def test_make_event() -> None:
    assert make_event("a", '{"x": 1}') == Event("a", b'{"x": 1}')
    assert make_event("a", None) == Event("a", None)
    assert isinstance(make_event("", "1"), InvalidEvent)
    assert isinstance(make_event("a", "{oops"), InvalidEvent)


# --- SSE framing ---------------------------------------------------------------


def test_frames_are_plasma_bytes() -> None:
    assert encode_retry(2000) == b"retry: 2000\n\n"
    assert HEARTBEAT == b":heartbeat\n\n"
    frame = encode_event("7-1", Event("program:1:views", b'{"v": 1}'))
    assert frame == b'id: 7-1\ndata: {"meta":{"type":"program:1:views"},"data":{"v":1}}\n\n'


@given(event_types, json_values)
def test_frame_is_one_event_with_the_same_json(event_type: str, data: Any) -> None:
    event = parse(wire(event_type, data))
    assert isinstance(event, Event)
    frame = encode_event("1-1", event)
    assert frame.endswith(b"\n\n")
    lines = frame[:-2].split(b"\n")
    assert lines[0] == b"id: 1-1"
    assert lines[1].startswith(b"data: ")
    assert len(lines) == 2  # newlines in data never split the frame
    assert json.loads(lines[1][len(b"data: ") :]) == {"meta": {"type": event_type}, "data": data}


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        ("text/event-stream", True),
        ("TEXT/Event-Stream", True),
        ("text/html, text/event-stream;q=0.5", True),
        ("text/event-stream; charset=utf-8", True),
        ("text/event-stream;q=0", False),
        ("text/event-stream;q=0.0, text/html", False),
        ("text/event-stream;q=bogus", True),
        ("*/*", False),
        ("text/*", False),
        ("", False),
        (None, False),
        ("application/json", False),
    ],
)
def test_accept_header(accept: str | None, expected: bool) -> None:
    assert accepts_event_stream(accept) is expected


@given(st.text(max_size=80))
def test_accept_never_raises(accept: str) -> None:
    assert accepts_event_stream(accept) in (True, False)
