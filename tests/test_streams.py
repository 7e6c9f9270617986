"""The redis-streams source (SPEC 4, 9) against real redis-server processes.

redis-cli is the independent publisher and the referee: what the stream
holds (``XRANGE``) is what subscribers must end up with, exactly once each.
Every way a subscriber arrives by (SSE plain, TLS, HTTP/2; gRPC) is tested
where the behaviour is per transport (resume across instances, the gap
notices).
"""

from __future__ import annotations

import contextlib
import json
import re
from typing import TYPE_CHECKING, Any

import grpc
import httpx
import pytest
import trio

from plasma_trio.publisher import PublishError, RedisPublisher
from tests.grpc_clients import GrpcioStream
from tests.helpers import (
    cli_publish,
    figures_of,
    plasma_env,
    running_server,
    wait_for_figure,
    wait_until,
)
from tests.redis_server import RedisServer
from tests.test_session import WAYS, Harness, harness, read_all

if TYPE_CHECKING:
    from collections.abc import Iterator

    import trustme

ENTRY = re.compile(r"^\d+-\d+$")


def streams_settings(redis: RedisServer, *keys: str, **extra: Any) -> dict[str, Any]:
    return {
        "subscriber_type": "redis-streams",
        "subscriber_redis_addr": redis.addr,
        "subscriber_redis_streams": keys or ("s",),
        "subscriber_redis_timeout": 0.5,
        "subscriber_redis_retry_interval": 0.1,
        "subscriber_redis_over_max_retry_behavior": "alive",
        "debug": True,
        **extra,
    }


def xadd(redis: RedisServer, key: str, event_type: str, data: Any, entry_id: str = "*") -> str:
    body = json.dumps({"meta": {"type": event_type}, "data": data})
    return redis.cli("XADD", key, entry_id, "event", body).strip()


async def axadd(redis: RedisServer, key: str, event_type: str, data: Any) -> str:
    return await trio.to_thread.run_sync(xadd, redis, key, event_type, data)


def entries_of(redis: RedisServer, key: str) -> list[tuple[str, str]]:
    """Every (entry id, event JSON) the stream holds, in order."""
    script = (
        "local out = {} for _, e in ipairs(redis.call('XRANGE', KEYS[1], '-', '+')) do"
        " out[#out + 1] = e[1] out[#out + 1] = e[2][2] end return out"
    )
    lines = redis.cli("EVAL", script, "1", key).splitlines()
    return list(zip(lines[0::2], lines[1::2], strict=True))


def stream_ids(redis: RedisServer, key: str) -> list[str]:
    """Every entry id the stream holds, in order (redis-cli's flat XRANGE output)."""
    lines = redis.cli("XRANGE", key, "-", "+").split()
    return [line for line in lines if ENTRY.match(line)]


@pytest.fixture
def aof_redis() -> Iterator[RedisServer]:
    server = RedisServer(aof=True)
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


async def reading(
    nursery: trio.Nursery, h: Harness, topic: str, last_event_id: str = ""
) -> list[tuple[str, str]]:
    """A subscriber of ``topic`` reading into the list returned, once it is
    subscribed (see :func:`read_all`)."""
    got: list[tuple[str, str]] = []
    await nursery.start(
        lambda task_status: read_all(
            h, topic, got, last_event_id=last_event_id, task_status=task_status
        )
    )
    return got


async def until_marker(
    redis: RedisServer, key: str, got: list[tuple[str, str]], timeout: float = 10
) -> None:
    """Append an end marker (topic ``t``) to ``key``, wait until ``got`` ends
    with it and take it off: events reach a subscriber in order, so what
    ``got`` holds then is all that came before it (instead of a quiet period
    taken for "nothing else may follow")."""
    await axadd(redis, key, "t", "end")
    await wait_until(lambda: bool(got) and got[-1][1] == '"end"', timeout, "the end marker")
    got.pop()


