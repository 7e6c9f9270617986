"""Configuration: every ``PLASMA_*`` setting, declared once.

Each field of :class:`Config` carries its environment variable(s), its
command-line option, a parser (a ``click.ParamType``) and its help text in
the field's metadata; ``cli.py`` turns that table into ``plasma-trio serve``
options, so click does all parsing of the environment and argv, and a bad
value is reported naming the variable. Names and defaults are plasma's
(openfresh/plasma README and ``config.go``), including the names the Go
binary actually read (``PLASMA_GRPCPORT``, ``PLASMA_MERTICSPORT`` [sic],
``PLASMA_SUBSCRIBER_REDIS_MAXRETRY``) and the README's typo
``PLASMA_METRICS_SYSLOG_NETWORDK``, accepted as aliases.

Cross-setting rules (TLS files come in pairs, Redis modes need channels,
...) are checked by :meth:`Config.validate`, which raises
:class:`~plasma_trio.errors.ConfigError` naming the variable and touches no
file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import click

from plasma_trio.config_types import (
    COUNT,
    DURATION,
    LEVEL,
    LOG_LEVELS,
    PORT,
    POSITIVE,
    DurationType,
    IntType,
    ListType,
    Setting,
    describe_default,
    setting,
    split_host_port,
)
from plasma_trio.errors import ConfigError

__all__ = [
    "LOG_LEVELS",
    "Config",
    "DurationType",
    "ListType",
    "Setting",
    "describe_default",
    "settings",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """The server's settings. Build it from the environment with ``plasma-trio serve``
    (see ``cli.py``) or directly in code and tests; call :meth:`validate` before use."""

    # --- listeners ---------------------------------------------------------
    port: int = setting(
        8080, "HTTP port: SSE, /hc, /debug, /publish.", env="PLASMA_PORT", type=PORT
    )
    grpc_port: int = setting(
        50051, "gRPC port.", env="PLASMA_GRPC_PORT", aliases=("PLASMA_GRPCPORT",), type=PORT
    )
    metrics_port: int = setting(
        9999,
        "Metrics port: /metrics/plasma, /metrics/python, /metrics.",
        env="PLASMA_METRICS_PORT",
        aliases=("PLASMA_MERTICSPORT",),
        type=PORT,
    )
    pprof_host: str = setting(
        "127.0.0.1",
        "Diagnostics (task dump) host; plasma's was 0.0.0.0.",
        env="PLASMA_PPROF_HOST",
    )
    pprof_port: int = setting(
        6060,
        "Diagnostics (task dump) port (with --workers: worker i listens on this + i).",
        env="PLASMA_PPROF_PORT",
        type=PORT,
    )
    workers: int = setting(
        1,
        "Worker processes sharing the ports (SO_REUSEPORT) under a supervisor; 0: one per core.",
        env="PLASMA_WORKERS",
        type=COUNT,
    )
    debug: bool = setting(
        False, "Serve the /debug page and publish form.", env="PLASMA_DEBUG", type=bool
    )
    origin: str = setting(
        "", "Access-Control-Allow-Origin of SSE responses (unset: none).", env="PLASMA_ORIGIN"
    )

    # --- SSE ---------------------------------------------------------------
    sse_retry: int = setting(
        2000, "Reconnection delay sent to SSE clients (ms).", env="PLASMA_SSE_RETRY", type=COUNT
    )
    sse_eventquery: str = setting(
        "eventType", "Query parameter holding the SSE topics.", env="PLASMA_SSE_EVENTQUERY"
    )
    sse_fast_path: bool = setting(
        True,
        "Serve HTTP/1.1 SSE (plain and TLS) by direct socket writes (false: Quart/Hypercorn).",
        env="PLASMA_SSE_FAST_PATH",
        type=bool,
    )
    sse_heartbeat_interval: float = setting(
        10.0,
        "Send ':heartbeat' to an SSE client idle this long.",
        env="PLASMA_SSE_HEARTBEAT_INTERVAL",
        type=DURATION,
        shown="10s",
    )

    # --- event source ------------------------------------------------------
    subscriber_type: Literal["mock", "redis", "redis-streams"] = setting(
        "mock",
        "Event source: mock (demo events + HTTP publish), redis, redis-streams.",
        env="PLASMA_SUBSCRIBER_TYPE",
        type=click.Choice(["mock", "redis", "redis-streams"]),
    )
    subscriber_mock_interval: float = setting(
        1.0,
        "Interval of the mock source's demo events.",
        env="PLASMA_SUBSCRIBER_MOCK_INTERVAL",
        type=DURATION,
        shown="1s",
    )
    subscriber_redis_addr: str = setting(
        "localhost:6379",
        "Redis host:port; in cluster mode seed nodes, in sentinel mode the sentinels"
        " (comma-separated).",
        env="PLASMA_SUBSCRIBER_REDIS_ADDR",
    )
    subscriber_redis_mode: Literal["standalone", "cluster", "sentinel"] = setting(
        "standalone",
        "Redis deployment: standalone, cluster (Redis Cluster) or sentinel.",
        env="PLASMA_SUBSCRIBER_REDIS_MODE",
        type=click.Choice(["standalone", "cluster", "sentinel"]),
    )
    subscriber_redis_sentinel_master: str = setting(
        "",
        "sentinel mode: the name of the monitored master.",
        env="PLASMA_SUBSCRIBER_REDIS_SENTINEL_MASTER",
    )
    subscriber_redis_sentinel_password: str = setting(
        "",
        "sentinel mode: the sentinels' password (unset: none).",
        env="PLASMA_SUBSCRIBER_REDIS_SENTINEL_PASSWORD",
    )
    subscriber_redis_sharded: bool = setting(
        False,
        "cluster mode: sharded pub/sub (SSUBSCRIBE/SPUBLISH, Redis 7+).",
        env="PLASMA_SUBSCRIBER_REDIS_SHARDED",
        type=bool,
    )
    subscriber_redis_username: str = setting(
        "", "Redis ACL user (unset: the default user).", env="PLASMA_SUBSCRIBER_REDIS_USERNAME"
    )
    subscriber_redis_password: str = setting(
        "", "Redis password.", env="PLASMA_SUBSCRIBER_REDIS_PASSWORD"
    )
    subscriber_redis_tls: bool = setting(
        False,
        "Connect to Redis (and sentinels) over TLS.",
        env="PLASMA_SUBSCRIBER_REDIS_TLS",
        type=bool,
    )
    subscriber_redis_tls_ca_file: str = setting(
        "",
        "TLS to Redis: CA bundle to verify the server with (unset: the system's).",
        env="PLASMA_SUBSCRIBER_REDIS_TLS_CA_FILE",
    )
    subscriber_redis_db: int = setting(
        0, "Redis database.", env="PLASMA_SUBSCRIBER_REDIS_DB", type=COUNT
    )
    subscriber_redis_channels: tuple[str, ...] = setting(
        (),
        "Redis pub/sub channels to subscribe to (comma-separated).",
        env="PLASMA_SUBSCRIBER_REDIS_CHANNELS",
        type=ListType(),
        shown="",
    )
    subscriber_redis_streams: tuple[str, ...] = setting(
        (),
        "Redis stream keys to read in redis-streams mode (comma-separated).",
        env="PLASMA_SUBSCRIBER_REDIS_STREAMS",
        type=ListType(),
        shown="",
    )
    subscriber_redis_stream_maxlen: int = setting(
        100000,
        "redis-streams: publishing trims the stream to about this many entries (XADD MAXLEN ~).",
        env="PLASMA_SUBSCRIBER_REDIS_STREAM_MAXLEN",
        type=POSITIVE,
    )
    subscriber_redis_over_max_retry_behavior: Literal["die", "alive"] = setting(
        "die",
        "After MAX_RETRY failed reconnects: die (exit non-zero) or alive (keep retrying).",
        env="PLASMA_SUBSCRIBER_REDIS_OVER_MAX_RETRY_BEHAVIOR",
        type=click.Choice(["die", "alive"]),
    )
    subscriber_redis_max_retry: int = setting(
        5,
        "Failed Redis reconnects in a row before OVER_MAX_RETRY_BEHAVIOR applies.",
        env="PLASMA_SUBSCRIBER_REDIS_MAX_RETRY",
        aliases=("PLASMA_SUBSCRIBER_REDIS_MAXRETRY",),
        type=COUNT,
    )
    subscriber_redis_timeout: float = setting(
        1.0,
        "Bound on each Redis attempt.",
        env="PLASMA_SUBSCRIBER_REDIS_TIMEOUT",
        type=DURATION,
        shown="1s",
    )
    subscriber_redis_retry_interval: float = setting(
        5.0,
        "Wait between Redis reconnect attempts.",
        env="PLASMA_SUBSCRIBER_REDIS_RETRY_INTERVAL",
        type=DURATION,
        shown="5s",
    )

    # --- logs --------------------------------------------------------------
    error_log_out: str = setting(
        "stderr", "Error log: stdout, stderr, discard or a file path.", env="PLASMA_ERROR_LOG_OUT"
    )
    error_log_level: str = setting(
        "debug",
        "Error log level: panic, fatal, error, warn, info, debug.",
        env="PLASMA_ERROR_LOG_LEVEL",
        type=LEVEL,
    )
    access_log_out: str = setting(
        "stdout", "Access log: stdout, stderr, discard or a file path.", env="PLASMA_ACCESS_LOG_OUT"
    )
    access_log_level: str = setting(
        "debug",
        "Access log level: panic, fatal, error, warn, info, debug.",
        env="PLASMA_ACCESS_LOG_LEVEL",
        type=LEVEL,
    )

    # --- TLS ---------------------------------------------------------------
    tls_cert_file: str = setting(
        "",
        "TLS certificate (PEM); with TLS_KEY_FILE enables HTTPS and gRPC TLS.",
        env="PLASMA_TLS_CERT_FILE",
    )
    tls_key_file: str = setting("", "TLS private key (PEM).", env="PLASMA_TLS_KEY_FILE")
    tls_reload_interval: float = setting(
        10.0,
        "Check the TLS files this often and load a changed pair (0: only on SIGHUP).",
        env="PLASMA_TLS_RELOAD_INTERVAL",
        type=DurationType(allow_zero=True),
        shown="10s",
    )

    # --- metrics reporters -------------------------------------------------
    metrics_type: Literal["", "log", "syslog"] = setting(
        "",
        "Periodic metrics report: log or syslog (empty: none).",
        env="PLASMA_METRICS_TYPE",
        type=click.Choice(["", "log", "syslog"]),
    )
    metrics_interval: float = setting(
        10.0,
        "Interval of metrics collection.",
        env="PLASMA_METRICS_INTERVAL",
        type=DURATION,
        shown="10s",
    )
    metrics_log_out: str = setting(
        "stdout", "Metrics log: stdout, stderr or a file path.", env="PLASMA_METRICS_LOG_OUT"
    )
    metrics_log_prefix: str = setting(
        "metrics", "Metrics log line prefix.", env="PLASMA_METRICS_LOG_PREFIX"
    )
    metrics_log_flag: int = setting(
        4,
        "Go log flags of the metrics log (4 = microseconds).",
        env="PLASMA_METRICS_LOG_FLAG",
        type=COUNT,
    )
    metrics_log_interval: float = setting(
        60.0,
        "Interval of metrics log reports.",
        env="PLASMA_METRICS_LOG_INTERVAL",
        type=DURATION,
        shown="1m",
    )
    metrics_syslog_tag: str = setting("plasma", "Syslog tag.", env="PLASMA_METRICS_SYSLOG_TAG")
    metrics_syslog_interval: float = setting(
        60.0,
        "Interval of syslog reports.",
        env="PLASMA_METRICS_SYSLOG_INTERVAL",
        type=DURATION,
        shown="1m",
    )
    metrics_syslog_severity: int = setting(
        0, "Syslog severity (0-7).", env="PLASMA_METRICS_SYSLOG_SEVERITY", type=IntType(0, 7)
    )
    metrics_syslog_facility: int = setting(
        0, "Syslog facility (0-23).", env="PLASMA_METRICS_SYSLOG_FACILITY", type=IntType(0, 23)
    )
    metrics_syslog_network: Literal["", "udp", "tcp", "unix", "unixgram"] = setting(
        "",
        "Syslog network: udp, tcp, unix, unixgram (empty: local syslog socket).",
        env="PLASMA_METRICS_SYSLOG_NETWORK",
        aliases=("PLASMA_METRICS_SYSLOG_NETWORDK",),
        type=click.Choice(["", "udp", "tcp", "unix", "unixgram"]),
    )
    metrics_syslog_addr: str = setting(
        "", "Syslog address (host:port or socket path).", env="PLASMA_METRICS_SYSLOG_ADDR"
    )

    # --- plasma-trio additions ---------------------------------------------
    subscriber_buffer: int = setting(
        256,
        "Events a subscriber may fall behind before it is cut off.",
        env="PLASMA_SUBSCRIBER_BUFFER",
        type=POSITIVE,
    )
    subscriber_buffer_bytes: int = setting(
        16 << 20,
        "Bytes of events a subscriber may have queued before it is cut off.",
        env="PLASMA_SUBSCRIBER_BUFFER_BYTES",
        type=POSITIVE,
    )
    subscriber_write_timeout: float = setting(
        10.0,
        "A subscriber that accepts no byte for this long while events wait is cut off.",
        env="PLASMA_SUBSCRIBER_WRITE_TIMEOUT",
        type=DurationType(),
        shown="10s",
    )
    max_connections: int = setting(
        0,
        "Limit of concurrent SSE + gRPC streams (0: unlimited).",
        env="PLASMA_MAX_CONNECTIONS",
        type=COUNT,
    )
    listen_backlog: int = setting(
        4096,
        "Connects the kernel holds for each port while the server is busy (listen backlog;"
        " capped by net.core.somaxconn).",
        env="PLASMA_LISTEN_BACKLOG",
        type=POSITIVE,
    )
    max_topics: int = setting(
        256,
        "Limit of topics in one subscription (0: unlimited).",
        env="PLASMA_MAX_TOPICS",
        type=COUNT,
    )
    max_topic_length: int = setting(
        1024,
        "Limit of one topic's length (0: unlimited).",
        env="PLASMA_MAX_TOPIC_LENGTH",
        type=COUNT,
    )
    max_event_bytes: int = setting(
        1 << 20,
        "Largest accepted event message in bytes.",
        env="PLASMA_MAX_EVENT_BYTES",
        type=POSITIVE,
    )
    shutdown_timeout: float = setting(
        10.0,
        "On SIGINT/SIGTERM, time allowed to end streams before exiting.",
        env="PLASMA_SHUTDOWN_TIMEOUT",
        type=DurationType(allow_zero=True),
        shown="10s",
    )
    auth_jwt_key: str = setting(
        "",
        "Access control: JWT key (HMAC secret, PEM public key, or a PEM/JWKS file path);"
        " unset: open.",
        env="PLASMA_AUTH_JWT_KEY",
    )
    auth_jwt_audience: str = setting(
        "",
        "Access control: required aud claim (unset: not checked).",
        env="PLASMA_AUTH_JWT_AUDIENCE",
    )
    auth_jwt_issuer: str = setting(
        "", "Access control: required iss claim (unset: not checked).", env="PLASMA_AUTH_JWT_ISSUER"
    )
    auth_cookie: str = setting(
        "plasma_token",
        "Access control: cookie an SSE subscriber's token may come in.",
        env="PLASMA_AUTH_COOKIE",
    )
    header_timeout: float = setting(
        10.0,
        "Time a connection gets to complete its request head (TLS handshake included).",
        env="PLASMA_HEADER_TIMEOUT",
        type=DURATION,
        shown="10s",
    )
    publish_token: str = setting(
        "", "Bearer token enabling POST /publish (unset: disabled).", env="PLASMA_PUBLISH_TOKEN"
    )
    history_size: int = setting(
        1000, "Events kept for Last-Event-ID replay.", env="PLASMA_HISTORY_SIZE", type=COUNT
    )

    @property
    def tls_enabled(self) -> bool:
        return bool(self.tls_cert_file and self.tls_key_file)

    @property
    def redis_addrs(self) -> list[tuple[str, int]]:
        """``subscriber_redis_addr`` split into (host, port)s; call :meth:`validate` first."""
        return [split_host_port(a) for a in self.subscriber_redis_addr.split(",") if a.strip()]

    def validate(self) -> Config:
        """Check the rules that involve more than one value.

        Pure: files are opened by what uses them, at start-up (the TLS pair by
        :func:`plasma_trio.transports.tls.server_context`, log files by
        :func:`plasma_trio.logs.configure`), each failure a ``ConfigError``
        naming its variable.

        Returns ``self`` so it chains. Raises :class:`ConfigError` naming the
        first variable at fault.
        """
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            missing = "PLASMA_TLS_KEY_FILE" if self.tls_cert_file else "PLASMA_TLS_CERT_FILE"
            raise ConfigError(
                missing, "TLS needs both PLASMA_TLS_CERT_FILE and PLASMA_TLS_KEY_FILE"
            )
        self.validate_redis()
        if self.subscriber_type == "redis" and not self.subscriber_redis_channels:
            raise ConfigError(
                _var("subscriber_redis_channels"), "redis mode needs at least one channel"
            )
        if self.subscriber_type == "redis-streams" and not self.subscriber_redis_streams:
            raise ConfigError(
                _var("subscriber_redis_streams"), "redis-streams mode needs at least one stream key"
            )
        if self.workers != 1 and (self.port == 0 or self.grpc_port == 0):
            raise ConfigError(
                _var("workers"),
                "workers share their ports: PLASMA_PORT and PLASMA_GRPC_PORT cannot be 0",
            )
        if not self.sse_eventquery:
            raise ConfigError(_var("sse_eventquery"), "must not be empty")
        for name in ("error_log_out", "access_log_out", "metrics_log_out"):
            if not getattr(self, name):
                raise ConfigError(_var(name), "must be stdout, stderr, discard or a file path")
        return self

    def validate_redis(self) -> Config:
        """The rules of the Redis settings alone (also for ``plasma-trio publish``).

        Raises :class:`ConfigError` naming the first variable at fault.
        """
        try:
            addrs = self.redis_addrs
        except ValueError as exc:
            raise ConfigError(_var("subscriber_redis_addr"), str(exc)) from None
        if not addrs:
            raise ConfigError(_var("subscriber_redis_addr"), "no host:port given")
        mode = self.subscriber_redis_mode
        if mode == "standalone" and len(addrs) > 1:
            raise ConfigError(
                _var("subscriber_redis_addr"),
                "several addresses need PLASMA_SUBSCRIBER_REDIS_MODE=cluster or sentinel",
            )
        if self.subscriber_redis_sharded and mode != "cluster":
            raise ConfigError(
                _var("subscriber_redis_sharded"),
                "sharded pub/sub needs PLASMA_SUBSCRIBER_REDIS_MODE=cluster",
            )
        if mode == "cluster" and self.subscriber_redis_db != 0:
            raise ConfigError(_var("subscriber_redis_db"), "Redis Cluster has only database 0")
        if mode == "sentinel" and not self.subscriber_redis_sentinel_master:
            raise ConfigError(
                _var("subscriber_redis_sentinel_master"),
                "sentinel mode needs the name of the monitored master",
            )
        if self.subscriber_redis_tls_ca_file and not self.subscriber_redis_tls:
            raise ConfigError(
                _var("subscriber_redis_tls_ca_file"),
                "a CA file without PLASMA_SUBSCRIBER_REDIS_TLS=true would be ignored",
            )
        return self


def settings() -> list[tuple[dataclasses.Field[Any], Setting]]:
    """Every field with its :class:`Setting`, in declaration order."""
    return [(f, f.metadata["setting"]) for f in dataclasses.fields(Config)]


def _var(name: str) -> str:
    for f, declared in settings():
        if f.name == name:
            return declared.variable
    raise KeyError(name)  # pragma: no cover - programming error
