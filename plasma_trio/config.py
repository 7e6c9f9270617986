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
from dataclasses import dataclass, field
from typing import Any, Literal

import click

from plasma_trio.core.durations import format_duration, parse_duration
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

LOG_LEVELS = ("panic", "fatal", "error", "warn", "info", "debug")


class DurationType(click.ParamType):  # type: ignore[type-arg,unused-ignore]
    """Go duration syntax (``500ms``, ``1m30s``); positive unless ``allow_zero``."""

    name = "duration"

    def __init__(self, *, allow_zero: bool = False) -> None:
        self.allow_zero = allow_zero

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, (int, float)):
            seconds = float(value)
        else:
            try:
                seconds = parse_duration(str(value))
            except ValueError as exc:
                self.fail(str(exc), param, ctx)
        if seconds < 0 or (seconds == 0 and not self.allow_zero):
            self.fail(f"{value!r} must be {'>= 0' if self.allow_zero else '> 0'}", param, ctx)
        return seconds


class ListType(click.ParamType):  # type: ignore[type-arg,unused-ignore]
    """A comma-separated list; blanks around items and empty items are dropped."""

    name = "list"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[str, ...]:
        if isinstance(value, tuple):
            return value
        return tuple(item.strip() for item in str(value).split(",") if item.strip())


