"""The Session on its own, with a fake writer: every rule a transport relies on.

No sockets: a real Hub, a real Config, and a writer that records what the
session asks of it (and applies the session's bound, as real writers do).
The same rules are checked end to end on every transport elsewhere
(test_session.py, test_refusals.py).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import pytest
import trio

from plasma_trio.core.events import Event
from plasma_trio.hub import Hub, StampedEvent
from plasma_trio.session import (
    Ask,
    End,
    Ending,
    Gap,
    Phase,
    Refused,
    Session,
    State,
    admit,
)
from plasma_trio.watch import watch_subscribers
from tests.helpers import make_config

if TYPE_CHECKING:
    from plasma_trio.writer import Item


class FakeWriter:
    """A socket in memory: takes up to ``capacity`` bytes (then nothing until
    :meth:`drain`), renders items as readable tokens, records the closes."""

    heartbeats = True
    wire_key = "fake"  # (no event carries a frame of this kind: render is called)

    def __init__(self, capacity: int = 1 << 30) -> None:
        self.session: Session | None = None
        self.capacity = capacity
        self.written = bytearray()
        self.closes: list[tuple[Ending | None, bool]] = []
        self.writes = 0  # write_nowait calls
        self._more: trio.Event | None = None

    def render(self, item: Item) -> bytes:
        if isinstance(item, StampedEvent):
            return f"{item.id}=".encode() + (item.event.data or b"") + b";"
        if isinstance(item, Gap):
            return b"gap;"
        if isinstance(item, End):
            return b"end;"
        return b"hb;"

    def write_nowait(self, data: bytes | memoryview) -> int:
        part = bytes(data[: max(0, self.capacity - len(self.written))])
        self.writes += 1
        self.written += part
        return len(part)

    async def wait_writable(self) -> None:
        while len(self.written) >= self.capacity:
            self._more = trio.Event()
            await self._more.wait()

    async def receive(self) -> None:
        await trio.sleep_forever()

    def close(self, end: End, *, stalled: bool) -> None:
        self.closes.append((end.ending, stalled))

    def drain(self, more: int) -> None:
        """The client read: ``more`` bytes fit again."""
        self.capacity += more
        if self._more is not None:
            self._more.set()

    def tokens(self) -> list[str]:
        return [t.split("=")[0] for t in self.written.decode().split(";") if t]

    @property
    def heartbeat_count(self) -> int:
        return self.tokens().count("hb")


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
        assert writer.tokens() == [f"{hub.epoch}-{n}" for n in (1, 2, 3)]
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
        assert writer.tokens() == []
        assert session.queue_depth == 3
        assert ids(await session.replay_step()) == ["5-3", "5-4", "5-5"]
        assert ids(await session.replay_step()) == ["5-6", "gap", "5-7"]
        assert session.state is State.LIVE
        await hub.publish(Event("a"))
        assert writer.tokens() == ["5-8"]


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
        assert writer.closes == [(Ending.CUT_OFF, False)]
        assert session.ending is Ending.CUT_OFF
        assert await session.replay_step() == []  # the replay ends where it is
    assert hub.statistics().cut_off["sse"] == 1
    assert access_lines(caplog)[-1]["ending"] == "cut off (slow consumer)"


async def test_live_bound_in_bytes_cuts_off_at_the_outbox() -> None:
    """A client that takes nothing: the first event waits, the second would
    take the queue over 400 bytes (the frames as rendered)."""
    hub = Hub()
    session, writer = session_of(hub, "a", subscriber_buffer_bytes=400)
    writer.capacity = 0
    with session.subscribed(writer):
        await hub.publish(Event("a", b'"' + b"x" * 200 + b'"'))
        assert writer.closes == []
        assert session.queue_depth == 1
        assert session.stalled_since is not None
        await hub.publish(Event("a", b'"' + b"x" * 200 + b'"'))
        assert writer.closes == [(Ending.CUT_OFF, True)]  # stalled: released at once


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
    assert shut.out is not None
    assert shut.out.phase is Phase.ENDING  # what is queued still goes
    assert shut_writer.closes == []
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
            assert stalled_writer.closes == [(Ending.CUT_OFF, True)]
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
