"""Configuration (SPEC 7): plasma's names and defaults, aliases, options, and
bad values stopping start-up with one line and exit status 2."""

from __future__ import annotations

import socket
import subprocess
from typing import Any

import pytest
from click.testing import CliRunner

from plasma_trio import cli
from plasma_trio.config import Config, settings
from tests.helpers import PYTHON, free_port, plasma_env


def parsed(monkeypatch: pytest.MonkeyPatch, args: list[str], env: dict[str, str]) -> Config:
    """Run `plasma-trio serve` through click and capture the Config it would serve."""
    captured: list[Config] = []
    monkeypatch.setattr(cli, "_run", captured.append)
    environment: dict[str, str | None] = {**plasma_env(**env)}
    for name in ("PLASMA_GRPC_PORT", "PLASMA_METRICS_PORT", "PLASMA_PPROF_PORT"):
        if name not in env:
            environment[name] = None  # unset: see the real default
    result = CliRunner().invoke(cli.cli, ["serve", *args], env=environment, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return captured[0]


def test_defaults_are_plasmas(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [k for k in __import__("os").environ if k.startswith("PLASMA_")]:
        monkeypatch.delenv(name)
    config = parsed(monkeypatch, [], {})
    assert config == Config()
    expected: dict[str, Any] = {
        "port": 8080,
        "grpc_port": 50051,
        "metrics_port": 9999,
        "pprof_host": "127.0.0.1",
        "pprof_port": 6060,
        "debug": False,
        "origin": "",
        "sse_retry": 2000,
        "sse_eventquery": "eventType",
        "sse_heartbeat_interval": 10.0,
        "subscriber_type": "mock",
        "subscriber_mock_interval": 1.0,
        "subscriber_redis_addr": "localhost:6379",
        "subscriber_redis_db": 0,
        "subscriber_redis_channels": (),
        "subscriber_redis_over_max_retry_behavior": "die",
        "subscriber_redis_max_retry": 5,
        "subscriber_redis_timeout": 1.0,
        "subscriber_redis_retry_interval": 5.0,
        "error_log_out": "stderr",
        "access_log_out": "stdout",
        "metrics_interval": 10.0,
        "metrics_log_out": "stdout",
        "metrics_log_prefix": "metrics",
        "metrics_log_flag": 4,
        "metrics_log_interval": 60.0,
        "metrics_syslog_tag": "plasma",
        "metrics_syslog_interval": 60.0,
        "subscriber_buffer": 256,
        "max_connections": 0,
        "max_event_bytes": 1 << 20,
        "shutdown_timeout": 10.0,
        "history_size": 1000,
    }
    for name, value in expected.items():
        assert getattr(config, name) == value, name


def test_environment_and_options(monkeypatch: pytest.MonkeyPatch) -> None:
    config = parsed(
        monkeypatch,
        ["--sse-retry", "500"],
        {
            "PLASMA_PORT": "9000",
            "PLASMA_DEBUG": "true",
            "PLASMA_SSE_RETRY": "100",  # the option wins
            "PLASMA_SUBSCRIBER_MOCK_INTERVAL": "1m30s",
            "PLASMA_SSE_HEARTBEAT_INTERVAL": "500ms",
            "PLASMA_SUBSCRIBER_REDIS_CHANNELS": "a, b,,c",
            "PLASMA_ERROR_LOG_LEVEL": "WARN",
        },
    )
    assert config.port == 9000
    assert config.debug is True
    assert config.sse_retry == 500
    assert config.subscriber_mock_interval == 90.0
    assert config.sse_heartbeat_interval == 0.5
    assert config.subscriber_redis_channels == ("a", "b", "c")
    assert config.error_log_level.lower() == "warn"


@pytest.mark.parametrize(
    ("variable", "field", "value", "expected"),
    [
        ("PLASMA_GRPCPORT", "grpc_port", "7000", 7000),
        ("PLASMA_MERTICSPORT", "metrics_port", "7001", 7001),
        ("PLASMA_SUBSCRIBER_REDIS_MAXRETRY", "subscriber_redis_max_retry", "9", 9),
        ("PLASMA_METRICS_SYSLOG_NETWORDK", "metrics_syslog_network", "udp", "udp"),
    ],
)
def test_go_binary_alias_names(
    monkeypatch: pytest.MonkeyPatch, variable: str, field: str, value: str, expected: Any
) -> None:
    assert getattr(parsed(monkeypatch, [], {variable: value}), field) == expected


def test_documented_name_wins_over_alias(monkeypatch: pytest.MonkeyPatch) -> None:
    config = parsed(monkeypatch, [], {"PLASMA_GRPC_PORT": "7100", "PLASMA_GRPCPORT": "7200"})
    assert config.grpc_port == 7100


@pytest.mark.parametrize("width", [80, 200])
def test_help_lists_every_option_with_env_and_default(width: int) -> None:
    """Also in an 80-column terminal: no variable's name is cut in two."""
    result = CliRunner().invoke(cli.cli, ["serve", "--help"], terminal_width=width)
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for field, setting in settings():
        assert "--" + field.name.replace("_", "-") in text
        for env in setting.env:
            assert env in text, env
    assert "default: 8080" in text
    assert "default: 10s" in text
    summary = CliRunner().invoke(cli.cli, ["--help"], terminal_width=width).output
    assert "TYPE (e.g. program:1234:views) with JSON data." in " ".join(summary.split())


def run_cli(
    env: dict[str, str], *args: str, timeout: float = 20
) -> subprocess.CompletedProcess[str]:
    environment = plasma_env(**{"PLASMA_PORT": str(free_port()), **env})
    if "PLASMA_GRPCPORT" in env:
        del environment["PLASMA_GRPC_PORT"]
    if "PLASMA_MERTICSPORT" in env:
        del environment["PLASMA_METRICS_PORT"]
    return subprocess.run(
        [PYTHON, "-m", "plasma_trio", "serve", *args],
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"PLASMA_PORT": "abc"}, "PLASMA_PORT"),
        ({"PLASMA_PORT": "70000"}, "PLASMA_PORT"),
        ({"PLASMA_GRPCPORT": "x"}, "PLASMA_GRPCPORT"),
        ({"PLASMA_SUBSCRIBER_TYPE": "kafka"}, "PLASMA_SUBSCRIBER_TYPE"),
        ({"PLASMA_SUBSCRIBER_MOCK_INTERVAL": "5"}, "PLASMA_SUBSCRIBER_MOCK_INTERVAL"),
        ({"PLASMA_SUBSCRIBER_MOCK_INTERVAL": "0s"}, "PLASMA_SUBSCRIBER_MOCK_INTERVAL"),
        ({"PLASMA_SHUTDOWN_TIMEOUT": "-1s"}, "PLASMA_SHUTDOWN_TIMEOUT"),
        ({"PLASMA_SSE_RETRY": "-1"}, "PLASMA_SSE_RETRY"),
        ({"PLASMA_DEBUG": "maybe"}, "PLASMA_DEBUG"),
        ({"PLASMA_SUBSCRIBER_BUFFER": "0"}, "PLASMA_SUBSCRIBER_BUFFER"),
        ({"PLASMA_ERROR_LOG_LEVEL": "loud"}, "PLASMA_ERROR_LOG_LEVEL"),
        ({"PLASMA_ERROR_LOG_OUT": "/nonexistent/dir/err.log"}, "PLASMA_ERROR_LOG_OUT"),
        ({"PLASMA_ACCESS_LOG_OUT": "/proc/nope/access.log"}, "PLASMA_ACCESS_LOG_OUT"),
        (
            {"PLASMA_SUBSCRIBER_REDIS_OVER_MAX_RETRY_BEHAVIOR": "sleep"},
            "PLASMA_SUBSCRIBER_REDIS_OVER_MAX_RETRY_BEHAVIOR",
        ),
        ({"PLASMA_SUBSCRIBER_REDIS_ADDR": "no-port"}, "PLASMA_SUBSCRIBER_REDIS_ADDR"),
        ({"PLASMA_SUBSCRIBER_TYPE": "redis"}, "PLASMA_SUBSCRIBER_REDIS_CHANNELS"),
        ({"PLASMA_SUBSCRIBER_TYPE": "redis-streams"}, "PLASMA_SUBSCRIBER_REDIS_STREAMS"),
        ({"PLASMA_SUBSCRIBER_REDIS_MODE": "ring"}, "PLASMA_SUBSCRIBER_REDIS_MODE"),
        ({"PLASMA_SUBSCRIBER_REDIS_SHARDED": "true"}, "PLASMA_SUBSCRIBER_REDIS_SHARDED"),
        (
            {"PLASMA_SUBSCRIBER_REDIS_MODE": "cluster", "PLASMA_SUBSCRIBER_REDIS_DB": "2"},
            "PLASMA_SUBSCRIBER_REDIS_DB",
        ),
        ({"PLASMA_SUBSCRIBER_REDIS_MODE": "sentinel"}, "PLASMA_SUBSCRIBER_REDIS_SENTINEL_MASTER"),
        ({"PLASMA_SUBSCRIBER_REDIS_ADDR": "a:1,b:2"}, "PLASMA_SUBSCRIBER_REDIS_ADDR"),
        (
            {"PLASMA_SUBSCRIBER_REDIS_MODE": "cluster", "PLASMA_SUBSCRIBER_REDIS_ADDR": "a:1,b"},
            "PLASMA_SUBSCRIBER_REDIS_ADDR",
        ),
        (
            {"PLASMA_SUBSCRIBER_REDIS_TLS_CA_FILE": "/etc/hostname"},
            "PLASMA_SUBSCRIBER_REDIS_TLS_CA_FILE",
        ),
        (
            {
                "PLASMA_SUBSCRIBER_TYPE": "redis",
                "PLASMA_SUBSCRIBER_REDIS_CHANNELS": "c",
                "PLASMA_SUBSCRIBER_REDIS_TLS": "true",
                "PLASMA_SUBSCRIBER_REDIS_TLS_CA_FILE": "/nonexistent/ca.pem",
            },
            "PLASMA_SUBSCRIBER_REDIS_TLS_CA_FILE",
        ),
        ({"PLASMA_SUBSCRIBER_REDIS_STREAM_MAXLEN": "0"}, "PLASMA_SUBSCRIBER_REDIS_STREAM_MAXLEN"),
        ({"PLASMA_AUTH_JWT_KEY": "too-short"}, "PLASMA_AUTH_JWT_KEY"),
        ({"PLASMA_AUTH_JWT_KEY": '{"keys": [}'}, "PLASMA_AUTH_JWT_KEY"),
        ({"PLASMA_AUTH_JWT_KEY": "-----BEGIN PUBLIC KEY-----\nnope\n"}, "PLASMA_AUTH_JWT_KEY"),
        ({"PLASMA_HEADER_TIMEOUT": "soon"}, "PLASMA_HEADER_TIMEOUT"),
        ({"PLASMA_METRICS_TYPE": "statsd"}, "PLASMA_METRICS_TYPE"),
        ({"PLASMA_METRICS_SYSLOG_NETWORDK": "carrier-pigeon"}, "PLASMA_METRICS_SYSLOG_NETWORDK"),
        ({"PLASMA_TLS_CERT_FILE": "/etc/hostname"}, "PLASMA_TLS_KEY_FILE"),
        (
            {"PLASMA_TLS_CERT_FILE": "/nonexistent.pem", "PLASMA_TLS_KEY_FILE": "/etc/hostname"},
            "PLASMA_TLS_CERT_FILE",
        ),
    ],
)
def test_bad_setting_exits_2_with_one_line(env: dict[str, str], named: str) -> None:
    result = run_cli(env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert named in lines[0]
    assert "configuration error" in lines[0]
    assert result.stdout == ""


def test_bad_option_names_the_option() -> None:
    result = run_cli({}, "--port", "x")
    assert result.returncode == 2
    assert "--port" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_port_in_use_exits_2_before_serving() -> None:
    with socket.socket(socket.AF_INET6) as busy:
        busy.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        busy.bind(("::", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli({"PLASMA_PORT": str(port)})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "PLASMA_PORT" in lines[0]
    assert str(port) in lines[0]


def test_version_and_module_entry_point() -> None:
    result = subprocess.run(
        [PYTHON, "-m", "plasma_trio", "--version"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0
    assert result.stdout.startswith("plasma-trio, version ")


def test_readme_documents_every_setting() -> None:
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for field, setting in settings():
        for env in setting.env:
            assert f"`{env}`" in readme, env
        assert f"`--{field.name.replace('_', '-')}`" in readme
