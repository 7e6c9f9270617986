"""Event sources: where events come from before the hub fans them out.

A source is an object with ``async def run(hub, *, task_status)``: it calls
``task_status.started()`` once it really delivers (subscribed, connected),
then feeds validated events to ``hub.publish`` until cancelled. A source
that fails for good raises :class:`~plasma_trio.errors.SourceFailed`, which
ends the process. ``healthy()`` answers ``/hc``; ``publish_raw`` is where
``/debug`` and ``/publish`` send an already validated event (straight into
the hub by default; through Redis in the Redis modes, so every instance sees it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from plasma_trio.errors import ConfigError

if TYPE_CHECKING:
    import trio

    from plasma_trio.config import Config
    from plasma_trio.core.events import Event
    from plasma_trio.hub import Hub

__all__ = ["Source", "make_source"]


class Source(Protocol):
    async def run(self, hub: Hub, *, task_status: trio.TaskStatus[None]) -> None: ...

    async def healthy(self) -> bool: ...

    async def publish(self, hub: Hub, event: Event) -> str | None:
        """Publish an event that arrived over HTTP (``/debug``, ``/publish``);
        returns its id when it is known at once (not with Redis pub/sub)."""
        ...


def make_source(config: Config) -> Source:
    """The source ``PLASMA_SUBSCRIBER_TYPE`` names."""
    if config.subscriber_type == "mock":
        from plasma_trio.sources.mock import MockSource

        return MockSource(config.subscriber_mock_interval)
    if config.subscriber_type == "redis":
        from plasma_trio.sources.redis_pubsub import RedisPubSubSource

        return RedisPubSubSource(config)
    if config.subscriber_type == "redis-streams":
        from plasma_trio.sources.redis_streams import RedisStreamsSource

        return RedisStreamsSource(config)
    raise ConfigError(
        "PLASMA_SUBSCRIBER_TYPE", f"{config.subscriber_type!r} is not a source of this version"
    )
