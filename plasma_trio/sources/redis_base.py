"""What the Redis sources share: the client, the errors, the reconnect loop, the health check.

:class:`RedisSource` runs plasma's reconnect policy around a subclass's
``_connect_and_deliver`` (one connection attempt, delivering until the
connection is lost): when it fails, or an attempt exceeds
``PLASMA_SUBSCRIBER_REDIS_TIMEOUT``, :class:`~plasma_trio.core.retry.RetryState`
decides: wait ``..._RETRY_INTERVAL`` and try again, or, after ``..._MAX_RETRY``
failures in a row with ``..._OVER_MAX_RETRY_BEHAVIOR=die``, raise
:class:`~plasma_trio.errors.SourceFailed`, which ends the process non-zero.
Subscribers stay connected through an outage.

``started()`` is reported after the first attempt, whether it succeeded or
not, so the HTTP port comes up during a Redis outage and ``/hc`` tells the
truth (500) instead of the process waiting silently.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import coredis
import coredis.exceptions
import trio

from plasma_trio.core.retry import Decision, RetryState
from plasma_trio.errors import SourceFailed
from plasma_trio.logs import ERROR
from plasma_trio.redis_connect import RedisClient, RedisTarget

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from plasma_trio.config import Config
    from plasma_trio.hub import Hub

__all__ = ["REDIS_ERRORS", "RedisSource", "describe", "text"]

_log = ERROR.getChild("redis")
T = TypeVar("T")

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


class RedisSource:
    """The reconnect loop and health check of a Redis source (see the module doc)."""

    log = _log

    def __init__(self, config: Config) -> None:
        self.config = config
        self.target = RedisTarget.from_config(config)  # a bad TLS CA file: ConfigError
        self.connected = False
        self._commands: RedisClient | None = None
        self._task_status: trio.TaskStatus[None] | None = None

    async def run(
        self, hub: Hub, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        config = self.config
        retry = RetryState(
            config.subscriber_redis_max_retry, config.subscriber_redis_over_max_retry_behavior
        )
        self._task_status = task_status
        async with self.target.connect(command_timeout=config.subscriber_redis_timeout) as commands:
            self._commands = commands
            try:
                while True:
                    error = ""
                    try:
                        await self._connect_and_deliver(hub, retry)
                    except* REDIS_ERRORS as group:
                        error = describe(group)
                    self.connected = False
                    # If we are being cancelled (shutdown), the error above was
                    # a side effect of it: leave quietly.
                    await trio.lowlevel.checkpoint_if_cancelled()
                    self._report_started()
                    decision = retry.failed()
                    _log.warning(
                        "redis connection failed",
                        extra={
                            "addr": self.target.describe(),
                            "error": error,
                            "failures": retry.failures,
                            "max_retry": config.subscriber_redis_max_retry,
                        },
                    )
                    if decision is Decision.GIVE_UP:
                        raise SourceFailed(
                            f"redis at {self.target.describe()} unreachable after "
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

    async def _connect_and_deliver(self, hub: Hub, retry: RetryState) -> None:
        """One connection attempt: connect, call ``retry.succeeded()`` and
        ``_report_started()`` once delivering, deliver until the connection
        is lost (raise one of :data:`REDIS_ERRORS`)."""
        raise NotImplementedError

    async def command(self, send: Callable[[RedisClient], Awaitable[T]]) -> T:
        """Run a command (``/publish``, ``/debug``) on the command connection,
        bounded by the Redis timeout.

        Raises:
            SourceFailed: Redis refused or is unreachable (the caller answers 500).
        """
        commands = self._commands
        if commands is None:
            raise SourceFailed("redis is not connected")
        try:
            with trio.fail_after(self.config.subscriber_redis_timeout):
                return await send(commands)
        except REDIS_ERRORS as exc:
            raise SourceFailed(f"redis publish failed: {exc!r}") from exc

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


def text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def describe(group: BaseExceptionGroup[BaseException]) -> str:
    leaves: list[BaseException] = []
    stack: list[BaseException] = [group]
    while stack:
        exc = stack.pop()
        if isinstance(exc, BaseExceptionGroup):
            stack.extend(exc.exceptions)
        else:
            leaves.append(exc)
    return "; ".join(f"{type(e).__name__}: {e}" for e in leaves) or repr(group)