class IntType(click.IntRange):
    """An integer within bounds, with a plain message for a non-integer."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            int(str(value).strip())
        except ValueError:
            self.fail(f"{value!r} is not an integer", param, ctx)
        return super().convert(int(str(value).strip()), param, ctx)


PORT = IntType(0, 65535)
COUNT = IntType(min=0)
POSITIVE = IntType(min=1)
DURATION = DurationType()
LEVEL = click.Choice(LOG_LEVELS, case_sensitive=False)


@dataclass(frozen=True, slots=True)
class Setting:
    """How one :class:`Config` field is read. ``env[0]`` is the documented name."""

    env: tuple[str, ...]
    type: click.ParamType | type  # type: ignore[type-arg,unused-ignore]
    help: str
    cli_default: Any

    @property
    def variable(self) -> str:
        return self.env[0]


def _setting(
    default: Any,
    help: str,
    *,
    env: str,
    aliases: tuple[str, ...] = (),
    type: click.ParamType | type = str,  # type: ignore[type-arg,unused-ignore]
    shown: Any = None,
) -> Any:
    meta = Setting(
        env=(env, *aliases),
        type=type,
        help=help,
        cli_default=default if shown is None else shown,
    )
    return field(default=default, metadata={"setting": meta})


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """The server's settings. Build it from the environment with ``plasma-trio serve``
    (see ``cli.py``) or directly in code and tests; call :meth:`validate` before use."""

    # --- listeners ---------------------------------------------------------
    port: int = _setting(
        8080, "HTTP port: SSE, /hc, /debug, /publish.", env="PLASMA_PORT", type=PORT
    )
    grpc_port: int = _setting(
        50051, "gRPC port.", env="PLASMA_GRPC_PORT", aliases=("PLASMA_GRPCPORT",), type=PORT
    )
    metrics_port: int = _setting(
        9999,
        "Metrics port: /metrics/plasma, /metrics/python, /metrics.",
        env="PLASMA_METRICS_PORT",
        aliases=("PLASMA_MERTICSPORT",),
        type=PORT,
    )
    pprof_host: str = _setting(
        "127.0.0.1",
        "Diagnostics (task dump) host; plasma's was 0.0.0.0.",
        env="PLASMA_PPROF_HOST",
    )
    pprof_port: int = _setting(
        6060,
        "Diagnostics (task dump) port (with --workers: worker i listens on this + i).",
        env="PLASMA_PPROF_PORT",
        type=PORT,
    )
    workers: int = _setting(
        1,
        "Worker processes sharing the ports (SO_REUSEPORT) under a supervisor; 0: one per core.",
        env="PLASMA_WORKERS",
        type=COUNT,
    )
    debug: bool = _setting(
        False, "Serve the /debug page and publish form.", env="PLASMA_DEBUG", type=bool
    )
    origin: str = _setting(
        "", "Access-Control-Allow-Origin of SSE responses (unset: none).", env="PLASMA_ORIGIN"
    )

    # --- SSE ---------------------------------------------------------------
    sse_retry: int = _setting(
        2000, "Reconnection delay sent to SSE clients (ms).", env="PLASMA_SSE_RETRY", type=COUNT
    )
    sse_eventquery: str = _setting(
        "eventType", "Query parameter holding the SSE topics.", env="PLASMA_SSE_EVENTQUERY"
    )
    sse_fast_path: bool = _setting(
        True,
        "Serve plain HTTP/1.1 SSE by direct socket writes (false: through Quart/Hypercorn).",
        env="PLASMA_SSE_FAST_PATH",
        type=bool,
    )
    sse_heartbeat_interval: float = _setting(
        10.0,
        "Send ':heartbeat' to an SSE client idle this long.",
        env="PLASMA_SSE_HEARTBEAT_INTERVAL",
        type=DURATION,
        shown="10s",
    )

    # --- event source ------------------------------------------------------
    subscriber_type: Literal["mock", "redis", "redis-streams"] = _setting(
        "mock",
        "Event source: mock (demo events + HTTP publish), redis, redis-streams.",
        env="PLASMA_SUBSCRIBER_TYPE",
        type=click.Choice(["mock", "redis", "redis-streams"]),
    )
    subscriber_mock_interval: float = _setting(
        1.0,
        "Interval of the mock source's demo events.",
        env="PLASMA_SUBSCRIBER_MOCK_INTERVAL",
        type=DURATION,
        shown="1s",
    )
    subscriber_redis_addr: str = _setting(
        "localhost:6379",
        "Redis host:port; in cluster mode seed nodes, in sentinel mode the sentinels"
        " (comma-separated).",
        env="PLASMA_SUBSCRIBER_REDIS_ADDR",
    )
    subscriber_redis_mode: Literal["standalone", "cluster", "sentinel"] = _setting(
        "standalone",
        "Redis deployment: standalone, cluster (Redis Cluster) or sentinel.",
        env="PLASMA_SUBSCRIBER_REDIS_MODE",
        type=click.Choice(["standalone", "cluster", "sentinel"]),
    )
    subscriber_redis_sentinel_master: str = _setting(
        "",
        "sentinel mode: the name of the monitored master.",
        env="PLASMA_SUBSCRIBER_REDIS_SENTINEL_MASTER",
    )
    subscriber_redis_sentinel_password: str = _setting(
        "",
        "sentinel mode: the sentinels' password (unset: none).",
        env="PLASMA_SUBSCRIBER_REDIS_SENTINEL_PASSWORD",
    )
    subscriber_redis_sharded: bool = _setting(
        False,
        "cluster mode: sharded pub/sub (SSUBSCRIBE/SPUBLISH, Redis 7+).",
        env="PLASMA_SUBSCRIBER_REDIS_SHARDED",
        type=bool,
    )
    subscriber_redis_username: str = _setting(
        "", "Redis ACL user (unset: the default user).", env="PLASMA_SUBSCRIBER_REDIS_USERNAME"
    )
    subscriber_redis_password: str = _setting(
        "", "Redis password.", env="PLASMA_SUBSCRIBER_REDIS_PASSWORD"
    )
    subscriber_redis_tls: bool = _setting(
        False,
        "Connect to Redis (and sentinels) over TLS.",
        env="PLASMA_SUBSCRIBER_REDIS_TLS",
        type=bool,
    )
    subscriber_redis_tls_ca_file: str = _setting(
        "",
        "TLS to Redis: CA bundle to verify the server with (unset: the system's).",
        env="PLASMA_SUBSCRIBER_REDIS_TLS_CA_FILE",
    )
    subscriber_redis_db: int = _setting(
        0, "Redis database.", env="PLASMA_SUBSCRIBER_REDIS_DB", type=COUNT
    )
    subscriber_redis_channels: tuple[str, ...] = _setting(
        (),
        "Redis pub/sub channels to subscribe to (comma-separated).",
        env="PLASMA_SUBSCRIBER_REDIS_CHANNELS",
        type=ListType(),
        shown="",
    )
    subscriber_redis_streams: tuple[str, ...] = _setting(
        (),
        "Redis stream keys to read in redis-streams mode (comma-separated).",
        env="PLASMA_SUBSCRIBER_REDIS_STREAMS",
        type=ListType(),
        shown="",
    )
    subscriber_redis_stream_maxlen: int = _setting(
        100000,
        "redis-streams: publishing trims the stream to about this many entries (XADD MAXLEN ~).",
        env="PLASMA_SUBSCRIBER_REDIS_STREAM_MAXLEN",
        type=POSITIVE,
    )
    subscriber_redis_over_max_retry_behavior: Literal["die", "alive"] = _setting(
        "die",
        "After MAX_RETRY failed reconnects: die (exit non-zero) or alive (keep retrying).",
        env="PLASMA_SUBSCRIBER_REDIS_OVER_MAX_RETRY_BEHAVIOR",
        type=click.Choice(["die", "alive"]),
    )
    subscriber_redis_max_retry: int = _setting(
        5,
        "Failed Redis reconnects in a row before OVER_MAX_RETRY_BEHAVIOR applies.",
        env="PLASMA_SUBSCRIBER_REDIS_MAX_RETRY",
        aliases=("PLASMA_SUBSCRIBER_REDIS_MAXRETRY",),
        type=COUNT,
    )
    subscriber_redis_timeout: float = _setting(
        1.0,
        "Bound on each Redis attempt.",
        env="PLASMA_SUBSCRIBER_REDIS_TIMEOUT",
        type=DURATION,
        shown="1s",
    )
    subscriber_redis_retry_interval: float = _setting(
        5.0,
        "Wait between Redis reconnect attempts.",
        env="PLASMA_SUBSCRIBER_REDIS_RETRY_INTERVAL",
        type=DURATION,
        shown="5s",
    )

    # --- logs --------------------------------------------------------------
    error_log_out: str = _setting(
        "stderr", "Error log: stdout, stderr, discard or a file path.", env="PLASMA_ERROR_LOG_OUT"
    )
    error_log_level: str = _setting(
        "debug",
        "Error log level: panic, fatal, error, warn, info, debug.",
        env="PLASMA_ERROR_LOG_LEVEL",
        type=LEVEL,
    )
    access_log_out: str = _setting(
        "stdout", "Access log: stdout, stderr, discard or a file path.", env="PLASMA_ACCESS_LOG_OUT"
    )
    access_log_level: str = _setting(
        "debug",
        "Access log level: panic, fatal, error, warn, info, debug.",
        env="PLASMA_ACCESS_LOG_LEVEL",
        type=LEVEL,
    )

    # --- TLS ---------------------------------------------------------------
    tls_cert_file: str = _setting(
        "",
        "TLS certificate (PEM); with TLS_KEY_FILE enables HTTPS and gRPC TLS.",
        env="PLASMA_TLS_CERT_FILE",
    )
    tls_key_file: str = _setting("", "TLS private key (PEM).", env="PLASMA_TLS_KEY_FILE")
    tls_reload_interval: float = _setting(
        10.0,
        "Check the TLS files this often and load a changed pair (0: only on SIGHUP).",
        env="PLASMA_TLS_RELOAD_INTERVAL",
        type=DurationType(allow_zero=True),
        shown="10s",
    )

    # --- metrics reporters -------------------------------------------------
    metrics_type: Literal["", "log", "syslog"] = _setting(
        "",
        "Periodic metrics report: log or syslog (empty: none).",
        env="PLASMA_METRICS_TYPE",
        type=click.Choice(["", "log", "syslog"]),
    )
    metrics_interval: float = _setting(
        10.0,
        "Interval of metrics collection.",
        env="PLASMA_METRICS_INTERVAL",
        type=DURATION,
        shown="10s",
    )
    metrics_log_out: str = _setting(
        "stdout", "Metrics log: stdout, stderr or a file path.", env="PLASMA_METRICS_LOG_OUT"
    )
    metrics_log_prefix: str = _setting(
        "metrics", "Metrics log line prefix.", env="PLASMA_METRICS_LOG_PREFIX"
    )
    metrics_log_flag: int = _setting(
        4,
        "Go log flags of the metrics log (4 = microseconds).",
        env="PLASMA_METRICS_LOG_FLAG",
        type=COUNT,
    )
    metrics_log_interval: float = _setting(
        60.0,
        "Interval of metrics log reports.",
        env="PLASMA_METRICS_LOG_INTERVAL",
        type=DURATION,
        shown="1m",
    )
    metrics_syslog_tag: str = _setting("plasma", "Syslog tag.", env="PLASMA_METRICS_SYSLOG_TAG")
    metrics_syslog_interval: float = _setting(
        60.0,
        "Interval of syslog reports.",
        env="PLASMA_METRICS_SYSLOG_INTERVAL",
        type=DURATION,
        shown="1m",
    )
    metrics_syslog_severity: int = _setting(
        0, "Syslog severity (0-7).", env="PLASMA_METRICS_SYSLOG_SEVERITY", type=IntType(0, 7)
    )
    metrics_syslog_facility: int = _setting(
        0, "Syslog facility (0-23).", env="PLASMA_METRICS_SYSLOG_FACILITY", type=IntType(0, 23)
    )
    metrics_syslog_network: Literal["", "udp", "tcp", "unix", "unixgram"] = _setting(
        "",
        "Syslog network: udp, tcp, unix, unixgram (empty: local syslog socket).",
        env="PLASMA_METRICS_SYSLOG_NETWORK",
        aliases=("PLASMA_METRICS_SYSLOG_NETWORDK",),
        type=click.Choice(["", "udp", "tcp", "unix", "unixgram"]),
    )
    metrics_syslog_addr: str = _setting(
        "", "Syslog address (host:port or socket path).", env="PLASMA_METRICS_SYSLOG_ADDR"
    )

    # --- plasma-trio additions ---------------------------------------------
    subscriber_buffer: int = _setting(
        256,
        "Events a subscriber may fall behind before it is cut off.",
        env="PLASMA_SUBSCRIBER_BUFFER",
        type=POSITIVE,
    )
    subscriber_buffer_bytes: int = _setting(
        16 << 20,
        "Bytes of events a subscriber may have queued before it is cut off.",
        env="PLASMA_SUBSCRIBER_BUFFER_BYTES",
        type=POSITIVE,
    )
    subscriber_write_timeout: float = _setting(
        10.0,
        "A subscriber that accepts no byte for this long while events wait is cut off.",
        env="PLASMA_SUBSCRIBER_WRITE_TIMEOUT",
        type=DurationType(),
        shown="10s",
    )
    max_connections: int = _setting(
        0,
        "Limit of concurrent SSE + gRPC streams (0: unlimited).",
        env="PLASMA_MAX_CONNECTIONS",
        type=COUNT,
    )
    max_topics: int = _setting(
        256,
        "Limit of topics in one subscription (0: unlimited).",
        env="PLASMA_MAX_TOPICS",
        type=COUNT,
    )
    max_topic_length: int = _setting(
        1024,
        "Limit of one topic's length (0: unlimited).",
        env="PLASMA_MAX_TOPIC_LENGTH",
        type=COUNT,
    )
    max_event_bytes: int = _setting(
        1 << 20,
        "Largest accepted event message in bytes.",
        env="PLASMA_MAX_EVENT_BYTES",
        type=POSITIVE,
    )
    shutdown_timeout: float = _setting(
        10.0,
        "On SIGINT/SIGTERM, time allowed to end streams before exiting.",
        env="PLASMA_SHUTDOWN_TIMEOUT",
        type=DurationType(allow_zero=True),
        shown="10s",
    )
    auth_jwt_key: str = _setting(
        "",
        "Access control: JWT key (HMAC secret, PEM public key, or a PEM/JWKS file path);"
        " unset: open.",
        env="PLASMA_AUTH_JWT_KEY",
    )
    auth_jwt_audience: str = _setting(
        "",
        "Access control: required aud claim (unset: not checked).",
        env="PLASMA_AUTH_JWT_AUDIENCE",
    )
    auth_jwt_issuer: str = _setting(
        "", "Access control: required iss claim (unset: not checked).", env="PLASMA_AUTH_JWT_ISSUER"
    )
    auth_cookie: str = _setting(
        "plasma_token",
        "Access control: cookie an SSE subscriber's token may come in.",
        env="PLASMA_AUTH_COOKIE",
    )
    header_timeout: float = _setting(
        10.0,
        "Time a connection gets to complete its request head (TLS handshake included).",
        env="PLASMA_HEADER_TIMEOUT",
        type=DURATION,
        shown="10s",
    )
    publish_token: str = _setting(
        "", "Bearer token enabling POST /publish (unset: disabled).", env="PLASMA_PUBLISH_TOKEN"
    )
    history_size: int = _setting(
        1000, "Events kept for Last-Event-ID replay.", env="PLASMA_HISTORY_SIZE", type=COUNT
    )

    @property
    def tls_enabled(self) -> bool:
        return bool(self.tls_cert_file and self.tls_key_file)

    @property
    def redis_addrs(self) -> list[tuple[str, int]]:
        """``subscriber_redis_addr`` split into (host, port)s; call :meth:`validate` first."""
        return [_split_host_port(a) for a in self.subscriber_redis_addr.split(",") if a.strip()]

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
    for f, setting in settings():
        if f.name == name:
            return setting.variable
    raise KeyError(name)  # pragma: no cover - programming error


def _split_host_port(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{addr!r} is not host:port")
    host = host.strip("[]") or "localhost"
    return host, int(port)


def describe_default(setting: Setting) -> str:
    """The default as a user would write it (for --help and the README)."""
    value = setting.cli_default
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and isinstance(setting.type, DurationType):
        return format_duration(value)
    return str(value)
