"""The session's outbox on its own: a real Session and Hub, a socket in memory.

The rules every writer gets from it: write now, queue only what the writer
does not take (the rest of a frame, then whole frames, in order); count a
frame once all of it is written; stalled while bytes wait; the bound; the
end after what is queued, or one try when cut off; a client that goes away.
"""

from __future__ import annotations

import trio
import trio.testing

from plasma_trio.core.events import Event
from plasma_trio.hub import Hub
from plasma_trio.session import Ending, Outbox, Phase, Session, WriterGone, admit
from tests.helpers import make_config
from tests.test_session_unit import FakeWriter, ask


def open_session(hub: Hub, capacity: int, **overrides: object) -> tuple[Session, FakeWriter]:
    session = admit(hub, make_config(**overrides), ask("a"))
    writer = FakeWriter(capacity)
    writer.session = session
    return session, writer


def outbox(session: Session) -> Outbox:
    assert session.out is not None
    return session.out


async def test_what_the_writer_does_not_take_waits_in_order_and_counts_once_written() -> None:
    hub = Hub(epoch=3)
    session, writer = open_session(hub, capacity=10)
    with session.subscribed(writer):
        out = outbox(session)
        await hub.publish(Event("a", b"12345678"))  # "3-1=12345678;" is 13 bytes
        assert writer.written == b"3-1=123456"  # what fitted
        assert out.depth == 1
        assert session.stalled_since is not None
        await hub.publish(Event("a", b"x"))
        await hub.publish(Event("a", b"y"))
        assert out.depth == 3  # the rest of the first, then two whole frames
        assert hub.statistics().events_delivered["sse"] == 0  # none written in full
        writer.drain(5)
        out.flush()  # takes the first's rest and 2 bytes of the second
        assert writer.written == b"3-1=12345678;3-"
        assert hub.statistics().events_delivered["sse"] == 1
        assert out.depth == 2
        writer.drain(100)
        out.flush()
        assert writer.tokens() == ["3-1", "3-2", "3-3"]
        assert hub.statistics().events_delivered["sse"] == 3
        assert out.depth == 0
        assert session.stalled_since is None
        await hub.publish(Event("a"))  # nothing waits: written at once again
        assert writer.tokens()[-1] == "3-4"


async def test_the_bound_counts_frames_and_cuts_off_a_client_that_takes_nothing() -> None:
    hub = Hub()
    session, writer = open_session(hub, capacity=0, subscriber_buffer=3)
    with session.subscribed(writer):
        for _ in range(3):
            await hub.publish(Event("a"))
        assert session.ending is None
        await hub.publish(Event("a"))  # a fourth frame: over the bound
        assert session.ending is Ending.CUT_OFF
        assert writer.closes == [(Ending.CUT_OFF, True)]  # stalled: released now
    assert hub.statistics().cut_off["sse"] == 1


async def test_a_replay_batch_is_one_frame_counted_as_its_events() -> None:
    hub = Hub(epoch=4)
    for _ in range(3):
        await hub.publish(Event("a"))
    session, writer = open_session(hub, capacity=1 << 20)
    session.ask = ask("a", last_id="4-1")
    with session.subscribed(writer):
        out = outbox(session)
        out.put_items(await session.replay_step())
        assert writer.tokens() == ["4-2", "4-3"]
        assert hub.statistics().events_delivered["sse"] == 2


async def test_the_end_comes_after_what_is_queued_or_once_when_cut_off() -> None:
    hub = Hub()
    session, writer = open_session(hub, capacity=0)
    with session.subscribed(writer):
        out = outbox(session)
        await hub.publish(Event("a"))
        hub.close()  # shutdown: ending, what is queued still goes
        assert out.phase is Phase.ENDING
        writer.drain(1 << 20)
        await out.finish(write_timeout=5)
        assert writer.tokens()[-1] == "end"
        assert len(writer.tokens()) == 2
    cut, cut_writer = open_session(Hub(), capacity=0, subscriber_buffer=1)
    with cut.subscribed(cut_writer):
        hub = cut.hub
        await hub.publish(Event("a"))
        await hub.publish(Event("a"))  # cut off
        cut_writer.drain(4)  # the client reads a little, once
        with trio.fail_after(1):
            await outbox(cut).finish(write_timeout=5)  # one try, no wait
        assert len(cut_writer.written) == 4


class GoneWriter(FakeWriter):
    def write_nowait(self, data: bytes | memoryview) -> int:
        raise WriterGone


async def test_a_client_gone_breaks_the_stream_and_nothing_more_is_written() -> None:
    hub = Hub()
    session = admit(hub, make_config(), ask("a"))
    writer = GoneWriter()
    with session.subscribed(writer):
        out = outbox(session)
        await hub.publish(Event("a"))
        assert out.broken
        await hub.publish(Event("a"))  # ignored: nothing to write to
        assert out.depth == 0
        await out.finish(write_timeout=5)
    assert hub.statistics().events_delivered["sse"] == 0
    assert hub.statistics().cut_off["sse"] == 0


async def test_the_pump_writes_what_waits_when_the_writer_is_writable() -> None:
    """The writer's task: waits for writability only while something waits,
    and a wake-up (something queued, the end) is never lost."""
    hub = Hub()
    session, writer = open_session(hub, capacity=0)
    with session.subscribed(writer):
        out = outbox(session)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(out.pump)
            await hub.publish(Event("a"))
            await trio.testing.wait_all_tasks_blocked()
            assert writer.tokens() == []
            writer.drain(1 << 20)
            await trio.testing.wait_all_tasks_blocked()
            assert len(writer.tokens()) == 1
            session.close(cut_off=False)  # the end wakes the pump: it returns
            with trio.fail_after(5):
                await trio.testing.wait_all_tasks_blocked()
            assert out.phase is Phase.ENDING
            nursery.cancel_scope.cancel()
