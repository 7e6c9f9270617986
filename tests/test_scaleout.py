"""Scale-out Redis deployments (SPEC 9): Redis Cluster (classic and sharded
pub/sub, streams), Sentinel, an ACL user over TLS; real redis-server
processes started here, redis-cli as the independent publisher."""

from __future__ import annotations

import contextlib
import json
import time
from typing import TYPE_CHECKING, Any

import grpc
import httpx
import pytest
import trio

from plasma_trio.publisher import RedisPublisher
from plasma_trio.redis_connect import RedisTarget
from tests.helpers import cli_publish, figures_of, plasma_env, running_server, wait_until
from tests.redis_topologies import ClusterGroup, SentinelGroup, tls_acl_server
from tests.test_session import Harness, harness
from tests.test_streams import reading, replay_of, stream_ids

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    import trustme

    from tests.redis_server import RedisServer


def body(data: Any, event_type: str = "t") -> str:
    return json.dumps({"meta": {"type": event_type}, "data": data})


def settings_for(addrs: list[str], mode: str, **extra: Any) -> dict[str, Any]:
    return {
        "subscriber_redis_addr": ",".join(addrs),
        "subscriber_redis_mode": mode,
        "subscriber_redis_timeout": 0.5,
        "subscriber_redis_retry_interval": 0.2,
        "subscriber_redis_over_max_retry_behavior": "alive",
        "debug": True,
        **extra,
    }


def cluster_streams_settings(
    cluster: ClusterGroup, keys: list[str], **extra: Any
) -> dict[str, Any]:
    """redis-streams in ``cluster`` reading ``keys``."""
    return settings_for(
        cluster.addrs,
        "cluster",
        subscriber_type="redis-streams",
        subscriber_redis_streams=tuple(keys),
        **extra,
    )


def sentinel_settings(group: SentinelGroup, **extra: Any) -> dict[str, Any]:
    """Settings for the sentinels of ``group``: channel and stream key ``plasma``."""
    return settings_for(
        group.addrs,
        "sentinel",
        subscriber_redis_channels=("plasma",),
        subscriber_redis_streams=("plasma",),
        subscriber_redis_sentinel_master=SentinelGroup.NAME,
        **extra,
    )


def channels_on_every_master(cluster: ClusterGroup, prefix: str = "ch") -> list[str]:
    """One channel name per master (the slot of each lands on a different one)."""
    found: dict[int, str] = {}
    masters = {n.port for n in cluster.nodes if "master" in n.cli("ROLE")}
    n = 0
    while len(found) < len(masters):
        name = f"{prefix}{n}"
        found.setdefault(cluster.node_of(name).port, name)
        n += 1
    return list(found.values())


async def cli(node: RedisServer, *args: str) -> str:
    return await trio.to_thread.run_sync(lambda: node.cli(*args))


