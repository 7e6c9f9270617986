"""The hub with plain fake sinks: matching, once-only delivery, cut-off, limits."""

from __future__ import annotations

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from plasma_trio.core.events import Event
from plasma_trio.core.topics import matches
from plasma_trio.errors import ServiceUnavailable
from plasma_trio.hub import Batch, Hub, StampedEvent
from plasma_trio.replay import Resume
from plasma_trio.replay_store import ReplayStore
from plasma_trio.transports.wire import sse_frame


class FakeSink:
    def __init__(self, capacity: int = 1000) -> None:
        self.capacity = capacity
        self.events: list[StampedEvent] = []
        self.closed: bool | None = None  # None, or the cut_off flag
        self.losses: list[tuple[str | None, str]] = []
        self.batches: list[int] = []  # the size of each batch offered

    def loss(self, requested: str | None, oldest: str) -> None:
        self.losses.append((requested, oldest))

    def offer(self, event: StampedEvent) -> bool:
        if len(self.events) >= self.capacity:
            return False
        self.events.append(event)
        return True

    def offer_batch(self, batch: Batch) -> int:
        self.batches.append(len(batch))
        for taken, event in enumerate(batch.events):
            if not self.offer(event):
                return taken
        return len(batch)

    def close(self, *, cut_off: bool) -> None:
        if self.closed is None:
            self.closed = cut_off


def types_of(sink: FakeSink) -> list[str]:
    return [e.event.type for e in sink.events]


async def test_overlapping_topics_deliver_once() -> None:
    hub = Hub()
    sink = FakeSink()
    with hub.subscribe("sse", sink, frozenset({"program", "program:1234", "program:1234:views"})):
        await hub.publish(Event("program:1234:views"))
        await hub.publish(Event("program:12"))
        await hub.publish(Event("other"))
    assert types_of(sink) == ["program:1234:views", "program:12"]


async def test_encoded_once_and_shared() -> None:
    hub = Hub()
    a, b = FakeSink(), FakeSink()
    with hub.subscribe("sse", a, frozenset({"x"})), hub.subscribe("grpc", b, frozenset({"x:y"})):
        await hub.publish(Event("x:y", b"1"))
    assert a.events[0] is b.events[0]
    assert sse_frame(a.events[0]) is sse_frame(b.events[0])


async def test_ids_increase_and_are_stamped_with_epoch() -> None:
    hub = Hub(epoch=42)
    ids = [(await hub.publish(Event("t"))).id for _ in range(3)]
    assert ids == ["42-1", "42-2", "42-3"]


async def test_slow_subscriber_is_cut_off_alone() -> None:
    hub = Hub(transports=("sse", "grpc"))
    slow, fast = FakeSink(capacity=2), FakeSink()
    with (
        hub.subscribe("sse", slow, frozenset({"t"})) as slow_sub,
        hub.subscribe("sse", fast, frozenset({"t"})),
    ):
        for _ in range(5):
            await hub.publish(Event("t"))
        assert len(fast.events) == 5
        assert len(slow.events) == 2
        assert slow.closed is True
        assert slow_sub.was_cut_off
        assert not slow_sub.active
        stats = hub.statistics()
        assert stats.cut_off == {"sse": 1, "grpc": 0}
        assert stats.events_dropped == 1
        assert stats.events_queued["sse"] == 7
        # Still counted as a connection until its transport lets go.
        assert stats.connections["sse"] == 2
    assert hub.statistics().connections == {"sse": 0, "grpc": 0}


async def test_the_hub_counts_any_transport_by_name() -> None:
    """The hub knows no wire: a transport it was never told of is counted
    under its name (the ones named at construction are there from the start)."""
    hub = Hub(transports=("sse",))
    assert hub.statistics().connections == {"sse": 0}
    sink = FakeSink()
    with hub.subscribe("websocket", sink, frozenset({"t"})):
        await hub.publish(Event("t"))
        stats = hub.statistics()
        assert stats.connections == {"sse": 0, "websocket": 1}
        assert stats.events_queued == {"sse": 0, "websocket": 1}
    assert hub.statistics().connections == {"sse": 0, "websocket": 0}


