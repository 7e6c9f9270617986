"""Go duration syntax (PLASMA_* durations)."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from plasma_trio.core.durations import format_duration, parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0", 0.0),
        ("1s", 1.0),
        ("500ms", 0.5),
        ("1m30s", 90.0),
        ("1h", 3600.0),
        ("1.5h", 5400.0),
        ("2h45m", 9900.0),
        ("300us", 0.0003),
        ("300µs", 0.0003),
        ("300μs", 0.0003),
        ("10ns", 1e-8),
        (".5s", 0.5),
        ("1.s", 1.0),
        ("+5s", 5.0),
        ("-1.5s", -1.5),
        ("1h1m1s1ms", 3661.001),
    ],
)
def test_parses_go_syntax(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text", ["", "5", "1", "s", "1x", "1 s", "ms", "1s2", "--1s", ".s", "1.5", "abc"]
)
def test_rejects_non_go_syntax(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_rejects_overflow() -> None:
    with pytest.raises(ValueError, match="out of range"):
        parse_duration("3000000h")


def test_missing_unit_is_explained() -> None:
    with pytest.raises(ValueError, match="missing unit"):
        parse_duration("10")


UNITS = {"ns": 1, "us": 1_000, "ms": 1_000_000, "s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9}


@given(
    st.lists(
        st.tuples(st.integers(0, 10_000), st.sampled_from(sorted(UNITS))), min_size=1, max_size=6
    )
)
def test_sum_of_parts(parts: list[tuple[int, str]]) -> None:
    text = "".join(f"{n}{unit}" for n, unit in parts)
    expected_ns = sum(n * UNITS[unit] for n, unit in parts)
    assert parse_duration(text) == pytest.approx(expected_ns / 1e9)


@given(st.integers(0, 10**15))
def test_format_round_trips(ns: int) -> None:
    seconds = ns / 1e9
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds, rel=1e-9, abs=1e-9)


@given(st.text(max_size=20))
def test_never_raises_anything_but_valueerror(text: str) -> None:
    with contextlib.suppress(ValueError):
        parse_duration(text)


def test_format_examples() -> None:
    assert format_duration(90) == "1m30s"
    assert format_duration(0.5) == "500ms"
    assert format_duration(3600) == "1h0m0s"
    assert format_duration(0) == "0s"
