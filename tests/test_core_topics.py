"""Topic matching (SPEC 1): prefixes() agrees with the SPEC's definition."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from plasma_trio.core.topics import TopicError, matches, parse_topics, prefixes

segment = st.text(alphabet=st.characters(blacklist_characters=":,"), max_size=4)
event_types = st.lists(segment, min_size=1, max_size=5).map(":".join).filter(bool)


def test_spec_examples() -> None:
    assert matches("program", "program:1234:views")
    assert matches("program:1234", "program:1234:views")
    assert matches("program:1234:views", "program:1234:views")
    assert not matches("program:12", "program:1234:views")
    assert not matches("program:1234:views:x", "program:1234:views")
    assert prefixes("program:1234:views") == ["program", "program:1234", "program:1234:views"]
    assert prefixes("poll") == ["poll"]


@given(event_types, st.text(max_size=12))
def test_prefixes_are_exactly_the_matching_topics(event_type: str, topic: str) -> None:
    assert (topic in prefixes(event_type)) == matches(topic, event_type)


@given(event_types)
def test_every_prefix_matches(event_type: str) -> None:
    ps = prefixes(event_type)
    assert ps[-1] == event_type
    assert len(ps) == event_type.count(":") + 1
    assert all(matches(p, event_type) for p in ps)


@given(st.lists(event_types, max_size=8))
def test_parse_topics_splits_strips_and_dedupes(topics: list[str]) -> None:
    joined = ",".join(f" {t} " for t in topics)
    expected = {t.strip() for t in topics if t.strip()}
    assert parse_topics([joined]) == expected


def test_parse_topics_ignores_empty_items() -> None:
    assert parse_topics(["a,,b,", ",c"]) == {"a", "b", "c"}
    assert parse_topics(["", " , "]) == frozenset()


def test_parse_topics_limits() -> None:
    with pytest.raises(TopicError, match="more than 2 topics"):
        parse_topics(["a,b,c"], max_topics=2)
    with pytest.raises(TopicError, match="exceeds the limit of 3"):
        parse_topics(["abcd"], max_length=3)
    assert parse_topics(["a,b,a"], max_topics=2) == {"a", "b"}