async def replay_of(
    h: Harness, last_id: str, count: int, timeout: float = 20
) -> list[tuple[str, str]]:
    """What a subscriber of topic ``t`` resuming from ``last_id`` receives: at
    least ``count`` events, and whatever follows within 0.3 s."""
    async with trio.open_nursery() as nursery:
        got = await reading(nursery, h, "t", last_event_id=last_id)
        await wait_until(lambda: len(got) >= count, timeout, "the replay")
        await trio.sleep(0.3)  # nothing else may follow
        nursery.cancel_scope.cancel()
    return got


# -- ids and resume across instances -----------------------------------------


@pytest.mark.parametrize("way", WAYS)
async def test_resume_on_another_instance(
    way: str, ca: trustme.CA, tls_files: dict[str, str], redis_server: RedisServer
) -> None:
    """A client reads from one instance, reconnects to a second one (started
    after the events it missed were published) with its last id, and gets
    exactly what it missed, in order, then live events: ids are the entry ids."""
    settings = streams_settings(redis_server)
    with trio.fail_after(40):
        async with harness(way, ca, tls_files, **settings) as a, a.client() as client:
            async with trio.open_nursery() as nursery:
                got = await reading(nursery, a, "t")
                await a.publish(client, "t", 0)  # XADD through /debug
                ids = [await axadd(redis_server, "s", "t:x", n) for n in (1, 2)]
                await wait_until(lambda: len(got) >= 3, 10, "the first events")
                nursery.cancel_scope.cancel()
            assert [event_id for event_id, _ in got] == stream_ids(redis_server, "s")
            assert got[1:] == [(ids[0], "1"), (ids[1], "2")]
            last = got[-1][0]
            missed = [await axadd(redis_server, "s", "t", n) for n in (3, 4, 5)]
            await axadd(redis_server, "s", "other", -1)  # not subscribed
            async with harness(way, ca, tls_files, **settings) as b:
                async with trio.open_nursery() as nursery:
                    got_b = await reading(nursery, b, "t", last_event_id=last)
                    await wait_until(lambda: len(got_b) >= 3, 10, "the replay")
                    live = await axadd(redis_server, "s", "t", 6)
                    await until_marker(redis_server, "s", got_b)
                    nursery.cancel_scope.cancel()
    assert got_b == [(missed[0], "3"), (missed[1], "4"), (missed[2], "5"), (live, "6")]


async def test_a_client_ahead_of_this_instance_gets_nothing_twice(
    redis_server: RedisServer,
) -> None:
    """A client resumes from an entry this instance has not read yet (it
    came from an instance that is ahead): the instance catches up first, and
    neither replays nor re-sends what the client has."""
    settings = streams_settings(redis_server, subscriber_redis_retry_interval=1.0)
    with trio.fail_after(30):
        async with running_server(**settings) as srv, httpx.AsyncClient() as client:
            first = await axadd(redis_server, "s", "t", 1)
            await wait_for_figure(srv, "last_event_id", first)
            # The reader is cut off for a second: entries written meanwhile
            # are ones "another instance" may already have delivered.
            redis_server.cli("CLIENT", "KILL", "TYPE", "normal")
            await wait_for_figure(srv, "redis_connected", False)
            ahead = await axadd(redis_server, "s", "t", 2)
            got: list[str] = []

            async def resume() -> None:
                async with client.stream(
                    "GET",
                    f"http://127.0.0.1:{srv.port}/?eventType=t",
                    headers={"Accept": "text/event-stream", "Last-Event-ID": ahead},
                ) as response:
                    async for line in response.aiter_lines():
                        if line.startswith(("id:", "event:")):
                            got.append(line)  # noqa: PERF401 - read while it streams

            async with trio.open_nursery() as nursery:
                nursery.start_soon(resume)
                await wait_for_figure(srv, "last_event_id", ahead)
                await wait_for_figure(srv, "connections_sse", 1)
                after = await axadd(redis_server, "s", "t", 3)
                marker = await axadd(redis_server, "s", "t", "end")  # what comes before it is all
                await wait_until(lambda: f"id: {marker}" in got, 10, "the end marker")
                nursery.cancel_scope.cancel()
    assert got == [f"id: {after}", f"id: {marker}"]


