"""The Session on its own, with a fake writer: every rule a transport relies on.

No sockets: a real Hub, a real Config, and a writer that records what the
session asks of it (and applies the session's bound, as real writers do).
The same rules are checked end to end on every transport elsewhere
(test_session.py, test_refusals.py).
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import trio

from plasma_trio.core.events import Event
from plasma_trio.hub import Hub, StampedEvent
from plasma_trio.replay import event_size
from plasma_trio.session import (
    Ask,
    Ending,
    Gap,
    Refused,
    Session,
    State,
    admit,
)
from plasma_trio.watch import watch_subscribers
from tests.helpers import make_config


class FakeWriter:
    """Records the session's calls; queues live events under the session's bound."""

    heartbeats = True

    def __init__(self) -> None:
        self.session: Session | None = None
        self.items: list[StampedEvent | Gap] = []
        self.heartbeat_count = 0
        self.closes: list[bool] = []
        self.queued_bytes = 0

    def offer(self, event: StampedEvent) -> bool:
        assert self.session is not None
        if not self.session.fits(len(self.items), self.queued_bytes, event_size(event)):
            return False
        self.items.append(event)
        self.queued_bytes += event_size(event)
        return True

    def notice(self, gap: Gap) -> None:
        self.items.append(gap)

    def heartbeat(self) -> None:
        self.heartbeat_count += 1

    def close(self, *, cut_off: bool) -> None:
        self.closes.append(cut_off)

    @property
    def queue_depth(self) -> int:
        return len(self.items)


def status(ending: Ending, refused: Refused | None) -> str:
    return refused.kind if refused is not None else ending.name


def ask(*topics: str, last_id: str | None = None, transport: Any = "sse") -> Ask:
    return Ask(transport, status, topics, last_id=last_id, remote_addr="192.0.2.1")


def session_of(hub: Hub, *topics: str, **overrides: Any) -> tuple[Session, FakeWriter]:
    last_id = overrides.pop("last_id", None)
    session = admit(hub, make_config(**overrides), ask(*topics, last_id=last_id))
    writer = FakeWriter()
    writer.session = session
    return session, writer


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [
        {**r.__dict__, "message": r.getMessage()}
        for r in caplog.records
        if r.name == "plasma_trio.access"
    ]


def ids(items: list[StampedEvent | Gap]) -> list[str]:
    return [item.id if isinstance(item, StampedEvent) else "gap" for item in items]


@pytest.fixture(autouse=True)
def _access_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="plasma_trio.access")


async def test_admission_refuses_with_the_kind_each_transport_maps() -> None:
    hub = Hub(max_connections=1)
    config = make_config(max_topics=2)
    with pytest.raises(Refused) as invalid:
        admit(hub, config, ask("a", "b", "c"))
    assert invalid.value.kind == "invalid"
    with pytest.raises(Refused) as missing:
        admit(hub, config, ask())
    assert missing.value.kind == "invalid"
    # gRPC: a stream may start with no topics.
    admit(hub, config, Ask("grpc", status, (), require_topics=False))
    session, writer = session_of(hub, "a")
    with session.subscribed(writer):
        with pytest.raises(Refused) as full:
            admit(hub, config, ask("a"))
        assert full.value.kind == "unavailable"
    hub.close()
    with pytest.raises(Refused) as closing:
        admit(hub, config, ask("a"))
    assert (closing.value.kind, closing.value.message) == ("unavailable", "server is shutting down")


async def test_a_refusal_after_admission_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Shutdown (or the limit) between admission and subscribing: locate and
    subscribed refuse, with one access-log line."""
    hub = Hub(max_connections=1)
    first, first_writer = session_of(hub, "a")
    second, second_writer = session_of(hub, "a")
    with first.subscribed(first_writer):
        with pytest.raises(Refused) as late:
            with second.subscribed(second_writer):
                pytest.fail("subscribed over the limit")
        assert late.value.kind == "unavailable"
    third, _ = session_of(hub, "a")
    hub.close()
    with pytest.raises(Refused):
        await third.locate()
    refusals = [line for line in access_lines(caplog) if line["ending"].startswith("refused")]
    assert [line["status"] for line in refusals] == ["unavailable"]  # `third` is the caller's
    assert refusals[0]["ending"] == "refused: connection limit of 1 reached"


async def test_live_events_reach_the_writer_and_are_counted_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    hub = Hub()
    session, writer = session_of(hub, "a")
    with session.subscribed(writer) as gap:
        assert gap is None
        assert session.state is State.LIVE
        for _ in range(3):
            await hub.publish(Event("a:x"))
        await hub.publish(Event("b"))  # not a topic of this session
        assert ids(writer.items) == [f"{hub.epoch}-{n}" for n in (1, 2, 3)]
        for item in writer.items:
            assert isinstance(item, StampedEvent)
            session.delivered(item)
    assert hub.statistics().events_delivered["sse"] == 3
    [line] = access_lines(caplog)
    assert (line["events"], line["ending"], line["status"]) == (3, "client closed", "CLIENT_CLOSED")
    assert line["topics"] == ["a"]
    assert hub.statistics().connections_total == 0