async def test_unsubscribe_on_exception() -> None:
    hub = Hub()
    sink = FakeSink()
    with pytest.raises(RuntimeError), hub.subscribe("sse", sink, frozenset({"t"})):
        raise RuntimeError("boom")
    await hub.publish(Event("t"))
    assert sink.events == []
    assert hub.statistics().connections["sse"] == 0


async def test_unsubscribe_on_cancellation() -> None:
    hub = Hub()
    sink = FakeSink()
    entered = trio.Event()

    async def subscriber() -> None:
        with hub.subscribe("sse", sink, frozenset({"t"})):
            entered.set()
            await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(subscriber)
        await entered.wait()
        await hub.publish(Event("t"))
        assert hub.statistics().connections["sse"] == 1
        nursery.cancel_scope.cancel()
    await hub.publish(Event("t"))
    assert [e.seq for e in sink.events] == [1]  # the second came after it left
    assert hub.statistics().connections["sse"] == 0


async def test_set_topics_replaces_and_empty_receives_nothing() -> None:
    hub = Hub()
    sink = FakeSink()
    with hub.subscribe("grpc", sink) as sub:
        await hub.publish(Event("a"))
        sub.set_topics(frozenset({"a"}))
        await hub.publish(Event("a"))
        sub.set_topics(frozenset({"b"}))
        await hub.publish(Event("a"))
        await hub.publish(Event("b:1"))
        sub.set_topics(frozenset())
        await hub.publish(Event("b"))
        assert hub.statistics().connections["grpc"] == 1
    assert types_of(sink) == ["a", "b:1"]
    assert hub.topic_count == 0


def test_connection_limit() -> None:
    hub = Hub(max_connections=2)
    with hub.subscribe("sse", FakeSink()), hub.subscribe("grpc", FakeSink()):
        with (
            pytest.raises(ServiceUnavailable, match="limit of 2"),
            hub.subscribe("sse", FakeSink()),
        ):
            pass
    with hub.subscribe("sse", FakeSink()):
        pass


async def test_close_ends_every_stream_and_refuses_new_ones() -> None:
    hub = Hub()
    a, b = FakeSink(), FakeSink()
    with hub.subscribe("sse", a, frozenset({"t"})), hub.subscribe("grpc", b, frozenset({"t"})):
        hub.close()
        assert a.closed is False
        assert b.closed is False
        await hub.publish(Event("t"))
        assert a.events == []
        assert b.events == []
    with pytest.raises(ServiceUnavailable), hub.subscribe("sse", FakeSink()):
        pass


@given(
    st.lists(
        st.frozensets(st.sampled_from(["a", "a:b", "a:b:c", "b", "a:bc", "c"]), max_size=4),
        max_size=6,
    ),
    st.lists(st.sampled_from(["a", "a:b", "a:b:c", "a:bc", "b:x", "c", "d"]), max_size=10),
)
async def test_delivery_equals_spec_matching(
    subscriptions: list[frozenset[str]], published: list[str]
) -> None:
    hub = Hub()
    sinks = [FakeSink() for _ in subscriptions]
    from contextlib import ExitStack

    with ExitStack() as stack:
        for sink, topics in zip(sinks, subscriptions, strict=True):
            stack.enter_context(hub.subscribe("sse", sink, topics))
        for t in published:
            await hub.publish(Event(t))
    for sink, topics in zip(sinks, subscriptions, strict=True):
        expected = [t for t in published if any(matches(topic, t) for topic in topics)]
        assert types_of(sink) == expected


async def test_large_fan_out_yields_and_keeps_order() -> None:
    hub = Hub()
    sinks = [FakeSink() for _ in range(5000)]
    ran_during: list[int] = []
    from contextlib import ExitStack

    with ExitStack() as stack:
        for sink in sinks:
            stack.enter_context(hub.subscribe("sse", sink, frozenset({"t"})))

        async def observer() -> None:
            # Runs while the fan-out is in progress: some sinks have the event, some not yet.
            while not all(len(s.events) == 2 for s in sinks):
                ran_during.append(sum(len(s.events) for s in sinks))
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(observer)
            nursery.start_soon(hub.publish, Event("t", b"1"))
            nursery.start_soon(hub.publish, Event("t", b"2"))
    assert any(0 < n < 10000 for n in ran_during), "the fan-out never yielded"
    # Whichever was stamped first reaches every subscriber first.
    assert all([e.seq for e in s.events] == [1, 2] for s in sinks)
    assert hub.statistics().events_queued["sse"] == 10000


