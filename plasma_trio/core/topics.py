"""Topic matching: which subscriptions an event type reaches.

The rule (SPEC 1, plasma's): a subscription to topic ``T`` receives an event
of type ``E`` iff ``T == E`` or ``E`` starts with ``T + ":"``. Equivalently,
``T`` is one of the *prefixes* of ``E`` cut at a ``:`` boundary, which is how
the hub finds subscribers with one dictionary lookup per prefix instead of a
scan of every subscription.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = ["TopicError", "matches", "parse_topics", "prefixes"]


def prefixes(event_type: str) -> list[str]:
    """Every topic that receives ``event_type``: ``a:b:c`` -> ``a``, ``a:b``, ``a:b:c``.

    Cut at each ``:``; the whole type is always last. Empty segments are kept
    as they are (``a::b`` -> ``a``, ``a:``, ``a::b``), so the result agrees with
    :func:`matches` for every string.
    """
    out: list[str] = []
    start = 0
    while True:
        i = event_type.find(":", start)
        if i < 0:
            out.append(event_type)
            return out
        out.append(event_type[:i])
        start = i + 1


def matches(topic: str, event_type: str) -> bool:
    """The SPEC's definition, used as the oracle in tests."""
    return event_type == topic or event_type.startswith(topic + ":")


class TopicError(ValueError):
    """A subscription request that breaks a limit; ``str()`` is the client-facing reason."""


def parse_topics(
    values: Iterable[str], *, max_topics: int = 0, max_length: int = 0
) -> frozenset[str]:
    """Normalise a subscription request into a set of topics.

    Each value may itself be a comma-separated list (the SSE query form).
    Items are stripped of surrounding whitespace; empty items are ignored;
    duplicates collapse. A limit of 0 means unlimited.

    Raises:
        TopicError: no topic at all, too many topics, or a topic too long.
    """
    topics: set[str] = set()
    for value in values:
        for item in value.split(","):
            topic = item.strip()
            if not topic:
                continue
            if max_length and len(topic) > max_length:
                raise TopicError(
                    f"topic of {len(topic)} characters exceeds the limit of {max_length}"
                )
            topics.add(topic)
            if max_topics and len(topics) > max_topics:
                raise TopicError(f"more than {max_topics} topics in one subscription")
    return frozenset(topics)
