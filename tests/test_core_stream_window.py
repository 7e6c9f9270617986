"""Stream ids and the replay window of redis-streams mode (pure; SPEC 4)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from hypothesis import event, given
from hypothesis import strategies as st

from plasma_trio.core.history import History
from plasma_trio.core.stream_ids import (
    ZERO,
    EntryId,
    format_entry,
    format_position,
    parse_entry,
    parse_position,
)
from plasma_trio.core.stream_window import StreamWindow

U64 = st.integers(min_value=0, max_value=(1 << 64) - 1)
ENTRIES = st.tuples(U64, U64)


@given(ENTRIES)
def test_entry_ids_round_trip_and_order_like_redis(entry: EntryId) -> None:
    assert parse_entry(format_entry(entry)) == entry
    assert parse_entry(format_entry(entry).encode()) == entry


@given(st.lists(ENTRIES, min_size=1, max_size=5))
def test_positions_round_trip(position: list[EntryId]) -> None:
    text = format_position(tuple(position))
    assert parse_position(text, len(position)) == tuple(position)
    assert parse_position(text, len(position) + 1) is None


def reference_entry(text: str) -> EntryId | None:
    """What an entry id is, said independently: two runs of ASCII digits
    joined by one dash, each at most 2**64 - 1, white space around allowed."""
    match = re.fullmatch(r"\s*([0-9]+)-([0-9]+)\s*", text)
    if match is None:
        return None
    entry = int(match[1]), int(match[2])
    return entry if max(entry) < 1 << 64 else None


# Entry ids as clients could send them (white space around them allowed),
# and the same with one character changed to one of those that matter
# (another digit, a non-ASCII one, a sign, a letter, a dash, a space) or
# removed: so that valid ids and near misses are both common.
_SPACE = st.text(alphabet=" \t\n\r\x0b\x0c\u00a0\u2028", max_size=2)
_NUMBER = st.one_of(U64.map(str), st.from_regex(r"[0-9]{1,21}", fullmatch=True))
VALID = st.tuples(_SPACE, _NUMBER, _NUMBER, _SPACE).map(lambda p: f"{p[0]}{p[1]}-{p[2]}{p[3]}")


@st.composite
def near_miss(draw: st.DrawFn) -> str:
    text = draw(VALID)
    at = draw(st.integers(min_value=0, max_value=len(text) - 1))
    new = draw(st.sampled_from(["", "0", "\u0661", "\u0969", "\uff11", "+", "a", "-", " "]))
    return text[:at] + new + text[at + 1 :]


@given(st.one_of(VALID, near_miss(), st.text(max_size=30)))
def test_what_is_an_entry(text: str) -> None:
    """Exactly the entry ids are accepted, as the numbers they spell; the
    same as bytes (non-ASCII bytes never are)."""
    want = reference_entry(text)
    event("accepted" if want is not None else "refused")
    assert parse_entry(text) == want
    encoded = text.encode()
    assert parse_entry(encoded) == (want if encoded.isascii() else None)


def test_entry_edge_cases() -> None:
    for bad in ("", "12", "-3", "a-b", "12-", "1-2-3", "\u0661-\u0662", "18446744073709551616-0"):
        assert parse_entry(bad) is None, bad
    assert parse_entry(b"\xff-1") is None
    assert parse_entry("18446744073709551615-0") == ((1 << 64) - 1, 0)
    assert parse_position("1-1,2-2", 2) == ((1, 1), (2, 2))
    assert parse_position("1-1,,2-2", 2) is None


# -- the window ----------------------------------------------------------------


@dataclass
class Ev:
    seq: int
    id: str
    pos: tuple[int, EntryId] | None


class Window:
    """A hub in miniature: stamps, appends, answers since()."""

    def __init__(self, keys: int, size: int) -> None:
        self.history: History[Ev] = History(0, size)
        self.window = StreamWindow(keys, self.history)
        self.seq = 0

    def add(self, key: int, entry: EntryId) -> Ev:
        self.seq += 1
        event = Ev(self.seq, self.window.stamp(key, entry), (key, entry))
        self.history.append(event)
        return event

    def replay(
        self, last_id: str, *, missing: bool | None = None
    ) -> tuple[bool, list[str], str | None]:
        r = self.window.since(last_id, current_seq=self.seq, missing=missing)
        floors = r.floors
        got = []
        for seq in range(r.start, r.end + 1):
            event = self.history.get(seq)
            assert event is not None
            assert event.pos is not None
            if floors is None or event.pos[1] > floors[event.pos[0]]:
                got.append(event.id)
        return r.gap, got, r.oldest


def test_one_key_ids_are_entry_ids_and_replay_what_follows() -> None:
    w = Window(1, 10)
    ids = [w.add(0, (100 + n, 0)).id for n in range(5)]
    assert ids == ["100-0", "101-0", "102-0", "103-0", "104-0"]
    assert w.replay("102-0") == (False, ["103-0", "104-0"], "103-0")
    assert w.replay("104-0") == (False, [], None)
    assert w.replay("0-0") == (False, ids, "100-0")  # the whole key is held
    assert w.replay("102-0", missing=True) == (True, ["103-0", "104-0"], "103-0")
    assert w.replay("garbage")[0] is True
    assert w.replay("200-0")[0] is True  # ahead of this instance


def test_window_turning_over_uncovers_the_oldest_positions() -> None:
    w = Window(1, 3)
    for n in range(6):
        w.add(0, (n + 1, 0))
    # Held: 4, 5, 6; the newest dropped is 3.
    assert w.replay("3-0") == (False, ["4-0", "5-0", "6-0"], "4-0")
    assert w.replay("2-0") == (True, ["4-0", "5-0", "6-0"], "4-0")  # Redis not asked
    assert w.replay("2-0", missing=True) == (True, ["4-0", "5-0", "6-0"], "4-0")
    # Redis still holds entry 2: no gap, the whole replay is read from Redis
    # up to the window's newest entry (6), nothing from the window.
    deep = w.window.since("2-0", current_seq=w.seq, missing=False)
    assert (deep.gap, deep.start > deep.end) == (False, True)
    assert (deep.floors, deep.deep_until) == (((2, 0),), ((6, 0),))
    # Covered clients are replayed from the window whatever Redis said.
    assert w.replay("3-0", missing=False) == (False, ["4-0", "5-0", "6-0"], "4-0")
    assert w.window.since("3-0", current_seq=w.seq, missing=False).deep_until is None
    # Ahead of this instance: a gap, never a read beyond what it has read.
    assert w.replay("9-0", missing=False)[0] is True


def test_two_keys_compare_per_key() -> None:
    w = Window(2, 10)
    a = w.add(0, (10, 0)).id
    b = w.add(1, (5, 0)).id  # older entry id on another key, later here
    c = w.add(0, (11, 0)).id
    assert (a, b, c) == ("10-0,0-0", "10-0,5-0", "11-0,5-0")
    assert w.replay(a) == (False, [b, c], b)
    assert w.replay("11-0,0-0") == (False, [b], b)
    assert w.replay("10-0")[0] is True  # not a position of two keys


def test_a_loss_makes_earlier_positions_gaps_until_the_next_entry() -> None:
    w = Window(2, 10)
    w.add(0, (10, 0))
    before = w.add(1, (20, 0)).id
    w.window.loss(0, ZERO)  # key 0 came back empty
    assert w.replay(before)[0] is True
    after = w.add(0, (1, 0)).id  # lower than before: the cursor was reset
    assert after == "1-0,20-0"
    assert w.replay(after) == (False, [], None)
    assert w.replay(before)[0] is True
    later = w.add(1, (21, 0)).id
    assert w.replay(after) == (False, [later], later)


def test_nothing_held_covers_only_the_newest() -> None:
    w = Window(1, 0)
    w.add(0, (1, 0))
    w.add(0, (2, 0))
    assert w.replay("2-0") == (False, [], None)
    assert w.replay("1-0")[0] is True


@given(st.lists(st.integers(min_value=0, max_value=1), min_size=1, max_size=40), st.data())
def test_replay_is_exactly_what_followed_on_each_key(keys: list[int], data: st.DataObject) -> None:
    """Against a model: whatever position a client of this instance had, the
    replay is the held events after it on their key, in order, and a gap is
    reported exactly when something it missed is no longer held."""
    size = data.draw(st.integers(min_value=1, max_value=15))
    w = Window(2, size)
    stamped: list[Ev] = []
    counters = [0, 0]
    for key in keys:
        counters[key] += 1
        stamped.append(w.add(key, (counters[key], key)))
    cut = data.draw(st.integers(min_value=0, max_value=len(stamped)))
    last_id = stamped[cut - 1].id if cut else "0-0,0-0"
    gap, got, _ = w.replay(last_id)
    missed = stamped[cut:]
    held = {e.id for e in stamped[-size:]}
    assert gap == any(e.id not in held for e in missed)
    assert got == [e.id for e in missed if e.id in held]


def test_a_partial_preload_covers_only_from_its_oldest_entry_read() -> None:
    """The source read the newest entries of a longer stream, some of them
    invalid (not held): positions before the oldest entry read are not covered."""
    w = Window(1, 10)
    for n in (5, 7, 9):  # held; 4, 6, 8 were read but invalid
        w.add(0, (n, 0))
    w.window.cover_from([(4, 0)])
    assert w.replay("3-0")[0] is True  # may have missed entries before 4-0
    assert w.replay("4-0") == (False, ["5-0", "7-0", "9-0"], "5-0")
    w.window.cover_from([(1, 0)])  # never moves coverage back
    assert w.replay("3-0")[0] is True