async def test_two_keys_give_positions_and_resume_continues_both(
    ca: trustme.CA, tls_files: dict[str, str], redis_server: RedisServer
) -> None:
    """With two keys an id is the last entry id of each key; resuming from it
    replays what was missed on both keys, once."""
    settings = streams_settings(redis_server, "k1", "k2")
    with trio.fail_after(30):
        async with harness("sse", ca, tls_files, **settings) as h:
            async with trio.open_nursery() as nursery:
                got = await reading(nursery, h, "t")
                e1 = await axadd(redis_server, "k1", "t", "a")
                await wait_until(lambda: len(got) >= 1)
                e2 = await axadd(redis_server, "k2", "t", "b")
                await wait_until(lambda: len(got) >= 2)
                nursery.cancel_scope.cancel()
            assert got == [(f"{e1},0-0", '"a"'), (f"{e1},{e2}", '"b"')]
            f1 = await axadd(redis_server, "k1", "t", "c")
            f2 = await axadd(redis_server, "k2", "t", "d")
            f3 = await axadd(redis_server, "k1", "t", "e")
        async with harness("grpc", ca, tls_files, **settings) as other:
            async with trio.open_nursery() as nursery:
                again = await reading(nursery, other, "t", last_event_id=got[-1][0])
                await wait_until(lambda: len(again) >= 3, 10, "the replay")
                await until_marker(redis_server, "k1", again)
                nursery.cancel_scope.cancel()
    # The new instance read the keys in its own order; each key's entries in order.
    datas = [data for _, data in again]
    assert sorted(datas) == ['"c"', '"d"', '"e"']
    assert datas.index('"c"') < datas.index('"e"')
    assert again[-1][0] in (f"{f3},{f2}",)
    assert {event_id.split(",")[0] for event_id, _ in again} <= {e1, f1, f3}


FILL = """
local ids = {}
for i = 1, tonumber(ARGV[1]) do
  local kind = (i % 3 == 0) and 'other' or 't'
  local body = '{"meta":{"type":"' .. kind .. '"},"data":' .. i .. '}'
  ids[i] = redis.call('XADD', KEYS[1], '*', 'event', body)
end
return #ids
"""


@pytest.mark.parametrize("way", WAYS)
async def test_resume_older_than_the_window_reads_the_stream(
    way: str, ca: trustme.CA, tls_files: dict[str, str], redis_server: RedisServer
) -> None:
    """A client 1,200 entries behind an instance that holds 20 for replay:
    Redis still has its entry, so it gets no gap notice but every entry of
    its topics it missed (read from Redis a page at a time as it drains
    them, the other topic's skipped), in order, with the entries' ids, and
    then live events."""
    settings = streams_settings(redis_server, history_size=20)
    first = await axadd(redis_server, "s", "t", 0)
    await trio.to_thread.run_sync(lambda: redis_server.cli("EVAL", FILL, "1", "s", "1200"))
    expected = [
        (entry_id, data)
        for entry_id, data in await trio.to_thread.run_sync(entries_of, redis_server, "s")
        if entry_id != first and json.loads(data)["meta"]["type"] == "t"
    ]
    assert len(expected) == 800
    with trio.fail_after(60):
        async with harness(way, ca, tls_files, **settings) as h:
            async with trio.open_nursery() as nursery:
                got = await reading(nursery, h, "t", last_event_id=first)
                await wait_until(lambda: len(got) >= 800, 30, "the replay")
                live = await axadd(redis_server, "s", "t", "live")
                await until_marker(redis_server, "s", got)
                nursery.cancel_scope.cancel()
    assert "plasma-gap" not in [entry_id for entry_id, _ in got]
    assert got[:800] == [
        (entry_id, json.dumps(json.loads(data)["data"])) for entry_id, data in expected
    ]
    assert got[800:] == [(live, '"live"')]