def grpc_health(port: int) -> int:
    """The server's ``grpc.health.v1.Health/Check`` status (1 SERVING, 2
    NOT_SERVING), with grpcio and the messages encoded by hand (grpcio's
    health module and grpclib's cannot share this process's descriptor pool)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply: bytes = channel.unary_unary("/grpc.health.v1.Health/Check")(b"", timeout=2)
    return reply[1] if reply[:1] == b"\x08" else 0  # field 1 (status), varint


class Failover:
    """Watches a failover from outside: /readyz and gRPC health sampled
    every 0.1 s while the test publishes, and the time from the kill until
    the first event published after it arrives."""

    def __init__(self, h: Harness, client: httpx.AsyncClient) -> None:
        self.h = h
        self.client = client
        self.saw_not_ready = False
        self.saw_not_serving = False
        self.killed = time.monotonic()

    async def sample(self) -> None:
        ready = await self.client.get(f"{self.h.base}/readyz")
        self.saw_not_ready = self.saw_not_ready or ready.status_code == 503
        health = await trio.to_thread.run_sync(grpc_health, self.h.srv.grpc_port)
        self.saw_not_serving = self.saw_not_serving or health == 2

    def assert_seen(self) -> None:
        """The interruption was visible: /readyz 503 and gRPC health NOT_SERVING."""
        assert self.saw_not_ready
        assert self.saw_not_serving

    def report(self, what: str) -> None:
        # Shown with `pytest -s`: bench/RESULTS.md records these.
        elapsed = time.monotonic() - self.killed
        print(f"\nfailover {what}: delivery resumed {elapsed:.2f} s after the kill")  # noqa: T201


@pytest.fixture
def cluster() -> Iterator[ClusterGroup]:
    group = ClusterGroup(3)
    group.start()
    try:
        yield group
    finally:
        group.cleanup()


@pytest.fixture
def cluster_with_replicas() -> Iterator[ClusterGroup]:
    group = ClusterGroup(3, replicas=1)
    group.start()
    try:
        yield group
    finally:
        group.cleanup()


@pytest.fixture
def sentinels() -> Iterator[SentinelGroup]:
    group = SentinelGroup()
    group.start()
    try:
        yield group
    finally:
        group.cleanup()


# -- Redis Cluster -------------------------------------------------------------


@pytest.mark.cluster
@pytest.mark.parametrize("sharded", [False, True], ids=["classic", "sharded"])
async def test_cluster_pubsub_reaches_every_master(
    sharded: bool, ca: trustme.CA, cluster: ClusterGroup
) -> None:
    """Channels whose slots live on each of three masters all deliver; the
    server's /publish and the library publish with SPUBLISH when sharded."""
    channels = channels_on_every_master(cluster)
    settings = settings_for(
        cluster.addrs[:1],  # one seed node: the client discovers the rest
        "cluster",
        subscriber_type="redis",
        subscriber_redis_channels=tuple(channels),
        subscriber_redis_sharded=sharded,
    )
    command = "SPUBLISH" if sharded else "PUBLISH"
    with trio.fail_after(40):
        async with harness("sse", ca, {}, **settings) as h, h.client() as client:
            async with trio.open_nursery() as nursery:
                got = await reading(nursery, h, "t")
                for n, channel in enumerate(channels):
                    await cli(cluster.nodes[n % 3], command, channel, body(n))
                await h.publish(client, "t", "via the server")
                target = RedisTarget(
                    addrs=tuple((n.addr.split(":")[0], n.port) for n in cluster.nodes),
                    mode="cluster",
                    sharded=sharded,
                )
                async with RedisPublisher(channel=channels[-1], target=target) as publisher:
                    await publisher.publish("t", "via the library")
                # The CLI, with the server's settings (SPUBLISH when sharded).
                env = plasma_env(
                    PLASMA_SUBSCRIBER_REDIS_ADDR=cluster.addrs[0],
                    PLASMA_SUBSCRIBER_REDIS_MODE="cluster",
                    PLASMA_SUBSCRIBER_REDIS_CHANNELS=channels[1],
                    PLASMA_SUBSCRIBER_REDIS_SHARDED=str(sharded).lower(),
                )
                await cli_publish(env, "t", '"via the cli"')
                await wait_until(lambda: len(got) >= len(channels) + 3, 10, "every channel")
                await trio.sleep(0.2)
                nursery.cancel_scope.cancel()
    assert sorted(data for _, data in got) == sorted(
        [str(n) for n in range(len(channels))]
        + ['"via the server"', '"via the library"', '"via the cli"']
    )


@pytest.mark.cluster
async def test_sharded_channel_follows_a_slot_move(ca: trustme.CA, cluster: ClusterGroup) -> None:
    """The slot of a sharded channel moves to another master while
    subscribed: the old owner says sunsubscribe, the server subscribes again
    at the new owner at once, tells subscribers events may have been missed,
    and delivery goes on."""
    channel = channels_on_every_master(cluster)[0]
    settings = settings_for(
        cluster.addrs,
        "cluster",
        subscriber_type="redis",
        subscriber_redis_channels=(channel,),
        subscriber_redis_sharded=True,
        subscriber_redis_retry_interval=30.0,  # a resubscription must not wait for it
    )
    with trio.fail_after(40):
        async with harness("sse", ca, {}, **settings) as h:
            async with trio.open_nursery() as nursery:
                got = await reading(nursery, h, "t")
                await cli(cluster.nodes[0], "SPUBLISH", channel, body("before"))
                await wait_until(lambda: len(got) >= 1)
                owner = cluster.node_of(channel)
                other = next(n for n in cluster.nodes if n is not owner)
                await trio.to_thread.run_sync(cluster.move_slot_of, channel, other)
                # Publish until the resubscribed server receives again.
                n = 0
                while not any(data.startswith('"after') for _, data in got):
                    await cli(cluster.nodes[0], "SPUBLISH", channel, body(f"after {n}"))
                    n += 1
                    await trio.sleep(0.1)
                nursery.cancel_scope.cancel()
    assert got[0][1] == '"before"'
    kinds = [kind for kind, _ in got]
    assert "plasma-gap" in kinds
    assert kinds.index("plasma-gap") < next(
        i for i, (_, data) in enumerate(got) if data.startswith('"after')
    )


