"""The mock source (SPEC 4) and the JSON error/access logs (SPEC 7)."""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

import httpx
import trio
import trio.testing

from plasma_trio import logs
from plasma_trio.hub import Batch, Hub, StampedEvent
from plasma_trio.sources.mock import MOCK_TYPES, MockSource
from tests.helpers import (
    SSE_HEADERS,
    base_url,
    first_chunk,
    make_config,
    running_server,
    wait_for_figure,
)

if TYPE_CHECKING:
    from pathlib import Path


class ChannelSink:
    """A hub sink that queues every event on a trio channel."""

    heartbeats = False
    stalled_since = None
    queue_depth = 0

    def __init__(self) -> None:
        self.send, self.receive = trio.open_memory_channel[StampedEvent](100)

    def offer(self, event: StampedEvent) -> bool:
        self.send.send_nowait(event)
        return True

    def offer_batch(self, batch: Batch) -> int:
        for event in batch.events:
            self.send.send_nowait(event)
        return len(batch)

    def close(self, *, cut_off: bool) -> None:
        self.send.close()

    def loss(self, requested: str | None, oldest: str | None) -> None:
        pass

    def heartbeat(self) -> None:
        pass


async def test_mock_source_cycles_types_every_interval(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hub = Hub()
    sink = ChannelSink()
    with hub.subscribe("sse", sink, frozenset(MOCK_TYPES)):
        async with trio.open_nursery() as nursery:
            await nursery.start(MockSource(2.5).run, hub)
            start = trio.current_time()
            got = [await sink.receive.receive() for _ in range(7)]
            assert trio.current_time() - start == 7 * 2.5
            nursery.cancel_scope.cancel()
    assert [e.event.type for e in got] == ["poll", "program", "other"] * 2 + ["poll"]
    assert [json.loads(e.event.data or b"")["n"] for e in got] == list(range(1, 8))


async def test_access_log_entry_per_stream_with_forwarded_for(tmp_path: Path) -> None:
    access_file, error_file = tmp_path / "access.log", tmp_path / "error.log"
    overrides = {
        "access_log_out": str(access_file),
        "error_log_out": str(error_file),
        "error_log_level": "warn",
    }
    logs.configure(make_config(**overrides))
    try:
        with trio.fail_after(10):
            async with (
                running_server(debug=True, **overrides) as srv,
                httpx.AsyncClient(base_url=base_url(srv)) as client,
            ):
                headers = {
                    **SSE_HEADERS,
                    "X-Forwarded-For": "203.0.113.7, 10.0.0.1",
                    "User-Agent": "probe/1",
                }
                async with client.stream("GET", "/?eventType=b,a", headers=headers) as resp:
                    await first_chunk(resp)
                await wait_for_figure(srv, "connections_sse", 0)
                await client.post("/debug", content=b"{bad")
        for handler in logs.ACCESS.handlers + logs.ERROR.handlers:
            handler.flush()
        entries = [json.loads(line) for line in access_file.read_text().splitlines()]
        assert len(entries) == 1
        entry = entries[0]
        assert entry["remote_addr"] == "203.0.113.7"
        assert entry["user_agent"] == "probe/1"
        assert entry["topics"] == ["a", "b"]
        assert entry["transport"] == "sse"
        assert entry["status"] == 200
        assert entry["duration"] >= 0
        assert entry["events"] == 0
        assert {"time", "level", "msg"} <= entry.keys()
        errors = [json.loads(line) for line in error_file.read_text().splitlines()]
        # Level warn: the info start-up lines are filtered out, the rejected event is kept.
        assert [e["msg"] for e in errors] == ["invalid event rejected"]
        assert errors[0]["level"] == "WARNING"
    finally:
        logs.configure(make_config())


def test_level_names_are_plasmas() -> None:
    assert logs.level_of("panic") == logs.level_of("fatal") == logging.CRITICAL
    assert logs.level_of("warn") == logging.WARNING
    assert logs.level_of("DEBUG") == logging.DEBUG
