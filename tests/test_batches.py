"""Batched fan-out without I/O: the hub's plan, the outbox and the session.

``Hub.publish_many`` must give every subscriber exactly what publishing the
same events one by one gives it (hypothesis, over random subscriptions and
event types), in one offer per subscriber, and its writer one write; what a
writer does not take is queued event by event under the bound; a session
still replaying holds a batch like any live event. The source's side (the
intake that makes batches) is tested at the end.
"""

from __future__ import annotations

import contextlib

import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from plasma_trio.core.events import Event
from plasma_trio.hub import Hub
from plasma_trio.session import Ending, admit
from plasma_trio.sources.intake import BATCH_EVENTS, Intake
from tests.helpers import make_config
from tests.test_hub import FakeSink
from tests.test_outbox import open_session, outbox
from tests.test_session_unit import FakeWriter, ask

TOPICS = ["a", "a:b", "a:b:c", "a:c", "b", "b:a"]


@settings(max_examples=300, deadline=None)
@given(
    subscriptions=st.lists(
        st.frozensets(st.sampled_from(TOPICS), min_size=1, max_size=3), min_size=1, max_size=6
    ),
    types=st.lists(st.sampled_from(TOPICS), min_size=1, max_size=12),
)
def test_a_batch_delivers_what_one_by_one_does(
    subscriptions: list[frozenset[str]], types: list[str]
) -> None:
    async def deliveries(batched: bool) -> tuple[list[list[int]], list[list[int]]]:
        hub = Hub(epoch=1)
        sinks = [FakeSink() for _ in subscriptions]
        with contextlib.ExitStack() as stack:
            for sink, topics in zip(sinks, subscriptions, strict=True):
                stack.enter_context(hub.subscribe("sse", sink, topics))
            events = [Event(t, str(n).encode()) for n, t in enumerate(types)]
            if batched:
                await hub.publish_many(events)
            else:
                for event in events:
                    await hub.publish(event)
        return [[e.seq for e in s.events] for s in sinks], [s.batches for s in sinks]

    one_by_one, _ = trio.run(deliveries, False)
    together, offers = trio.run(deliveries, True)
    assert together == one_by_one
    if len(types) > 1:
        for got, batches in zip(together, offers, strict=True):
            # One offer per subscriber with anything to get, carrying all of it.
            assert batches == ([len(got)] if got else [])


async def test_subscribers_that_get_the_same_events_share_one_batch_and_its_bytes() -> None:
    hub = Hub(epoch=2)
    offered: list[object] = []

    class Recording(FakeSink):
        def offer_batch(self, batch):  # type: ignore[no-untyped-def]
            offered.append(batch)
            return super().offer_batch(batch)

    sinks = [Recording() for _ in range(3)]
    with (
        hub.subscribe("sse", sinks[0], frozenset({"a"})),
        hub.subscribe("sse", sinks[1], frozenset({"a:b"})),
        hub.subscribe("sse", sinks[2], frozenset({"a", "a:b"})),
    ):
        await hub.publish_many([Event("a:b", b"1"), Event("a:b", b"2"), Event("a:c", b"3")])
    by_id = {id(batch) for batch in offered}
    # "a" and "a"+"a:b" get all three (one shared batch); "a:b" gets two.
    assert len(offered) == 3
    assert len(by_id) == 2
    assert [e.seq for e in sinks[1].events] == [1, 2]
    assert [e.seq for e in sinks[0].events] == [e.seq for e in sinks[2].events] == [1, 2, 3]


async def test_a_batch_is_one_write_counted_per_event() -> None:
    hub = Hub(epoch=3)
    session, writer = open_session(hub, capacity=1 << 20)
    with session.subscribed(writer):
        await hub.publish_many([Event("a", b"x"), Event("b", b"no"), Event("a", b"y")])
        assert writer.writes == 1
        assert writer.tokens() == ["3-1", "3-3"]
        statistics = hub.statistics()
        assert statistics.events_delivered["sse"] == statistics.events_queued["sse"] == 2
        assert statistics.last_id == "3-3"


async def test_what_a_batch_write_leaves_is_queued_event_by_event() -> None:
    hub = Hub(epoch=4)
    session, writer = open_session(hub, capacity=12, subscriber_buffer=2)
    with session.subscribed(writer):
        out = outbox(session)
        # "4-n=xx;" is 7 bytes: the first fits, the second is cut, 3 wait in
        # all: a batch that arrives while nothing waits is queued whole (it
        # is the write in progress), beyond the bound of 2.
        await hub.publish_many([Event("a", b"xx") for _ in range(4)])
        assert writer.writes == 1
        assert out.depth == 3
        assert session.ending is None
        assert hub.statistics().events_delivered["sse"] == 1
        assert session.stalled_since is not None
        # Now something waits: the next batch meets the bound event by event.
        await hub.publish_many([Event("a", b"xx") for _ in range(2)])
        assert session.ending is Ending.CUT_OFF
        statistics = hub.statistics()
        assert statistics.cut_off["sse"] == 1
        assert statistics.events_dropped == 1
        assert statistics.events_queued["sse"] == 4  # the second batch: none fitted


async def test_a_batch_while_others_wait_is_queued_in_order_behind_them() -> None:
    hub = Hub(epoch=5)
    session, writer = open_session(hub, capacity=3)
    with session.subscribed(writer):
        out = outbox(session)
        await hub.publish(Event("a", b"first"))
        await hub.publish_many([Event("a", b"2"), Event("a", b"3")])
        assert out.depth == 3
        writer.drain(100)
        out.flush()
        assert writer.tokens() == ["5-1", "5-2", "5-3"]
        assert hub.statistics().events_delivered["sse"] == 3


async def test_a_session_replaying_holds_a_batch_and_writes_it_after_the_replay() -> None:
    hub = Hub(epoch=6)
    for n in range(5):
        await hub.publish(Event("a", str(n).encode()))
    session = admit(hub, make_config(), ask("a", last_id="6-2"))
    writer = FakeWriter()
    writer.session = session
    with session.subscribed(writer):
        assert session.replaying
        await hub.publish_many([Event("a", b"5"), Event("a", b"6")])  # held
        out = outbox(session)
        while session.replaying:
            if items := await session.replay_step():
                out.put_items(items)
        assert writer.tokens() == ["6-3", "6-4", "6-5", "6-6", "6-7"]


async def test_the_intake_publishes_a_burst_as_one_batch_and_a_lone_event_at_once() -> None:
    hub = Hub(epoch=7)
    sink = FakeSink()
    with hub.subscribe("sse", sink, frozenset({"a"})):
        async with trio.open_nursery() as nursery:
            intake = Intake(hub)
            nursery.start_soon(intake.run)
            for n in range(300):  # what one read parsed, handed over together
                intake.put(Event("a", str(n).encode()))
            await intake.drained()
            assert sink.batches == [BATCH_EVENTS, 300 - BATCH_EVENTS]
            # One per turn, as the Redis source hands them over: still one batch.
            for _ in range(20):
                intake.put(Event("a", b"turn"))
                await trio.lowlevel.checkpoint()
            await intake.drained()
            assert sink.batches[2:] == [20]
            # A lone event is not held for more.
            with trio.fail_after(1):
                intake.put(Event("a", b"alone"))
                await intake.drained()
            assert [e.seq for e in sink.events] == list(range(1, 322))
            nursery.cancel_scope.cancel()
