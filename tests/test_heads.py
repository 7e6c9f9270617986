"""The fast path's request-head reader (plasma_trio/transports/heads.py): it
takes a head only where h11 (Hypercorn's parser, the arbiter of HTTP/1.x
here) would take the same one, whatever the bytes and however they are
split; the rest goes to Hypercorn whole."""

from __future__ import annotations

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plasma_trio.transports.heads import MAX_HEAD, Head, HeadReader, HeadTooLarge

TOKEN = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.!#$%&'*+^`|~",
    min_size=1,
    max_size=12,
)
ODD = st.sampled_from(["", " ", "\t", ":", "\x00", "\x7f", "é", "\r", "\n", "(", "/"])
NAMES = st.one_of(TOKEN, st.builds(lambda a, b, c: a + b + c, TOKEN, ODD, TOKEN))
VALUES = st.one_of(
    st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30),
    st.builds(lambda a, b, c: a + b + c, st.text(max_size=5), ODD, st.text(max_size=5)),
)


@st.composite
def heads(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from(["GET", "POST", "PRI", "get", "G T", ""]))
    target = draw(
        st.one_of(
            st.sampled_from(["/", "/?eventType=a:b", "*", "http://x/", "/a b", "/?x=%zz"]),
            st.text(alphabet="/?=&:%abc", max_size=20),
        )
    )
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.1 ", "HTP/1.1"]))
    newline = draw(st.sampled_from(["\r\n", "\n"]))
    lines = [f"{method} {target} {version}"]
    if draw(st.booleans()):
        lines.append(f"Host: {draw(st.sampled_from(['x', 'localhost:8080', '', 'a b']))}")
    lines += [f"{n}:{draw(st.sampled_from([' ', '', '  ']))}{v}" for n, v in draw(
        st.lists(st.tuples(NAMES, VALUES), max_size=6)
    )]  # fmt: skip
    if draw(st.booleans()):
        lines += ["Connection: Upgrade", f"Upgrade: {draw(st.sampled_from(['h2c', 'websocket']))}"]
    rest = draw(st.sampled_from(["", "tail", "GET / HTTP/1.1\r\n\r\n"]))
    return (newline.join(lines) + newline + newline + rest).encode("utf-8")


def read(raw: bytes, cuts: list[int]) -> tuple[Head | None, bytes] | None:
    reader = HeadReader()
    last = 0
    for cut in [*sorted(c % (len(raw) + 1) for c in cuts), len(raw)]:
        if cut <= last:
            continue
        got = reader.feed(raw[last:cut])
        last = cut
        if got is not None:
            return got
    return reader.feed(b"")


def as_tuple(head: Head | None) -> tuple[object, ...] | None:
    if head is None:
        return None
    return (head.method, head.target, head.http_version, head.headers)


def h11_request(raw: bytes) -> h11.Request | None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    conn.receive_data(raw)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError:
        return None
    return event if isinstance(event, h11.Request) else None


@settings(max_examples=1500, deadline=None)
@given(heads(), st.lists(st.integers(min_value=0, max_value=400), max_size=4))
def test_a_head_is_taken_only_as_h11_would_take_it(raw: bytes, cuts: list[int]) -> None:
    got = read(raw, cuts)
    assert got is not None
    head, seen = got
    assert seen == raw or raw.startswith(seen)
    whole = read(raw, [])
    assert whole is not None
    assert as_tuple(whole[0]) == as_tuple(head)  # however the bytes were split
    if head is None:
        return
    request = h11_request(raw)
    assert request is not None, raw
    assert head.method == request.method
    assert head.target == request.target
    assert head.http_version == request.http_version
    ours = [(n.lower(), v.strip(b" \t")) for n, v in head.headers]
    assert ours == [(n, v) for n, v in request.headers], raw


def test_a_head_over_16_kib_is_refused_whole_or_in_parts() -> None:
    big = b"GET / HTTP/1.1\r\nX: " + b"a" * MAX_HEAD + b"\r\n\r\n"
    with pytest.raises(HeadTooLarge):
        HeadReader().feed(big)
    reader = HeadReader()

    def in_parts() -> None:
        for at in range(0, len(big), 1000):
            reader.feed(big[at : at + 1000])

    with pytest.raises(HeadTooLarge):
        in_parts()


def test_the_first_head_of_a_pipeline_and_what_follows() -> None:
    raw = b"GET /?eventType=a HTTP/1.1\r\nHost: x\r\n\r\nGET /hc HTTP/1.1\r\n\r\n"
    got = HeadReader().feed(raw)
    assert got is not None
    head, seen = got
    assert head is not None
    assert (head.method, head.target, head.headers) == (b"GET", b"/?eventType=a", [(b"Host", b"x")])
    assert seen == raw  # (all of it goes on to Hypercorn if the fast path does not serve it)