async def test_grpc_repeated_request_does_not_replay_from_redis_again(
    redis_server: RedisServer,
) -> None:
    """gRPC: a later Request carrying the same old lastEventId (topics
    widened) after a replay read from Redis sends none of those entries
    again; live events follow once."""
    settings = streams_settings(redis_server, history_size=20)
    first = await axadd(redis_server, "s", "t", 0)
    await trio.to_thread.run_sync(lambda: redis_server.cli("EVAL", FILL, "1", "s", "300"))
    with trio.fail_after(40):
        async with running_server(**settings) as srv:
            stream = GrpcioStream(srv.grpc_port)
            try:
                stream.send("t", last_event_id=first)
                replayed = [json.loads((await stream.receive()).data) for _ in range(200)]
                assert replayed == [n for n in range(1, 301) if n % 3]
                stream.send("t", "u", last_event_id=first)
                await wait_for_figure(srv, "topics", 2)  # "t" and "u"
                live = await axadd(redis_server, "s", "u", "live")
                payload = await stream.receive()
                assert (payload.id, payload.data) == (live, '"live"')
            finally:
                stream.close()


BIG_FILL = """
for i = 1, tonumber(ARGV[1]) do
  local body = '{"meta":{"type":"t"},"data":"' .. string.rep('x', 16000) .. i .. '"}'
  redis.call('XADD', KEYS[1], '*', 'event', body)
end
return 1
"""


@pytest.mark.parametrize("way", ["sse", "grpc"])
async def test_trimmed_while_replaying_from_redis_cuts_off(
    way: str, ca: trustme.CA, redis_server: RedisServer
) -> None:
    """A client replaying from Redis stops reading (1,200 entries of 16 KB:
    more than the socket buffers hold) and the stream is trimmed past its
    place meanwhile: when it reads on, the replay cannot continue and the
    stream is cut off after what was already on its way (counted as a
    cut-off); its reconnect from the last id it got gets the gap notice."""
    settings = streams_settings(redis_server, history_size=20, subscriber_write_timeout=30.0)
    first = await axadd(redis_server, "s", "t", 0)
    await trio.to_thread.run_sync(lambda: redis_server.cli("EVAL", BIG_FILL, "1", "s", "1200"))
    ids: list[str] = []
    with trio.fail_after(60):
        async with running_server(**settings) as srv, httpx.AsyncClient(timeout=30) as client:
            trimmed = trio.Event()

            async def trim_when_paused() -> None:
                while len(ids) < 5:
                    await trio.sleep(0.01)
                await trio.sleep(0.5)  # the server fills the socket buffers and waits
                await trio.to_thread.run_sync(
                    lambda: redis_server.cli("XTRIM", "s", "MAXLEN", "50")
                )
                trimmed.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(trim_when_paused)
                if way == "sse":
                    url = f"http://127.0.0.1:{srv.port}/?eventType=t"
                    headers = {"Accept": "text/event-stream", "Last-Event-ID": first}
                    with contextlib.suppress(httpx.RemoteProtocolError, httpx.ReadError):
                        async with client.stream("GET", url, headers=headers) as response:
                            async for line in response.aiter_lines():
                                if line.startswith("id: "):
                                    ids.append(line[4:])
                                    if len(ids) == 5:
                                        await trimmed.wait()  # stop reading meanwhile
                else:
                    stream = GrpcioStream(srv.grpc_port)
                    try:
                        stream.send("t", last_event_id=first)
                        code = None
                        try:
                            while True:
                                ids.append((await stream.receive()).id)
                                if len(ids) == 5:
                                    await trimmed.wait()
                        except grpc.RpcError as exc:
                            code = exc.code()
                        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
                    finally:
                        stream.close()
            assert 5 <= len(ids) < 1200
            figures = await figures_of(srv)
            assert figures[f"subscribers_cut_off_{way}"] == 1
            async with trio.open_nursery() as nursery:
                h = Harness(srv, way, ca)
                again = await reading(nursery, h, "t", last_event_id=ids[-1])
                await wait_until(lambda: len(again) >= 1, 10, "the gap notice")
                nursery.cancel_scope.cancel()
    assert again[0][0] == "plasma-gap"


