"""Where Redis is and how to reach it: standalone, Redis Cluster or Sentinel; ACL user; TLS.

One :class:`RedisTarget` is built from the ``PLASMA_SUBSCRIBER_REDIS_*``
settings (SPEC 9) and used by the sources, the publisher library and
``plasma-trio publish`` alike, so every part of plasma-trio talks to the same
deployment the same way:

* ``standalone``: one ``host:port`` (``coredis.Redis``), with ``..._DB``;
* ``cluster``: the listed seed nodes (``coredis.RedisCluster``), which
  discovers the rest and follows slot moves and failovers; database 0 only;
* ``sentinel``: the listed sentinels (``coredis.Sentinel``), asked for the
  master named ``..._SENTINEL_MASTER``; each new connection asks again, so
  after a failover reconnects land on the promoted replica.

``..._USERNAME`` / ``..._PASSWORD`` log in (ACL); ``..._TLS`` (with
``..._TLS_CA_FILE``, else the system's CAs) encrypts and verifies every
connection, to the sentinels too. The CA file is read when the target is
built, at start-up: a bad one is a configuration error naming its variable.
"""

from __future__ import annotations

import ssl
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, cast

import coredis
import coredis.exceptions
from coredis.connection import TCPLocation
from coredis.retry import NoRetryPolicy
from coredis.tokens import PureToken

from plasma_trio.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from plasma_trio.config import Config

__all__ = ["RedisClient", "RedisTarget", "append_event", "publish_event"]

RedisClient = coredis.Redis[bytes] | coredis.RedisCluster[bytes]
Mode = Literal["standalone", "cluster", "sentinel"]


@dataclass(frozen=True, slots=True, kw_only=True)
class RedisTarget:
    """A Redis deployment and the credentials to use it (see the module doc)."""

    addrs: tuple[tuple[str, int], ...]
    mode: Mode = "standalone"
    db: int = 0
    username: str = ""
    password: str = ""
    sentinel_master: str = ""
    sentinel_password: str = ""
    sharded: bool = False
    tls: bool = False
    tls_ca_file: str = ""
    timeout: float = 1.0
    ssl_context: ssl.SSLContext | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.tls and self.ssl_context is None:
            try:
                context = ssl.create_default_context(cafile=self.tls_ca_file or None)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(
                    "PLASMA_SUBSCRIBER_REDIS_TLS_CA_FILE",
                    f"cannot load {self.tls_ca_file!r}: {exc}",
                ) from None
            object.__setattr__(self, "ssl_context", context)

    @classmethod
    def from_config(cls, config: Config) -> RedisTarget:
        """The target the settings name; call ``config.validate()`` first.

        Raises:
            ConfigError: the TLS CA file cannot be loaded.
        """
        return cls(
            addrs=tuple(config.redis_addrs),
            mode=config.subscriber_redis_mode,
            db=config.subscriber_redis_db,
            username=config.subscriber_redis_username,
            password=config.subscriber_redis_password,
            sentinel_master=config.subscriber_redis_sentinel_master,
            sentinel_password=config.subscriber_redis_sentinel_password,
            sharded=config.subscriber_redis_sharded,
            tls=config.subscriber_redis_tls,
            tls_ca_file=config.subscriber_redis_tls_ca_file,
            timeout=config.subscriber_redis_timeout,
        )

    def describe(self) -> str:
        """For logs: the mode and the addresses (never a password)."""
        addrs = ",".join(f"{host}:{port}" for host, port in self.addrs)
        if self.mode == "sentinel":
            return f"sentinel {addrs} master {self.sentinel_master}"
        return addrs if self.mode == "standalone" else f"cluster {addrs}"

    @asynccontextmanager
    async def connect(
        self, *, command_timeout: float | None, retry: bool = True
    ) -> AsyncIterator[RedisClient]:
        """A client for the deployment, for the ``async with`` block.

        ``command_timeout`` bounds each command's answer (``None``: no bound, for
        a subscription); ``retry=False``: a lost connection or a timeout
        surfaces at once (coredis otherwise retries quietly), for connections
        whose loss the caller must notice.
        """
        common: dict[str, Any] = {
            "username": self.username or None,
            "password": self.password or None,
            "connect_timeout": self.timeout,
            "stream_timeout": command_timeout,
        }
        if self.ssl_context is not None:
            common["ssl_context"] = self.ssl_context
        if not retry:
            common["retry_policy"] = NoRetryPolicy()
        locations = [TCPLocation(host, port) for host, port in self.addrs]
        if self.mode == "cluster":
            # (coredis's overloads cannot see decode_responses=False through **common)
            cluster_client = cast(
                "coredis.RedisCluster[bytes]",
                coredis.RedisCluster(startup_nodes=locations, decode_responses=False, **common),
            )
            async with cluster_client as cluster:
                yield cluster
            return
        if self.mode == "sentinel":
            sentinel_kwargs: dict[str, Any] = {
                "password": self.sentinel_password or None,
                "connect_timeout": self.timeout,
                "stream_timeout": self.timeout,
                "decode_responses": False,
            }
            if self.ssl_context is not None:
                sentinel_kwargs["ssl_context"] = self.ssl_context
            retry_policy = common.pop("retry_policy", None)
            extra = {"retry_policy": retry_policy} if retry_policy is not None else {}
            sentinel: coredis.Sentinel[bytes] = coredis.Sentinel(
                locations,
                sentinel_kwargs=sentinel_kwargs,
                decode_responses=False,
                **extra,
                **common,
            )
            async with sentinel:
                primary = sentinel.primary_for(self.sentinel_master, db=self.db)
                async with primary:
                    yield primary
            return
        host, port = self.addrs[0]
        async with coredis.Redis(
            host, port, db=self.db, decode_responses=False, **common
        ) as client:
            yield client


async def publish_event(client: RedisClient, sharded: bool, channel: str, wire: bytes) -> int:
    """``PUBLISH`` (``SPUBLISH`` with sharded pub/sub in a cluster) one event;
    the receiver count (in a cluster, only the receiving node's)."""
    if sharded and isinstance(client, coredis.RedisCluster):
        return int(await client.spublish(channel, wire))
    return int(await client.publish(channel, wire))


async def append_event(client: RedisClient, stream: str, wire: bytes, maxlen: int) -> str:
    """``XADD <stream> MAXLEN ~ <maxlen> * event <wire>``; the new entry id."""
    entry_id = await client.xadd(
        stream,
        {b"event": wire},
        trim_strategy=PureToken.MAXLEN,
        trim_operator=PureToken.APPROXIMATELY,
        threshold=maxlen,
    )
    if entry_id is None:  # pragma: no cover - only with NOMKSTREAM
        raise coredis.exceptions.ResponseError("XADD answered no id")
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