@pytest.mark.cluster
@pytest.mark.parametrize(
    ("way", "source"),
    [("sse", "sharded"), ("grpc", "sharded"), ("sse", "streams"), ("sse", "classic")],
)
async def test_cluster_master_killed_stream_stays_open(
    way: str,
    source: str,
    ca: trustme.CA,
    tls_files: dict[str, str],
    cluster_with_replicas: ClusterGroup,
) -> None:
    """3 masters + 3 replicas; the master owning the channel (or stream key;
    classic pub/sub: the node the server subscribed on) is SIGKILLed: the
    subscriber's stream stays open, /readyz reports the interruption, and
    delivery resumes once the server subscribed again (sharded, streams:
    once the replica took over)."""
    cluster = cluster_with_replicas
    channel = channels_on_every_master(cluster)[0]
    if source == "streams":
        settings = settings_for(
            cluster.addrs,
            "cluster",
            subscriber_type="redis-streams",
            subscriber_redis_streams=(channel,),
        )
        command: tuple[str, ...] = ("XADD", channel, "*", "event")
    else:
        settings = settings_for(
            cluster.addrs,
            "cluster",
            subscriber_type="redis",
            subscriber_redis_channels=(channel,),
            subscriber_redis_sharded=source == "sharded",
        )
        command = ("SPUBLISH" if source == "sharded" else "PUBLISH", channel)
    with trio.fail_after(60):
        async with harness(way, ca, tls_files, **settings) as h, h.client() as client:
            async with trio.open_nursery() as nursery:
                got = await reading(nursery, h, "t")
                await cli(cluster.nodes[0], *command, body("before"))
                await wait_until(lambda: len(got) >= 1)
                if source == "classic":
                    # Classic pub/sub is not bound to a slot: the node holding
                    # the server's subscription is the one to kill.
                    counts = [
                        (await cli(node, "PUBSUB", "NUMSUB", channel)).split()[-1]
                        for node in cluster.nodes
                    ]
                    assert counts.count("1") == 1, counts
                    owner = cluster.nodes[counts.index("1")]
                else:
                    owner = cluster.node_of(channel)
                    await cli(owner, "WAIT", "1", "5000")  # the replica has what was written
                owner.kill()
                failover = Failover(h, client)
                survivor = next(n for n in cluster.nodes if n.proc is not None)
                n = 0
                while not any(data.startswith('"after') for _, data in got):
                    await failover.sample()
                    with contextlib.suppress(RuntimeError):  # the slot has no master yet
                        await cli(survivor, *command, body(f"after {n}"))
                    n += 1
                    await trio.sleep(0.1)
                failover.report(f"cluster master killed ({source}, {way})")
                metrics = await h.figures(client)
                assert metrics["connections"] == 1  # the stream stayed open
                nursery.cancel_scope.cancel()
    assert got[0][1] == '"before"'
    failover.assert_seen()
    kinds = [kind for kind, _ in got]
    first_after = next(i for i, (_, data) in enumerate(got) if data.startswith('"after'))
    if source != "streams":
        # Pub/sub messages published meanwhile are gone: the subscriber is told, once, first.
        assert kinds.count("plasma-gap") == 1
        assert kinds.index("plasma-gap") < first_after
    else:
        # The stream continues from its cursor on the promoted replica.
        assert "plasma-gap" not in kinds