async def test_clients_resuming_together_share_pages_and_get_everything(
    ca: trustme.CA, redis_server: RedisServer
) -> None:
    """Six clients resume from the same old entry at once (the pages they read
    from Redis are shared), and a seventh that leaves at once takes nothing
    from them: each of the six gets every entry of its topics, in order."""
    settings = streams_settings(redis_server, history_size=20)
    first = await axadd(redis_server, "s", "t", 0)
    await trio.to_thread.run_sync(lambda: redis_server.cli("EVAL", FILL, "1", "s", "1200"))
    with trio.fail_after(60):
        async with harness("sse", ca, {}, **settings) as h, h.client() as client:
            url = f"{h.base}/?eventType=t"
            headers = {"Accept": "text/event-stream", "Last-Event-ID": first}
            async with client.stream("GET", url, headers=headers) as leaving:
                assert leaving.status_code == 200
            async with trio.open_nursery() as nursery:
                readers = [await reading(nursery, h, "t", last_event_id=first) for _ in range(6)]
                await wait_until(lambda: all(len(g) >= 800 for g in readers), 30, "every replay")
                await axadd(redis_server, "s", "t", "end")  # what comes before it is all
                await wait_until(
                    lambda: all(g[-1][1] == '"end"' for g in readers), 10, "the end marker"
                )
                for got in readers:
                    got.pop()
                nursery.cancel_scope.cancel()
    wanted = [str(n) for n in range(1, 1201) if n % 3]
    for got in readers:
        assert [data for _, data in got] == wanted


async def test_two_keys_older_than_the_window(
    ca: trustme.CA, tls_files: dict[str, str], redis_server: RedisServer
) -> None:
    """Two keys, a window of 5: a client far behind on both is replayed from
    Redis, each key's entries in order and both keys merged by entry id;
    its last id is the position of both keys' last entries."""
    settings = streams_settings(redis_server, "k1", "k2", history_size=5)
    e1 = await axadd(redis_server, "k1", "t", "a0")
    e2 = await axadd(redis_server, "k2", "t", "b0")
    written = []
    for n in range(1, 301):
        key = "k1" if n % 2 else "k2"
        written.append((key, await axadd(redis_server, key, "t", n)))
    with trio.fail_after(40):
        async with harness("sse", ca, tls_files, **settings) as h:
            got = await replay_of(h, f"{e1},{e2}", 300)
    assert "plasma-gap" not in [entry_id for entry_id, _ in got]
    assert [data for _, data in got] == [str(n) for n in range(1, 301)]  # entry-id order
    last1 = next(entry for key, entry in reversed(written) if key == "k1")
    last2 = next(entry for key, entry in reversed(written) if key == "k2")
    assert got[-1][0] == f"{last1},{last2}"


# -- gap rules ---------------------------------------------------------------


@pytest.mark.parametrize("way", WAYS)
async def test_trimmed_entry_is_a_gap(
    way: str, ca: trustme.CA, tls_files: dict[str, str], redis_server: RedisServer
) -> None:
    """XTRIM below a client's last entry: the gap notice first, then what is
    held after the client's entry."""
    ids = [xadd(redis_server, "s", "t", n) for n in range(6)]
    redis_server.cli("XTRIM", "s", "MAXLEN", "=", "3")
    with trio.fail_after(30):
        async with (
            harness(way, ca, tls_files, **streams_settings(redis_server)) as h,
            trio.open_nursery() as nursery,
        ):
            got = await reading(nursery, h, "t", last_event_id=ids[1])
            await wait_until(lambda: len(got) >= 4, 10, "the notice and the replay")
            await until_marker(redis_server, "s", got)
            nursery.cancel_scope.cancel()
    kind, notice = got[0]
    assert kind == "plasma-gap"
    assert json.loads(notice) == {"requested": ids[1], "oldest": ids[3]}
    assert got[1:] == [(ids[n], str(n)) for n in (3, 4, 5)]


async def test_deleted_entry_and_foreign_ids_are_gaps(
    ca: trustme.CA, tls_files: dict[str, str], redis_server: RedisServer
) -> None:
    ids = [xadd(redis_server, "s", "t", n) for n in range(3)]
    redis_server.cli("XDEL", "s", ids[0])
    with trio.fail_after(30):
        async with harness("sse", ca, tls_files, **streams_settings(redis_server)) as h:
            for last, replay in ((ids[0], 2), ("1700000000000-0", 2), ("99-1,5-5", 0), ("x", 0)):
                async with trio.open_nursery() as nursery:
                    got = await reading(nursery, h, "t", last_event_id=last)
                    await wait_until(lambda: len(got) >= 1 + replay, 10, "notice")  # noqa: B023
                    await trio.sleep(0.2)
                    nursery.cancel_scope.cancel()
                assert got[0][0] == "plasma-gap", (last, got)
                assert json.loads(got[0][1])["requested"] == last
                assert len(got) == 1 + replay, (last, got)
            # An entry that exists: no notice.
            async with trio.open_nursery() as nursery:
                got = await reading(nursery, h, "t", last_event_id=ids[1])
                await wait_until(lambda: len(got) >= 1, 10, "the replay")
                await trio.sleep(0.2)
                nursery.cancel_scope.cancel()
            assert got == [(ids[2], "2")]


