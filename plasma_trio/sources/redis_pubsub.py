"""The ``redis`` source: plasma's Redis pub/sub subscriber, on coredis (anyio: native under trio).

Theory of operation
-------------------
``run`` owns two clients for its whole life: a *command* client (``PING`` for
``/hc``, ``PUBLISH`` for ``/debug`` and ``/publish``) and, per connection
attempt, a pub/sub subscription to every ``PLASMA_SUBSCRIBER_REDIS_CHANNELS``
channel. Each message is validated with :func:`plasma_trio.core.events.parse`;
an invalid one is dropped, counted and logged with its channel; a valid one
goes to the source's :class:`~plasma_trio.sources.intake.Intake`, which
publishes what arrived together as one batch (in order), so events of a
channel reach subscribers in publish order, and a burst in one write each.

The reconnect loop is :class:`~plasma_trio.sources.redis_base.RedisSource`'s.
Subscribers stay connected through an outage and receive events again once
Redis is back. Events published during the outage are lost (that is
pub/sub; the ``redis-streams`` source is the one that resumes): after every
resubscription the hub sends every connected subscriber the live gap notice
(SPEC 4), so that applications reload their state instead of silently
missing updates.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import coredis
import trio
from coredis.commands.constants import CommandName

from plasma_trio.core.events import Event, InvalidEvent, parse
from plasma_trio.redis_connect import publish_event
from plasma_trio.sources.intake import Intake
from plasma_trio.sources.redis_base import RedisSource, text

if TYPE_CHECKING:
    from plasma_trio.config import Config
    from plasma_trio.core.retry import RetryState
    from plasma_trio.hub import Hub
    from plasma_trio.redis_connect import RedisClient

__all__ = ["RedisPubSubSource"]

_log = RedisSource.log


class _Resubscribe(Exception):
    """The subscription must be made again now (not a lost connection)."""


class RedisPubSubSource(RedisSource):
    """Subscribe to the configured channels and feed the hub, reconnecting per plasma's policy."""

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.channels = config.subscriber_redis_channels
        self._subscribed_before = False
        self._intake: Intake | None = None

    async def run(
        self, hub: Hub, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with trio.open_nursery() as nursery:
            self._intake = intake = Intake(hub)
            nursery.start_soon(intake.run)
            await super().run(hub, task_status=task_status)

    async def _connect_and_deliver(self, hub: Hub, retry: RetryState) -> None:
        config = self.config
        while True:
            try:
                async with self.target.connect(command_timeout=None) as client:
                    with trio.fail_after(config.subscriber_redis_timeout):
                        await client.ping()
                    await self._subscribe(hub, client, retry)
            except* _Resubscribe as group:
                # A slot of a sharded channel moved: its old owner said
                # sunsubscribe. Subscribe again at once, with a new client
                # (it learns where the slot lives now), and tell subscribers:
                # messages may have been missed meanwhile.
                reason = "; ".join(str(e) for e in group.exceptions)
                _log.warning("redis resubscribing", extra={"reason": reason})

    async def _subscribe(self, hub: Hub, client: RedisClient, retry: RetryState) -> None:
        config = self.config
        channels = list(self.channels)
        sharded = self.target.sharded and isinstance(client, coredis.RedisCluster)
        pubsub: Any
        if sharded:
            assert isinstance(client, coredis.RedisCluster)
            pubsub = client.sharded_pubsub(
                channels=channels,
                retry_policy=None,
                ignore_subscribe_messages=False,
                subscription_timeout=config.subscriber_redis_timeout,
            )
        else:
            pubsub = client.pubsub(
                channels=channels,
                retry_policy=None,
                ignore_subscribe_messages=True,
                subscription_timeout=config.subscriber_redis_timeout,
            )
        intake = self._intake
        assert intake is not None, "run() starts the intake"
        async with pubsub:
            self.connected = True
            retry.succeeded()
            _log.info(
                "redis subscribed",
                extra={"addr": self.target.describe(), "channels": channels, "sharded": sharded},
            )
            self._report_started()
            if self._subscribed_before:
                # Whatever was published while we were not subscribed is
                # gone (pub/sub keeps nothing): tell every subscriber, after
                # the events received before.
                await intake.drained()
                await hub.announce_loss()
                _log.warning(
                    "events published during the outage are lost: subscribers notified",
                    extra={"subscribers": hub.statistics().connections_total},
                )
            self._subscribed_before = True
            deliver = self._deliver
            max_bytes = config.max_event_bytes
            timeout = config.subscriber_redis_timeout
            # Sharded: one shard may go quiet (half-open) while others keep
            # the subscription busy, so every shard is also checked on a timer.
            check_every = max(timeout, 1.0) * 5
            next_check = trio.current_time() + check_every
            while True:
                message = await pubsub.get_message(timeout=timeout)
                if message is None or (sharded and trio.current_time() >= next_check):
                    # Nothing for PLASMA_SUBSCRIBER_REDIS_TIMEOUT: check the
                    # connection(s) with a PING bounded by the same timeout (as
                    # plasma did), so a hung Redis or a half-open connection
                    # is noticed and retried instead of waiting forever.
                    connections = (
                        list(pubsub.shard_connections.values()) if sharded else [pubsub.connection]
                    )
                    with trio.fail_after(timeout):
                        for connection in connections:
                            await connection.create_request(CommandName.PING)
                    next_check = trio.current_time() + check_every
                    if message is None:
                        continue
                kind = message["type"]
                if kind == "sunsubscribe":
                    raise _Resubscribe(f"the server unsubscribed {text(message['channel'])!r}")
                if kind in ("message", "smessage"):
                    deliver(hub, intake, message["channel"], message["data"], max_bytes)
                    if intake.full:
                        await intake.room()

    @staticmethod
    def _deliver(hub: Hub, intake: Intake, channel: Any, data: Any, max_bytes: int) -> None:
        body = data if isinstance(data, (bytes, str)) else str(data)
        event = parse(body, max_bytes)
        if isinstance(event, InvalidEvent):
            hub.count_invalid()
            _log.warning(
                "invalid event dropped",
                extra={"channel": text(channel), "reason": event.reason},
            )
            return
        intake.put(event)

    async def publish(self, hub: Hub, event: Event) -> None:  # the id comes with delivery
        """``PUBLISH`` to the first channel, so every instance (this one included) sees it.

        Raises:
            SourceFailed: Redis refused or is unreachable (the caller answers 500).
        """
        wire = event.to_wire()
        await self.command(
            lambda client: publish_event(client, self.target.sharded, self.channels[0], wire)
        )
