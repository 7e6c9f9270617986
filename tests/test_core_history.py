"""The replay window behind Last-Event-ID."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given
from hypothesis import strategies as st

from plasma_trio.core.history import History, Replay, format_id, parse_id

EPOCH = 1_700_000_000_000


@dataclass(frozen=True)
class Ev:
    seq: int

    @property
    def id(self) -> str:
        return format_id(EPOCH, self.seq)


def filled(n: int, size: int) -> History[Ev]:
    h: History[Ev] = History(EPOCH, size)
    for seq in range(1, n + 1):
        h.append(Ev(seq))
    return h


def events(h: History[Ev], replay: Replay) -> list[int]:
    got = [h.get(seq) for seq in range(replay.start, replay.end + 1)]
    assert None not in got
    return [e.seq for e in got if e is not None]


def test_parse_id() -> None:
    assert parse_id("12-34") == (12, 34)
    assert parse_id(" 12-34 ") == (12, 34)
    for bad in ("", "12", "-3", "a-b", "12-", "1-2-3", "\u0661-\u0662"):
        assert parse_id(bad) is None


@given(st.integers(0, 60), st.integers(1, 30), st.integers(0, 60))
def test_since_is_exactly_what_was_missed(published: int, size: int, last: int) -> None:
    h = filled(published, size)
    last = min(last, published)
    replay = h.since(format_id(EPOCH, last), current_seq=published)
    held = list(range(max(1, published - size + 1), published + 1))
    missed = list(range(last + 1, published + 1))
    got = events(h, replay)
    if set(missed) <= set(held):
        assert not replay.gap
        assert got == missed
    else:
        assert replay.gap
        assert got == held
        assert replay.oldest == (format_id(EPOCH, held[0]) if held else None)


def test_foreign_or_future_ids_are_gaps_without_replay() -> None:
    h = filled(10, 100)
    for last_id in (format_id(EPOCH + 1, 5), format_id(EPOCH, 11), "garbage"):
        replay = h.since(last_id, current_seq=10)
        assert replay.gap
        assert events(h, replay) == []
        assert replay.oldest == format_id(EPOCH, 1)


def test_empty_history_size_zero() -> None:
    h = filled(5, 0)
    replay = h.since(format_id(EPOCH, 2), current_seq=5)
    assert replay.gap
    assert replay.oldest is None
    assert not h.since(format_id(EPOCH, 5), current_seq=5).gap


@given(st.integers(1, 20), st.lists(st.integers(0, 5), max_size=40))
def test_get_reads_exactly_the_window_while_appending(size: int, steps: list[int]) -> None:
    h: History[Ev] = History(EPOCH, size)
    seq = 0
    for step in steps:
        for _ in range(step):
            seq += 1
            h.append(Ev(seq))
        held = list(range(max(1, seq - size + 1), seq + 1))
        assert len(h) == len(held)
        assert [s for s in range(0, seq + 2) if h.get(s) is not None] == held
        assert all(h.get(s) == Ev(s) for s in held)
        assert h.oldest_id() == (format_id(EPOCH, held[0]) if held else None)


def test_a_loss_makes_every_earlier_id_a_gap() -> None:
    """After the source may have lost events (a pub/sub resubscribe), a client
    that last saw any event up to then gets the gap notice, and what is held."""
    h = filled(5, 10)
    h.mark_loss()
    for seq in range(1, 6):
        replay = h.since(format_id(EPOCH, seq), current_seq=5)
        assert replay.gap, seq
        assert events(h, replay) == list(range(seq + 1, 6))
    h.append(Ev(6))
    assert not h.since(format_id(EPOCH, 6), current_seq=6).gap
    assert h.since(format_id(EPOCH, 5), current_seq=6).gap