# -- outages -----------------------------------------------------------------


@pytest.mark.parametrize("way", WAYS)
async def test_redis_killed_and_restarted_with_aof_loses_nothing(
    way: str, ca: trustme.CA, tls_files: dict[str, str], aof_redis: RedisServer
) -> None:
    """A publisher appends without pause while Redis is SIGKILLed and
    restarted from its append-only file: the subscriber ends with every entry
    of the stream exactly once, in order, and is never told of a gap."""
    settings = streams_settings(aof_redis)
    got: list[tuple[str, str]] = []
    acked: list[str] = []
    unanswered: set[int] = set()  # appends whose reply was lost: Redis may hold them
    with trio.fail_after(60):
        async with (
            harness(way, ca, tls_files, **settings) as h,
            trio.open_nursery() as nursery,
        ):
            got = await reading(nursery, h, "t")
            done = trio.Event()

            async def publisher() -> None:
                async with RedisPublisher(aof_redis.addr, stream="s", timeout=0.3) as pub:
                    n = 0
                    while not done.is_set():
                        try:
                            acked.append(await pub.append("t", n))
                            n += 1
                        except PublishError:
                            unanswered.add(n)
                            await trio.sleep(0.05)  # Redis is down: try again
                        await trio.sleep(0.005)

            nursery.start_soon(publisher)
            await wait_until(lambda: len(got) >= 50, 10, "delivery before")
            aof_redis.kill()
            await trio.sleep(1.0)
            aof_redis.start()
            before = len(acked)
            await wait_until(lambda: len(acked) >= before + 100, 20, "publishing after")
            done.set()
            await wait_until(lambda: len(got) >= len(acked), 20, "every entry")
            await trio.sleep(0.3)
            nursery.cancel_scope.cancel()
    held = stream_ids(aof_redis, "s")
    assert [event_id for event_id, _ in got] == held
    assert set(acked) <= set(held)
    # The values are the publisher's: in order, none missing; a value appears
    # twice only when its first XADD was applied but the reply was lost to the
    # kill (the publisher then retried it), which is the publisher's at-least-once.
    values = [json.loads(data) for _, data in got]
    assert values == sorted(values)
    assert sorted(set(values)) == list(range(len(set(values))))
    twice = {v for v in values if values.count(v) > 1}
    assert twice <= unanswered, (twice, unanswered)
    assert all(values.count(v) <= 2 for v in twice)


@pytest.mark.parametrize("way", WAYS)
async def test_redis_back_without_its_data(
    way: str, ca: trustme.CA, tls_files: dict[str, str], redis_server: RedisServer
) -> None:
    """Redis restarts empty under connected subscribers: each is told once
    (its last id; nothing after the loss yet), then receives the new
    entries, even ones with ids below the old cursor; a resume from before
    the loss gets the gap notice."""
    settings = streams_settings(redis_server)
    with trio.fail_after(40):
        async with harness(way, ca, tls_files, **settings) as h, h.client() as client:
            async with trio.open_nursery() as nursery:
                got = await reading(nursery, h, "t")
                old = await axadd(redis_server, "s", "t", "old")
                await wait_until(lambda: len(got) >= 1)
                redis_server.stop()
                await wait_for_figure(h.srv, "redis_connected", False)
                redis_server.start()
                await wait_until(lambda: len(got) >= 2, 10, "the notice")
                # Once read from 0-0 again, an entry below the old cursor arrives.
                low = await trio.to_thread.run_sync(
                    lambda: xadd(redis_server, "s", "t", "low", entry_id="5-1")
                )
                await wait_until(lambda: len(got) >= 3, 10, "the entry")
                await trio.sleep(0.3)
                nursery.cancel_scope.cancel()
            assert got[0] == (old, '"old"')
            assert got[1][0] == "plasma-gap"
            assert json.loads(got[1][1]) == {"requested": old, "oldest": None}
            assert got[2:] == [(low, '"low"')]
            figures = await h.figures(client)
            assert figures["source_losses"] == 1
            async with trio.open_nursery() as nursery:
                again = await reading(nursery, h, "t", last_event_id=old)
                await wait_until(lambda: len(again) >= 1, 10, "the resume notice")
                await trio.sleep(0.2)
                nursery.cancel_scope.cancel()
            assert [kind for kind, _ in again] == ["plasma-gap"]


