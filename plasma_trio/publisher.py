"""Publishing events: what plasma-go was for Go publishers.

Two ways, both async and usable from trio or asyncio (coredis and httpx run
on anyio)::

    from plasma_trio.publisher import RedisPublisher, publish_http

    async with RedisPublisher("localhost:6379", channel="plasma") as publisher:
        receivers = await publisher.publish("program:1234:views", {"views": 42})

    # redis-streams mode: XADD, answered with the new entry id
    async with RedisPublisher("localhost:6379", stream="plasma") as publisher:
        entry_id = await publisher.append("program:1234:views", {"views": 42})

    await publish_http("http://plasma:8080", "token", "program:1234:views", {"views": 42})

``data`` is any JSON-serialisable value; pass ``data_json=`` instead to send
JSON text as it is (it is validated first). Nothing is sent for an invalid
event: :class:`PublishError` says why.
"""

from __future__ import annotations

import json
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any, Self

import anyio
import coredis
import coredis.exceptions
import httpx

from plasma_trio.core.events import Event, InvalidEvent, make_event
from plasma_trio.errors import PlasmaError
from plasma_trio.redis_connect import RedisClient, RedisTarget, append_event, publish_event

if TYPE_CHECKING:
    from types import TracebackType

__all__ = ["PublishError", "RedisPublisher", "build_event", "publish_http"]

_UNSET: Any = object()
_REDIS_ERRORS = (coredis.exceptions.RedisError, OSError, TimeoutError)


class PublishError(PlasmaError):
    """The event was not published. ``invalid`` is true when the event itself is at fault."""

    def __init__(self, message: str, *, invalid: bool = False) -> None:
        super().__init__(message)
        self.invalid = invalid


def build_event(
    event_type: str, data: Any = _UNSET, *, data_json: str | bytes | None = None
) -> Event:
    """Validate and build an event from a Python value or JSON text.

    Raises:
        PublishError: (``invalid=True``) empty type, data not JSON-serialisable
            or not valid JSON text.
    """
    if data is not _UNSET and data_json is not None:
        raise TypeError("pass data or data_json, not both")
    if data is not _UNSET:
        try:
            data_json = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise PublishError(f"data is not JSON-serialisable: {exc}", invalid=True) from None
    event = make_event(event_type, data_json)
    if isinstance(event, InvalidEvent):
        raise PublishError(event.reason, invalid=True)
    return event


class RedisPublisher:
    """Publishes events to a Redis channel (:meth:`publish`) or appends them
    to a stream (:meth:`append`) that plasma(-trio) reads.

    ``maxlen``: :meth:`append` trims the stream to about this many entries
    (``XADD MAXLEN ~``), as the server does (``PLASMA_SUBSCRIBER_REDIS_STREAM_MAXLEN``).
    """

    def __init__(
        self,
        addr: str = "localhost:6379",
        *,
        channel: str | None = None,
        stream: str | None = None,
        maxlen: int = 100_000,
        password: str = "",
        db: int = 0,
        timeout: float = 1.0,
        target: RedisTarget | None = None,
    ) -> None:
        """``addr`` (``host:port``), ``password`` and ``db`` name a standalone
        Redis; pass ``target`` instead for a cluster, Sentinel, an ACL user or
        TLS (:class:`plasma_trio.redis_connect.RedisTarget`, e.g.
        ``RedisTarget.from_config(config)``: the server's own settings). With
        a target whose ``sharded`` is set, :meth:`publish` uses ``SPUBLISH``."""
        if (channel is None) == (stream is None):
            raise ValueError("pass a channel or a stream (one of them)")
        if target is None:
            host, sep, port = addr.rpartition(":")
            if not sep or not port.isdigit():
                raise ValueError(f"{addr!r} is not host:port")
            target = RedisTarget(
                addrs=((host.strip("[]") or "localhost", int(port)),),
                db=db,
                password=password,
                timeout=timeout,
            )
        self.target = target
        self.channel = channel
        self.stream = stream
        self.maxlen = maxlen
        self.timeout = timeout
        self._stack = AsyncExitStack()
        self._client: RedisClient | None = None

    async def __aenter__(self) -> Self:
        self._client = await self._stack.enter_async_context(
            self.target.connect(command_timeout=self.timeout)
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._client = None
        try:
            await self._stack.__aexit__(exc_type, exc, tb)
        except BaseExceptionGroup as group:
            # coredis's client wraps what escapes its block in a task-group
            # exception group; when that is only our own exception, let the
            # original propagate unwrapped.
            if exc is None or group.subgroup(lambda e: e is exc) is None:
                raise
            rest = group.subgroup(lambda e: e is not exc and not isinstance(e, BaseExceptionGroup))
            if rest is not None:
                raise

    @property
    def client(self) -> RedisClient:
        if self._client is None:
            raise RuntimeError("use the publisher in an async with block")
        return self._client

    async def publish(
        self,
        event_type: str,
        data: Any = _UNSET,
        *,
        data_json: str | bytes | None = None,
        channel: str | None = None,
    ) -> int:
        """Publish one event; returns how many Redis subscribers received it.

        Raises:
            PublishError: invalid event, or Redis refused / unreachable.
        """
        event = build_event(event_type, data, data_json=data_json)
        target = channel or self.channel
        if target is None:
            raise PublishError("no channel: this publisher appends to a stream (use append)")
        try:
            with anyio.fail_after(self.timeout):
                return await publish_event(
                    self.client, self.target.sharded, target, event.to_wire()
                )
        except _REDIS_ERRORS as exc:
            raise PublishError(f"redis publish failed: {exc or type(exc).__name__}") from exc

    async def append(
        self,
        event_type: str,
        data: Any = _UNSET,
        *,
        data_json: str | bytes | None = None,
        stream: str | None = None,
    ) -> str:
        """Append one event to the stream (``XADD <stream> MAXLEN ~ <maxlen> *
        event <json>``); returns its entry id, which is the event's id on
        every plasma-trio instance (with one stream key).

        Raises:
            PublishError: invalid event, or Redis refused / unreachable.
        """
        event = build_event(event_type, data, data_json=data_json)
        target = stream or self.stream
        if target is None:
            raise PublishError("no stream: this publisher publishes to a channel (use publish)")
        try:
            with anyio.fail_after(self.timeout):
                return await append_event(self.client, target, event.to_wire(), self.maxlen)
        except _REDIS_ERRORS as exc:
            raise PublishError(f"redis append failed: {exc or type(exc).__name__}") from exc


async def publish_http(
    url: str,
    token: str,
    event_type: str,
    data: Any = _UNSET,
    *,
    data_json: str | bytes | None = None,
    timeout: float = 5.0,  # noqa: ASYNC109 - httpx's per-request timeout
) -> dict[str, Any]:
    """POST one event to a server's ``/publish`` (``url`` is the server's base URL).

    Raises:
        PublishError: invalid event, unreachable server, or a non-2xx answer
            (the server's reason is in the message).
    """
    event = build_event(event_type, data, data_json=data_json)
    target = url.rstrip("/") + "/publish" if not url.rstrip("/").endswith("/publish") else url
    try:
        async with httpx.AsyncClient(timeout=timeout) as client:
            resp = await client.post(
                target,
                content=event.to_wire(),
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            )
    except httpx.HTTPError as exc:
        raise PublishError(f"cannot reach {target}: {exc or type(exc).__name__}") from exc
    if resp.status_code != 200:
        raise PublishError(
            f"{target} answered {resp.status_code}: {resp.text.strip()}",
            invalid=resp.status_code == 400,
        )
    result: dict[str, Any] = resp.json()
    return result