async def test_leaving_during_a_sliced_fan_out() -> None:
    hub = Hub()
    sinks = [FakeSink() for _ in range(3000)]
    from contextlib import ExitStack

    with ExitStack() as outer:
        subs = [outer.enter_context(hub.subscribe("sse", s, frozenset({"t"}))) for s in sinks]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hub.publish, Event("t"))
            # Let the fan-out serve its first slice, then every connection goes.
            while not sinks[0].events and not any(s.events for s in sinks):
                await trio.lowlevel.checkpoint()
            served = sum(len(s.events) for s in sinks)
            for sub in subs:
                sub.cut_off()  # as if every connection went away mid fan-out
    delivered = sum(len(s.events) for s in sinks)
    # The first slice went out; nobody was served after leaving.
    assert 0 < served == delivered < 3000


@given(
    count=st.integers(min_value=1, max_value=12_000),
    pattern=st.lists(st.booleans(), min_size=1, max_size=64),
    history=st.integers(min_value=1, max_value=3000),
)
@settings(max_examples=25, deadline=None)
async def test_resume_remembers_exactly_what_was_sent_within_the_history(
    count: int, pattern: list[bool], history: int
) -> None:
    """gRPC streams track what they were sent (a later replay skips it); the
    record is trimmed now and then, never losing a seq the history holds."""
    hub = Hub(history_size=history)
    resume = Resume(hub, track_sent=True)
    sent_seqs: set[int] = set()
    for n in range(count):
        stamped = await hub.publish(Event("t"))
        if pattern[n % len(pattern)]:
            resume.sent(stamped)
            sent_seqs.add(stamped.seq)
    for seq in range(hub.history_first_seq, hub.last_seq + 1):
        assert resume.was_sent(seq) == (seq in sent_seqs), seq


async def test_announce_loss_tells_each_subscriber_what_it_last_got() -> None:
    hub = Hub(epoch=7)
    a, b, c = FakeSink(), FakeSink(), FakeSink()
    with (
        hub.subscribe("sse", a, frozenset({"x"})),
        hub.subscribe("grpc", b, frozenset({"y"})),
        hub.subscribe("sse", c, frozenset({"z"})),
    ):
        await hub.publish(Event("x"))  # 7-1
        await hub.publish(Event("y"))  # 7-2
        await hub.publish(Event("x:1"))  # 7-3
        await hub.announce_loss()
        assert a.losses == [("7-3", "7-4")]
        assert b.losses == [("7-2", "7-4")]
        assert c.losses == [(None, "7-4")]  # given nothing yet
        assert hub.statistics().source_losses == 1
        assert (await hub.publish(Event("z"))).id == "7-4"  # the promised next id


async def test_a_streams_loss_during_a_replay_ends_the_replay_not_the_client() -> None:
    """redis-streams: a loss clears the window under a running replay; the
    replay ends there (the live notice tells the client), it is not treated
    as a client too slow for the history."""

    async def exists(_: object) -> bool:
        return True

    hub = Hub(history_size=100)
    hub.use_stream_ids(1, ReplayStore(exists, None))
    hub.preload([(Event(type="a", data=b"1"), (0, (n, 0))) for n in range(1, 11)])
    sink = FakeSink()
    with hub.subscribe("sse", sink, frozenset({"a"})):
        resume = Resume(hub)
        assert resume.start("2-0", frozenset({"a"})) is None
        first = resume.take(limit=3)
        assert [e.id for e in first or []] == ["3-0", "4-0", "5-0"]
        await hub.announce_loss(key=0, cursor=(10, 0), oldest=None)
        assert resume.take() == []
        assert not resume.replaying
        assert sink.losses == [(None, None)]
        assert sink.closed is None