@pytest.mark.parametrize("way", WAYS)
async def test_live_notice_when_the_cursor_was_trimmed_away(
    way: str, ca: trustme.CA, tls_files: dict[str, str], redis_server: RedisServer
) -> None:
    """While the server's reader is disconnected, entries are appended and
    the stream trimmed past its cursor: connected subscribers get the notice
    (from their last id to the first entry left), then what is left."""
    settings = streams_settings(redis_server, subscriber_redis_retry_interval=1.0)
    with trio.fail_after(30):
        async with harness(way, ca, tls_files, **settings) as h, h.client() as client:
            async with trio.open_nursery() as nursery:
                got = await reading(nursery, h, "t")
                first = await axadd(redis_server, "s", "t", 0)
                await wait_until(lambda: len(got) >= 1)
                redis_server.cli("CLIENT", "KILL", "TYPE", "normal")
                with trio.fail_after(5):  # the reader's loss, seen from outside
                    while (await client.get(f"{h.base}/readyz")).status_code == 200:
                        await trio.sleep(0.02)
                for n in range(1, 10):
                    await axadd(redis_server, "s", "t", n)
                redis_server.cli("XTRIM", "s", "MAXLEN", "=", "2")
                left = stream_ids(redis_server, "s")
                await wait_until(lambda: len(got) >= 4, 10, "the notice and the rest")
                await until_marker(redis_server, "s", got)
                nursery.cancel_scope.cancel()
    assert got[0] == (first, "0")
    assert got[1][0] == "plasma-gap"
    assert json.loads(got[1][1]) == {"requested": first, "oldest": left[0]}
    assert got[2:] == [(left[0], "8"), (left[1], "9")]


APPEND_AND_TRIM = """
for n = 1, tonumber(ARGV[1]) do
    redis.call('XADD', KEYS[1], '*', 'event', '{"meta":{"type":"t"},"data":' .. n .. '}')
end
redis.call('XTRIM', KEYS[1], 'MAXLEN', '=', ARGV[2])
"""


async def test_a_connected_reader_behind_a_trim_gives_the_notice(
    ca: trustme.CA, tls_files: dict[str, str], redis_server: RedisServer
) -> None:
    """The reader stays connected, but 1,200 entries are appended and the
    stream trimmed to 600 in one step (a script), past its cursor: its next
    XREAD is a full batch, which makes it check its cursor; the subscriber
    gets the notice (from its last id to the first entry left), then every
    entry left, in order."""
    with trio.fail_after(30):
        async with harness("sse", ca, tls_files, **streams_settings(redis_server)) as h:
            async with trio.open_nursery() as nursery:
                got = await reading(nursery, h, "t")
                first = await axadd(redis_server, "s", "t", 0)
                await wait_until(lambda: len(got) >= 1)
                await trio.to_thread.run_sync(
                    lambda: redis_server.cli("EVAL", APPEND_AND_TRIM, "1", "s", "1200", "600")
                )
                left = stream_ids(redis_server, "s")
                assert len(left) == 600
                await wait_until(lambda: len(got) >= 602, 10, "the notice and the rest")
                await until_marker(redis_server, "s", got)
                nursery.cancel_scope.cancel()
    assert got[0] == (first, "0")
    assert got[1][0] == "plasma-gap"
    assert json.loads(got[1][1]) == {"requested": first, "oldest": left[0]}
    assert got[2:] == [(entry, str(n)) for entry, n in zip(left, range(601, 1201), strict=True)]


