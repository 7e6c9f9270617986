"""The ``redis`` source: plasma's Redis pub/sub subscriber, on coredis (anyio: native under trio).

Theory of operation
-------------------
``run`` owns two clients for its whole life: a *command* client (``PING`` for
``/hc``, ``PUBLISH`` for ``/debug`` and ``/publish``) and, per connection
attempt, a pub/sub subscription to every ``PLASMA_SUBSCRIBER_REDIS_CHANNELS``
channel. Each message is validated with :func:`plasma_trio.core.events.parse`;
an invalid one is dropped, counted and logged with its channel; a valid one
goes to ``hub.publish`` (in order, one at a time), so events of a channel reach
subscribers in publish order.

When the connection is lost (or an attempt fails or exceeds
``PLASMA_SUBSCRIBER_REDIS_TIMEOUT``), :class:`~plasma_trio.core.retry.RetryState`
decides: wait ``..._RETRY_INTERVAL`` and try again, or, after ``..._MAX_RETRY``
failures in a row with ``..._OVER_MAX_RETRY_BEHAVIOR=die``, raise
:class:`~plasma_trio.errors.SourceFailed`, which ends the process non-zero.
Subscribers stay connected through an outage and receive events again once
Redis is back. Events published during the outage are lost (that is
pub/sub; the ``redis-streams`` source is the one that resumes): after every
resubscription the hub sends every connected subscriber the live gap notice
(SPEC 4), so that applications reload their state instead of silently
missing updates.

``started()`` is reported after the first attempt, whether it succeeded or
not, so the HTTP port comes up during a Redis outage and ``/hc`` tells the
truth (500) instead of the process waiting silently.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio
import coredis
import coredis.exceptions
import trio
from coredis.commands.constants import CommandName

from plasma_trio.core.events import Event, InvalidEvent, parse
from plasma_trio.core.retry import Decision, RetryState
from plasma_trio.errors import SourceFailed
from plasma_trio.logs import ERROR

if TYPE_CHECKING:
    from plasma_trio.config import Config
    from plasma_trio.hub import Hub

__all__ = ["REDIS_ERRORS", "RedisPubSubSource", "redis_client"]

_log = ERROR.getChild("redis")

# What a lost or refused Redis connection raises through coredis and anyio.
# (coredis 6.9's pub/sub cleanup can also raise anyio.ClosedResourceError
# when it is cancelled after its connection closed.)
REDIS_ERRORS: tuple[type[BaseException], ...] = (
    coredis.exceptions.RedisError,
    anyio.ClosedResourceError,
    anyio.BrokenResourceError,
    OSError,
    trio.TooSlowError,
    TimeoutError,
    EOFError,
)


def redis_client(config: Config, *, command_timeout: float | None) -> coredis.Redis[bytes]:
    host, port = config.redis_host_port
    return coredis.Redis(
        host=host,
        port=port,
        db=config.subscriber_redis_db,
        password=config.subscriber_redis_password or None,
        decode_responses=False,
        connect_timeout=config.subscriber_redis_timeout,
        stream_timeout=command_timeout,
    )


class RedisPubSubSource:
    """Subscribe to the configured channels and feed the hub, reconnecting per plasma's policy."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.channels = config.subscriber_redis_channels
        self.connected = False
        self._subscribed_before = False
        self._commands: coredis.Redis[bytes] | None = None
        self._task_status: trio.TaskStatus[None] | None = None

    async def run(
        self, hub: Hub, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        config = self.config
        retry = RetryState(
            config.subscriber_redis_max_retry, config.subscriber_redis_over_max_retry_behavior
        )
        self._task_status = task_status
        async with redis_client(
            config, command_timeout=config.subscriber_redis_timeout
        ) as commands:
            self._commands = commands
            try:
                while True:
                    error = ""
                    try:
                        await self._subscribe_and_deliver(hub, retry)
                    except* REDIS_ERRORS as group:
                        error = _describe(group)
                    self.connected = False
                    # If we are being cancelled (shutdown), the error above was
                    # a side effect of it: leave quietly.
                    await trio.lowlevel.checkpoint_if_cancelled()
                    self._report_started()
                    decision = retry.failed()
                    _log.warning(
                        "redis connection failed",
                        extra={
                            "addr": config.subscriber_redis_addr,
                            "error": error,
                            "failures": retry.failures,
                            "max_retry": config.subscriber_redis_max_retry,
                        },
                    )
                    if decision is Decision.GIVE_UP:
                        raise SourceFailed(
                            f"redis at {config.subscriber_redis_addr} unreachable after "
                            f"{config.subscriber_redis_max_retry} retries ({error})"
                        )
                    await trio.sleep(config.subscriber_redis_retry_interval)
            finally:
                self._commands = None
                self.connected = False

    def _report_started(self) -> None:
        if self._task_status is not None:
            self._task_status.started()
            self._task_status = None

    async def _subscribe_and_deliver(self, hub: Hub, retry: RetryState) -> None:
        config = self.config
        client = redis_client(config, command_timeout=None)
        async with client:
            with trio.fail_after(config.subscriber_redis_timeout):
                await client.ping()
            pubsub = client.pubsub(
                channels=list(self.channels),
                retry_policy=None,
                ignore_subscribe_messages=True,
                subscription_timeout=config.subscriber_redis_timeout,
            )
            async with pubsub:
                self.connected = True
                retry.succeeded()
                _log.info(
                    "redis subscribed",
                    extra={"addr": config.subscriber_redis_addr, "channels": list(self.channels)},
                )
                self._report_started()
                if self._subscribed_before:
                    # Whatever was published while we were not subscribed is
                    # gone (pub/sub keeps nothing): tell every subscriber.
                    await hub.announce_loss()
                    _log.warning(
                        "events published during the outage are lost: subscribers notified",
                        extra={"subscribers": hub.statistics().connections_total},
                    )
                self._subscribed_before = True
                max_bytes = config.max_event_bytes
                timeout = config.subscriber_redis_timeout
                while True:
                    message = await pubsub.get_message(timeout=timeout)
                    if message is None:
                        # Nothing for PLASMA_SUBSCRIBER_REDIS_TIMEOUT: check the
                        # connection with a PING bounded by the same timeout (as
                        # plasma did), so a hung Redis or a half-open connection
                        # is noticed and retried instead of waiting forever.
                        with trio.fail_after(timeout):
                            await pubsub.connection.create_request(CommandName.PING)
                        continue
                    if message["type"] != "message":
                        continue
                    await self._deliver(hub, message["channel"], message["data"], max_bytes)
        raise coredis.exceptions.ConnectionError("subscription ended")  # pragma: no cover

    @staticmethod
    async def _deliver(hub: Hub, channel: Any, data: Any, max_bytes: int) -> None:
        body = data if isinstance(data, (bytes, str)) else str(data)
        event = parse(body, max_bytes)
        if isinstance(event, InvalidEvent):
            hub.count_invalid()
            _log.warning(
                "invalid event dropped",
                extra={"channel": _text(channel), "reason": event.reason},
            )
            return
        await hub.publish(event)

    async def healthy(self) -> bool:
        """The subscription is up, and ``PING`` on the command connection
        answers within the Redis timeout (a working command connection alone
        says nothing about delivery)."""
        commands = self._commands
        if commands is None or not self.connected:
            return False
        try:
            with trio.fail_after(self.config.subscriber_redis_timeout):
                return bool(await commands.ping())
        except REDIS_ERRORS:
            return False

    async def publish(self, hub: Hub, event: Event) -> None:
        """``PUBLISH`` to the first channel, so every instance (this one included) sees it.

        Raises:
            SourceFailed: Redis refused or is unreachable (the caller answers 500).
        """
        commands = self._commands
        if commands is None:
            raise SourceFailed("redis is not connected")
        try:
            with trio.fail_after(self.config.subscriber_redis_timeout):
                await commands.publish(self.channels[0], event.to_wire())
        except REDIS_ERRORS as exc:
            raise SourceFailed(f"redis publish failed: {exc!r}") from exc


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _describe(group: BaseExceptionGroup[BaseException]) -> str:
    leaves: list[BaseException] = []
    stack: list[BaseException] = [group]
    while stack:
        exc = stack.pop()
        if isinstance(exc, BaseExceptionGroup):
            stack.extend(exc.exceptions)
        else:
            leaves.append(exc)
    return "; ".join(f"{type(e).__name__}: {e}" for e in leaves) or repr(group)