async def test_a_replay_then_what_arrived_meanwhile_in_order() -> None:
    """Live events and a loss notice during a replay are held by the session
    and come after the replay, in order; then the fan-out goes to the writer."""
    hub = Hub(epoch=5)
    for _ in range(5):
        await hub.publish(Event("a"))
    session, writer = session_of(hub, "a", last_id="5-2")
    with session.subscribed(writer) as gap:
        assert gap is None
        assert session.state is State.REPLAYING
        await hub.publish(Event("a"))  # 5-6, held
        await hub.announce_loss()  # held, after 5-6
        await hub.publish(Event("a"))  # 5-7 (the id the notice promised), held
        assert writer.items == []
        assert session.queue_depth == 3
        assert ids(await session.replay_step()) == ["5-3", "5-4", "5-5"]
        assert ids(await session.replay_step()) == ["5-6", "gap", "5-7"]
        assert session.state is State.LIVE
        await hub.publish(Event("a"))
        assert ids(writer.items) == ["5-8"]


async def test_a_resume_from_before_the_history_gets_the_gap_first() -> None:
    hub = Hub(epoch=5, history_size=2)
    for _ in range(5):
        await hub.publish(Event("a"))
    session, writer = session_of(hub, "a", last_id="5-1")
    with session.subscribed(writer) as gap:
        assert gap is not None
        assert (gap.requested, gap.oldest) == ("5-1", "5-4")
        assert ids(await session.replay_step()) == ["5-4", "5-5"]


async def test_held_events_over_the_bound_cut_the_session_off(
    caplog: pytest.LogCaptureFixture,
) -> None:
    hub = Hub(epoch=5)
    await hub.publish(Event("a"))
    await hub.publish(Event("a"))
    session, writer = session_of(hub, "a", last_id="5-1", subscriber_buffer=2)
    with session.subscribed(writer):
        for _ in range(3):
            await hub.publish(Event("a"))
        assert writer.closes == [True]
        assert session.ending is Ending.CUT_OFF
        assert await session.replay_step() == []  # the replay ends where it is
    assert hub.statistics().cut_off["sse"] == 1
    assert access_lines(caplog)[-1]["ending"] == "cut off (slow consumer)"


async def test_live_bound_in_bytes_cuts_off_at_the_writer() -> None:
    hub = Hub()
    session, writer = session_of(hub, "a", subscriber_buffer_bytes=400)
    with session.subscribed(writer):
        await hub.publish(Event("a", b'"' + b"x" * 200 + b'"'))
        assert writer.closes == []
        await hub.publish(Event("a", b'"' + b"x" * 200 + b'"'))
        assert writer.closes == [True]


async def test_ending_reasons_first_wins_but_a_cut_off(caplog: pytest.LogCaptureFixture) -> None:
    hub = Hub()
    forced, forced_writer = session_of(hub, "a")
    with forced.subscribed(forced_writer):
        forced.end(Ending.FORCE_CLOSE)
        forced.close(cut_off=False)  # shutdown later: the first reason stays
        assert forced.ending is Ending.FORCE_CLOSE
        forced.cut_off()  # a cut-off overrides (the client stopped reading)
        assert forced.ending is Ending.CUT_OFF
    shut, shut_writer = session_of(hub, "a")
    with shut.subscribed(shut_writer):
        hub.close()
    assert shut.ending is Ending.SHUTDOWN
    assert shut_writer.closes == [False]
    assert [line["ending"] for line in access_lines(caplog)] == [
        "cut off (slow consumer)",
        "server shutdown",
    ]


async def test_a_cancelled_stream_ends_as_client_closed_or_shutdown_deadline() -> None:
    hub = Hub()
    gone, gone_writer = session_of(hub, "a")
    with trio.CancelScope() as scope, gone.subscribed(gone_writer):
        scope.cancel()
        await trio.sleep_forever()
    assert gone.ending is Ending.CLIENT_CLOSED
    late, late_writer = session_of(hub, "a")
    with trio.CancelScope() as scope, late.subscribed(late_writer):
        hub.close()
        scope.cancel()
        await trio.sleep_forever()
    # Closed by the hub (shutdown), then cancelled before it had drained.
    assert late.ending is Ending.SHUTDOWN_DEADLINE


async def test_the_watcher_cuts_off_a_stalled_session_and_beats_an_idle_one() -> None:
    hub = Hub()
    stalled, stalled_writer = session_of(hub, "a")
    idle, idle_writer = session_of(hub, "a")
    async with trio.open_nursery() as nursery:
        with stalled.subscribed(stalled_writer), idle.subscribed(idle_writer):
            nursery.start_soon(watch_subscribers, hub, 0.2, 0.4)
            stalled.stall()
            with trio.fail_after(10):
                while stalled.ending is None or not idle_writer.heartbeat_count:
                    await trio.sleep(0.05)
            assert stalled.ending is Ending.CUT_OFF
            assert stalled_writer.closes == [True]
            assert stalled_writer.heartbeat_count == 0  # a stalled stream is not idle
            assert idle.ending is None
        nursery.cancel_scope.cancel()


async def test_every_transport_logs_the_same_fields(caplog: pytest.LogCaptureFixture) -> None:
    hub = Hub()
    for transport in ("sse", "grpc"):
        session = admit(hub, make_config(), ask("a", transport=transport))
        writer = FakeWriter()
        writer.session = session
        with session.subscribed(writer):
            pass
    sse, grpc = access_lines(caplog)
    fields = {"transport", "status", "remote_addr", "user_agent", "topics", "duration", "events"}
    fields |= {"ending"}
    assert fields <= sse.keys()
    assert fields <= grpc.keys()
    assert (sse["message"], grpc["message"]) == ("sse stream ended", "grpc stream ended")