@pytest.mark.cluster
async def test_streams_in_a_cluster(ca: trustme.CA, cluster: ClusterGroup) -> None:
    """redis-streams with keys on two masters (one reader each: XREAD across
    slots is refused): positions as ids, and a resume that continues both."""
    keys = channels_on_every_master(cluster, prefix="stream")[:2]
    settings = cluster_streams_settings(cluster, keys)
    with trio.fail_after(40):
        async with harness("sse", ca, {}, **settings) as h, h.client() as client:
            async with trio.open_nursery() as nursery:
                got = await reading(nursery, h, "t")
                a = (await cli(cluster.nodes[0], "XADD", keys[0], "*", "event", body("a"))).strip()
                await wait_until(lambda: len(got) >= 1)
                await h.publish(client, "t", "b")  # XADD to the first key, through the server
                await wait_until(lambda: len(got) >= 2)
                c = (await cli(cluster.nodes[1], "XADD", keys[1], "*", "event", body("c"))).strip()
                await wait_until(lambda: len(got) >= 3)
                nursery.cancel_scope.cancel()
            assert got[0] == (f"{a},0-0", '"a"')
            b = got[1][0].split(",")[0]
            assert got[2] == (f"{b},{c}", '"c"')
            d = (await cli(cluster.nodes[2], "XADD", keys[1], "*", "event", body("d"))).strip()
            async with trio.open_nursery() as nursery:
                again = await reading(nursery, h, "t", last_event_id=got[0][0])
                await wait_until(lambda: len(again) >= 3, 10, "the replay")
                await trio.sleep(0.2)
                nursery.cancel_scope.cancel()
    assert [data for _, data in again] == ['"b"', '"c"', '"d"']
    assert again[-1][0] == f"{b},{d}"


@pytest.mark.cluster
async def test_streams_in_a_cluster_resume_from_further_back(
    ca: trustme.CA, cluster: ClusterGroup
) -> None:
    """Keys on two masters, a window of 4: a client 120 entries behind is
    replayed from each key's master (the cluster client routes each XRANGE),
    merged by entry id, no gap."""
    keys = channels_on_every_master(cluster, prefix="stream")[:2]
    settings = cluster_streams_settings(cluster, keys, history_size=4)
    a0 = (await cli(cluster.nodes[0], "XADD", keys[0], "*", "event", body("a0"))).strip()
    b0 = (await cli(cluster.nodes[0], "XADD", keys[1], "*", "event", body("b0"))).strip()
    for n in range(120):
        await cli(cluster.nodes[n % 3], "XADD", keys[n % 2], "*", "event", body(n))
    with trio.fail_after(40):
        async with harness("sse", ca, {}, **settings) as h:
            got = await replay_of(h, f"{a0},{b0}", 120)
    assert "plasma-gap" not in [kind for kind, _ in got]
    assert [data for _, data in got] == [str(n) for n in range(120)]


# -- Sentinel --------------------------------------------------------------------


@pytest.mark.sentinel
async def test_sentinel_failover_keeps_subscribers(
    ca: trustme.CA, tls_files: dict[str, str], sentinels: SentinelGroup
) -> None:
    """1 master, 1 replica, 3 sentinels; the master is SIGKILLed while an SSE
    and a gRPC subscriber are connected: both stay connected, /readyz says
    not ready meanwhile, both are told events may have been lost, and both
    receive again from the promoted replica, with no restart of anything."""
    settings = sentinel_settings(sentinels, subscriber_type="redis")
    with trio.fail_after(60):
        async with harness("sse", ca, tls_files, **settings) as h, h.client() as client:
            grpc_way = Harness(h.srv, "grpc", ca)
            async with trio.open_nursery() as nursery:
                got = await reading(nursery, h, "t")
                got_grpc = await reading(nursery, grpc_way, "t")
                await cli(sentinels.master, "PUBLISH", "plasma", body("before"))
                await wait_until(lambda: len(got) >= 1 and len(got_grpc) >= 1)
                sentinels.master.kill()
                failover = Failover(h, client)
                promoted = sentinels.replica
                n = 0
                while not all(
                    any(data.startswith('"after') for _, data in g) for g in (got, got_grpc)
                ):
                    await failover.sample()
                    await cli(promoted, "PUBLISH", "plasma", body(f"after {n}"))
                    n += 1
                    await trio.sleep(0.1)
                failover.report("sentinel (pub/sub, sse and grpc)")
                metrics = await h.figures(client)
                assert (metrics["connections_sse"], metrics["connections_grpc"]) == (1, 1)
                nursery.cancel_scope.cancel()
    failover.assert_seen()
    assert sentinels.primary_port() == sentinels.replica.port
    for g in (got, got_grpc):
        assert g[0][1] == '"before"'
        assert [kind for kind, _ in g].count("plasma-gap") == 1