async def test_health_follows_the_readers(redis_server: RedisServer) -> None:
    settings = streams_settings(redis_server)
    with trio.fail_after(30):
        async with running_server(**settings) as srv, httpx.AsyncClient() as client:
            url = f"http://127.0.0.1:{srv.port}"
            assert (await client.get(f"{url}/readyz")).status_code == 200
            redis_server.stop()
            with trio.fail_after(10):
                while (await client.get(f"{url}/readyz")).status_code == 200:
                    await trio.sleep(0.05)
            assert (await client.get(f"{url}/hc")).status_code == 500
            redis_server.start()
            with trio.fail_after(10):
                while (await client.get(f"{url}/hc")).status_code != 200:
                    await trio.sleep(0.05)


# -- publishing --------------------------------------------------------------


async def test_publishing_appends_and_answers_the_id(redis_server: RedisServer) -> None:
    """/publish, the CLI and the library XADD to the first key, trimmed to
    about PLASMA_SUBSCRIBER_REDIS_STREAM_MAXLEN, and answer the new id."""
    settings = streams_settings(
        redis_server, "first", "second", publish_token="tok", subscriber_redis_stream_maxlen=10
    )
    with trio.fail_after(40):
        async with running_server(**settings) as srv, httpx.AsyncClient() as client:
            resp = await client.post(
                f"http://127.0.0.1:{srv.port}/publish",
                content=json.dumps({"meta": {"type": "p"}, "data": 1}),
                headers={"Authorization": "Bearer tok"},
            )
            assert resp.status_code == 200
            answer = resp.json()
            assert ENTRY.match(answer["id"])
            assert stream_ids(redis_server, "first") == [answer["id"]]
            # /debug (debug on) appends the same way and answers the id too.
            resp = await client.post(
                f"http://127.0.0.1:{srv.port}/debug",
                content=json.dumps({"meta": {"type": "p"}, "data": 1.5}),
            )
            assert resp.status_code == 200
            assert stream_ids(redis_server, "first") == [answer["id"], resp.json()["id"]]

            env = plasma_env(
                PLASMA_SUBSCRIBER_TYPE="redis-streams",
                PLASMA_SUBSCRIBER_REDIS_ADDR=redis_server.addr,
                PLASMA_SUBSCRIBER_REDIS_STREAMS="first,second",
            )
            out = await cli_publish(env, "p", '{"n":2}')
            cli_id = stream_ids(redis_server, "first")[-1]
            assert cli_id in out

            async with RedisPublisher(redis_server.addr, stream="first", maxlen=10) as pub:
                for n in range(300):
                    await pub.append("p", n)
            length = int(redis_server.cli("XLEN", "first").strip())
            assert 10 <= length < 300  # MAXLEN ~ 10: trimmed by whole nodes


def test_publisher_needs_a_channel_or_a_stream() -> None:
    with pytest.raises(ValueError, match="channel or a stream"):
        RedisPublisher("localhost:6379")
    with pytest.raises(ValueError, match="channel or a stream"):
        RedisPublisher("localhost:6379", channel="c", stream="s")


async def test_publisher_append_reports_redis_errors(redis_server: RedisServer) -> None:
    redis_server.cli("SET", "plain", "x")
    async with RedisPublisher(redis_server.addr, stream="plain") as pub:
        with pytest.raises(PublishError, match="wrong kind of value"):
            await pub.append("p", 1)


async def test_invalid_entries_are_counted_and_skipped(redis_server: RedisServer) -> None:
    settings = streams_settings(redis_server)
    with trio.fail_after(30):
        async with running_server(**settings) as srv, httpx.AsyncClient() as client:
            redis_server.cli("XADD", "s", "*", "event", "not json")
            redis_server.cli("XADD", "s", "*", "other", "{}")
            good = await axadd(redis_server, "s", "t", 1)
            await wait_for_figure(srv, "last_event_id", good)
            figures = (
                await client.get(f"http://127.0.0.1:{srv.metrics_port}/metrics/plasma")
            ).json()
            assert figures["events_invalid"] == 2