@pytest.mark.sentinel
async def test_sentinel_streams_publishing_and_failover(
    ca: trustme.CA, sentinels: SentinelGroup
) -> None:
    """redis-streams behind Sentinel: events published through the server's
    /publish, the library and ``plasma-trio publish`` (each finding the
    master through the sentinels) reach an SSE and a gRPC subscriber, with
    their entry ids. The master is SIGKILLed (after WAIT 1): both streams
    stay open, nobody is told of a gap, and every append /publish
    acknowledged meanwhile arrives, in order, from the promoted replica."""
    settings = sentinel_settings(sentinels, subscriber_type="redis-streams")
    with trio.fail_after(60):
        async with harness("sse", ca, {}, **settings) as h, h.client() as client:
            grpc_way = Harness(h.srv, "grpc", ca)
            async with trio.open_nursery() as nursery:
                got = await reading(nursery, h, "t")
                got_grpc = await reading(nursery, grpc_way, "t")
                await h.publish(client, "t", "via the server")
                target = RedisTarget(
                    addrs=tuple(
                        (host, int(port))
                        for host, port in (a.rsplit(":", 1) for a in sentinels.addrs)
                    ),
                    mode="sentinel",
                    sentinel_master=SentinelGroup.NAME,
                )
                async with RedisPublisher(stream="plasma", target=target) as publisher:
                    await publisher.append("t", "via the library")
                env = plasma_env(
                    PLASMA_SUBSCRIBER_TYPE="redis-streams",
                    PLASMA_SUBSCRIBER_REDIS_ADDR=",".join(sentinels.addrs),
                    PLASMA_SUBSCRIBER_REDIS_MODE="sentinel",
                    PLASMA_SUBSCRIBER_REDIS_SENTINEL_MASTER=SentinelGroup.NAME,
                    PLASMA_SUBSCRIBER_REDIS_STREAMS="plasma",
                )
                printed = await cli_publish(env, "t", '"via the cli"')
                await wait_until(lambda: len(got) >= 3 and len(got_grpc) >= 3, 10, "three")
                await cli(sentinels.master, "WAIT", "1", "5000")
                sentinels.master.kill()
                failover = Failover(h, client)
                acknowledged: list[str] = []
                n = 0
                while not all(
                    any(data.startswith('"after') for _, data in g) for g in (got, got_grpc)
                ):
                    await failover.sample()
                    data = f"after {n}"
                    response = await client.post(f"{h.base}/debug", content=body(data))
                    if response.status_code == 200:
                        acknowledged.append(json.dumps(data))
                    n += 1
                    await trio.sleep(0.1)
                failover.report("sentinel (streams, sse and grpc)")
                last = acknowledged[-1]
                await wait_until(
                    lambda: all(any(d == last for _, d in g) for g in (got, got_grpc)),
                    10,
                    "every acknowledged append",
                )
                metrics = await h.figures(client)
                assert (metrics["connections_sse"], metrics["connections_grpc"]) == (1, 1)
                nursery.cancel_scope.cancel()
    failover.assert_seen()
    assert sentinels.primary_port() == sentinels.replica.port
    ids = stream_ids(sentinels.replica, "plasma")
    assert printed.strip().endswith(f"(id {ids[2]})"), printed
    for g in (got, got_grpc):
        assert [data for _, data in g[:3]] == [
            '"via the server"',
            '"via the library"',
            '"via the cli"',
        ]
        assert "plasma-gap" not in [kind for kind, _ in g]
        # Ids are the entries' (the promoted replica holds every one delivered).
        assert [entry_id for entry_id, _ in g] == ids[: len(g)]
        after = [data for _, data in g[3:]]
        assert [d for d in after if d in acknowledged] == acknowledged
        assert len(set(after)) == len(after)  # nothing twice


@pytest.mark.sentinel
async def test_sentinels_and_data_nodes_with_passwords(ca: trustme.CA) -> None:
    """Sentinels that require a password (PLASMA_..._SENTINEL_PASSWORD) in
    front of data nodes that require another (PLASMA_..._PASSWORD): the
    server finds the master and delivers; a wrong sentinel password is
    refused and the server stays up, not ready."""
    group = SentinelGroup(password="data-secret", sentinel_password="sentinel-secret")
    group.start()
    try:
        settings = sentinel_settings(
            group,
            subscriber_type="redis",
            subscriber_redis_password="data-secret",
            subscriber_redis_sentinel_password="sentinel-secret",
        )
        with trio.fail_after(40):
            async with harness("sse", ca, {}, **settings) as h, h.client() as client:
                assert (await client.get(f"{h.base}/readyz")).status_code == 200
                async with trio.open_nursery() as nursery:
                    got = await reading(nursery, h, "t")
                    await cli(group.master, "PUBLISH", "plasma", body("through sentinels"))
                    await wait_until(lambda: len(got) >= 1, 10, "the event")
                    nursery.cancel_scope.cancel()
            assert got[0][1] == '"through sentinels"'
            wrong = {**settings, "subscriber_redis_sentinel_password": "nope"}
            async with running_server(**wrong) as srv, httpx.AsyncClient() as client:
                await trio.sleep(1.0)  # a few attempts
                response = await client.get(f"http://127.0.0.1:{srv.port}/readyz")
                assert response.status_code == 503
    finally:
        group.cleanup()


# -- ACL user and TLS ------------------------------------------------------------


async def test_acl_user_over_tls(ca: trustme.CA, tmp_path: Path) -> None:
    """A managed-style Redis: TLS only, the default user off, an ACL user.
    The server subscribes, /publish and the CLI publish with the same settings."""
    redis = tls_acl_server(ca, tmp_path)
    redis.start()
    try:
        ca_file = str(tmp_path / "ca.pem")
        settings = settings_for(
            [f"localhost:{redis.port}"],
            "standalone",
            subscriber_type="redis",
            subscriber_redis_channels=("plasma",),
            subscriber_redis_username="plasma",
            subscriber_redis_password="s3cret",
            subscriber_redis_tls=True,
            subscriber_redis_tls_ca_file=ca_file,
        )
        with trio.fail_after(40):
            async with harness("sse", ca, {}, **settings) as h, h.client() as client:
                assert (await client.get(f"{h.base}/readyz")).status_code == 200
                async with trio.open_nursery() as nursery:
                    got = await reading(nursery, h, "t")
                    await cli(redis, "PUBLISH", "plasma", body(1))
                    await h.publish(client, "t", 2)
                    env = plasma_env(
                        PLASMA_SUBSCRIBER_REDIS_ADDR=f"localhost:{redis.port}",
                        PLASMA_SUBSCRIBER_REDIS_CHANNELS="plasma",
                        PLASMA_SUBSCRIBER_REDIS_USERNAME="plasma",
                        PLASMA_SUBSCRIBER_REDIS_PASSWORD="s3cret",
                        PLASMA_SUBSCRIBER_REDIS_TLS="true",
                        PLASMA_SUBSCRIBER_REDIS_TLS_CA_FILE=ca_file,
                    )
                    await cli_publish(env, "t", "3")
                    await wait_until(lambda: len(got) >= 3, 10, "three events")
                    nursery.cancel_scope.cancel()
        assert [data for _, data in got] == ["1", "2", "3"]
        # The wrong password: refused, never delivering (the server stays up, not ready).
        with trio.fail_after(30):
            bad = {**settings, "subscriber_redis_password": "nope"}
            async with running_server(**bad) as srv, httpx.AsyncClient() as client:
                response = await client.get(f"http://127.0.0.1:{srv.port}/readyz")
                assert response.status_code == 503
    finally:
        redis.cleanup()


@pytest.mark.cluster
async def test_sharded_shards_are_checked_while_busy(ca: trustme.CA, cluster: ClusterGroup) -> None:
    """Sharded: every shard connection is PINGed on a timer even while
    messages keep the subscription busy (a quiet half-open shard would
    otherwise go unnoticed); the checks do not disturb delivery."""
    channels = channels_on_every_master(cluster)
    settings = settings_for(
        cluster.addrs,
        "cluster",
        subscriber_type="redis",
        subscriber_redis_channels=tuple(channels),
        subscriber_redis_sharded=True,
        subscriber_redis_timeout=1.0,  # checks every 5 s
    )
    sent = 0
    with trio.fail_after(60):
        async with harness("sse", ca, {}, **settings) as h:
            async with trio.open_nursery() as nursery:
                got = await reading(nursery, h, "t")
                deadline = trio.current_time() + 6.5
                while trio.current_time() < deadline:
                    await cli(cluster.nodes[0], "SPUBLISH", channels[0], body(sent))
                    sent += 1
                    await trio.sleep(0.05)
                await wait_until(lambda: len(got) >= sent, 10, "every message")
                nursery.cancel_scope.cancel()
            assert (await figures_of(h.srv))["source_losses"] == 0
    assert [data for _, data in got] == [str(n) for n in range(sent)]
