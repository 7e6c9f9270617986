"""The ``plasma-trio`` command.

``plasma-trio serve`` reads every setting from its option or its
``PLASMA_*`` environment variable (the option wins), validates the lot, and
runs :func:`plasma_trio.app.serve` under ``trio.run``.

Exit status: 0 after a clean shutdown; 2 for a bad setting (one line on
stderr naming the variable), 1 when a component fails for good.
"""

from __future__ import annotations

import os
import sys
import textwrap
from functools import partial
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click
import trio

from plasma_trio import __version__, gc_tuning
from plasma_trio.config import Config, describe_default, settings
from plasma_trio.errors import ConfigError, PlasmaError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

__all__ = ["main"]

E = TypeVar("E", bound=BaseException)

EXIT_CONFIG = 2
EXIT_FAILURE = 1


_PUBLISH_SETTINGS = (
    "subscriber_redis_addr",
    "subscriber_redis_mode",
    "subscriber_redis_sentinel_master",
    "subscriber_redis_sentinel_password",
    "subscriber_redis_sharded",
    "subscriber_redis_username",
    "subscriber_redis_tls",
    "subscriber_redis_tls_ca_file",
    "subscriber_redis_password",
    "subscriber_redis_db",
    "subscriber_redis_channels",
    "subscriber_redis_streams",
    "subscriber_redis_stream_maxlen",
    "subscriber_type",
    "subscriber_redis_timeout",
    "max_event_bytes",
)


def _options(func: Callable[..., Any], only: Sequence[str] | None = None) -> Callable[..., Any]:
    """Attach one click option per :class:`Config` field (declared in config.py)."""
    for f, setting in reversed(settings()):
        if only is not None and f.name not in only:
            continue
        flag = "--" + f.name.replace("_", "-")
        envs = ", ".join(setting.env)
        default = describe_default(setting)
        help_text = f"{setting.help} [env: {envs}; default: {default or '(empty)'}]"
        if setting.type is bool:
            decl = [f"{flag}/--no-{f.name.replace('_', '-')}", f.name]
            option = click.option(
                *decl, envvar=list(setting.env), default=setting.cli_default, help=help_text
            )
        else:
            option = click.option(
                flag,
                f.name,
                envvar=list(setting.env),
                type=setting.type,
                default=setting.cli_default,
                help=help_text,
                show_default=False,
            )
        func = option(func)
    return func


def _width(text: str) -> int:
    """Columns ``text`` takes on a terminal (ANSI styles take none)."""
    return len(click.unstyle(text))


def _wrap(text: str, width: int) -> list[str]:
    """``text`` wrapped to ``width`` as click wraps an option's help (its
    paragraphs, split by blank lines, each filled), except that a word longer
    than the column (an environment variable's name) is never cut in two: it
    overflows."""
    wrapper = textwrap.TextWrapper(width, replace_whitespace=False, break_long_words=False)
    paragraphs = [" ".join(line.strip() for line in p.splitlines()) for p in text.split("\n\n")]
    lines: list[str] = []
    for paragraph in paragraphs:
        if lines:
            lines.append("")
        lines.extend(wrapper.wrap(paragraph.expandtabs()))
    return lines


class _HelpFormatter(click.HelpFormatter):
    def write_dl(
        self, rows: Iterable[tuple[str, str]], col_max: int = 30, col_spacing: int = 2
    ) -> None:
        """click's definition list (options and commands), wrapped by :func:`_wrap`."""
        rows = list(rows)
        first_col = min(max((_width(first) for first, _ in rows), default=0), col_max)
        first_col += col_spacing
        for first, second in rows:
            self.write(f"{'':>{self.current_indent}}{first}")
            if not second:
                self.write("\n")
                continue
            if _width(first) <= first_col - col_spacing:
                self.write(" " * (first_col - _width(first)))
            else:
                self.write("\n")
                self.write(" " * (first_col + self.current_indent))
            lines = _wrap(second, max(self.width - first_col - 2, 10))
            if not lines:
                self.write("\n")
                continue
            self.write(f"{lines[0]}\n")
            for line in lines[1:]:
                self.write(f"{'':>{first_col + self.current_indent}}{line}\n")


class _Context(click.Context):
    formatter_class = _HelpFormatter


class _Group(click.Group):
    context_class = _Context


class _Command(click.Command):
    context_class = _Context


_Group.command_class = _Command


@click.group(
    cls=_Group,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
)
@click.version_option(__version__, prog_name="plasma-trio")
def cli() -> None:
    """plasma-trio: event push middleware (SSE and gRPC fan-out of Redis or HTTP events)."""


@cli.command()
@_options
def serve(**values: Any) -> None:
    """Run the server. Every option also reads its PLASMA_* environment variable."""
    config = Config(**values)
    try:
        config.validate()
    except ConfigError as exc:
        _config_exit(exc)
    _run(config)


@cli.command()
@click.option(
    "--channel", help="Redis channel [default: the first of PLASMA_SUBSCRIBER_REDIS_CHANNELS]."
)
@click.option(
    "--stream",
    help="Append to this Redis stream (XADD) [default in redis-streams mode: the first of"
    " PLASMA_SUBSCRIBER_REDIS_STREAMS].",
)
@click.option(
    "--url", help="Post to this server's /publish instead of Redis (e.g. http://host:8080)."
)
@click.option(
    "--token",
    envvar="PLASMA_PUBLISH_TOKEN",
    help="Bearer token for --url [env: PLASMA_PUBLISH_TOKEN].",
)
@click.argument("event_type", metavar="TYPE")
@click.argument("data_json", metavar="JSON")
@partial(_options, only=_PUBLISH_SETTINGS)
def publish(
    channel: str | None,
    stream: str | None,
    url: str | None,
    token: str | None,
    event_type: str,
    data_json: str,
    **values: Any,
) -> None:
    """Publish one event: TYPE (e.g. program:1234:views) with JSON data.

    Publishes to Redis with the same PLASMA_SUBSCRIBER_REDIS_* settings as the
    server (a channel; in redis-streams mode, or with --stream, a stream:
    the new entry id is printed), or with --url to a server's POST /publish.
    Exit status 0 on success; 2 for an invalid event; 1 when the target is
    unreachable or refuses.
    """
    from plasma_trio.publisher import PublishError, RedisPublisher, build_event, publish_http
    from plasma_trio.redis_connect import RedisTarget

    try:
        event = build_event(event_type, data_json=data_json)
        if len(event.to_wire()) > values["max_event_bytes"]:
            raise PublishError(f"event exceeds {values['max_event_bytes']} bytes", invalid=True)
    except PublishError as exc:
        click.echo(f"plasma-trio: invalid event: {exc}", err=True)
        sys.exit(EXIT_CONFIG)

    async def send() -> str:
        if url:
            await publish_http(url, token or "", event_type, data_json=data_json)
            return f"published to {url}"
        redis = RedisTarget.from_config(Config(**values).validate_redis())
        addr = redis.describe()
        if stream or (not channel and values["subscriber_type"] == "redis-streams"):
            key = stream or next(iter(values["subscriber_redis_streams"]), None)
            if not key:
                raise PublishError(
                    "no stream: pass --stream or set PLASMA_SUBSCRIBER_REDIS_STREAMS"
                )
            maxlen = values["subscriber_redis_stream_maxlen"]
            async with RedisPublisher(
                stream=key, maxlen=maxlen, target=redis, timeout=redis.timeout
            ) as publisher:
                entry_id = await publisher.append(event_type, data_json=data_json)
            return f"published to {addr} stream {key} (id {entry_id})"
        target = channel or next(iter(values["subscriber_redis_channels"]), None)
        if not target:
            raise PublishError("no channel: pass --channel or set PLASMA_SUBSCRIBER_REDIS_CHANNELS")
        async with RedisPublisher(channel=target, target=redis, timeout=redis.timeout) as publisher:
            receivers = await publisher.publish(event_type, data_json=data_json)
        return f"published to {addr} channel {target} ({receivers} receivers)"

    try:
        click.echo(trio.run(send))
    except ConfigError as exc:
        _config_exit(exc)
    except PublishError as exc:
        click.echo(f"plasma-trio: {exc}", err=True)
        sys.exit(EXIT_CONFIG if exc.invalid else EXIT_FAILURE)
    except ValueError as exc:
        click.echo(f"plasma-trio: {exc}", err=True)
        sys.exit(EXIT_CONFIG)


def _run(config: Config) -> None:
    from plasma_trio import logs
    from plasma_trio.app import serve as serve_app

    try:
        logs.configure(config)
    except ConfigError as exc:
        _config_exit(exc)
    from plasma_trio.app import supervise
    from plasma_trio.workers import WorkerLink, worker_count

    link = WorkerLink.from_env()
    try:
        if link is None and worker_count(config) > 1:
            status = trio.run(supervise, config)
            if status:
                sys.exit(status)
            return
        gc_tuning.tune()
        trio.run(partial(serve_app, config, handle_signals=True, worker=link))
    except* ConfigError as group:
        _config_exit(_first_config_error(group))
    except* PlasmaError as group:
        for failure in _leaves(group):
            logs.ERROR.critical("fatal: %s", failure)
            _tell(config, f"plasma-trio: fatal: {failure}")
        sys.exit(EXIT_FAILURE)
    except* Exception as group:
        logs.ERROR.critical("fatal: unexpected error", exc_info=group)
        for unexpected in _leaves(group):
            _tell(config, f"plasma-trio: fatal: {unexpected!r}")
        sys.exit(EXIT_FAILURE)


def _tell(config: Config, line: str) -> None:
    """Say why the server stopped on stderr, unless the error log (JSON) is
    already there: stderr then stays one JSON object per line."""
    if config.error_log_out != "stderr":
        click.echo(line, err=True)


def _leaves(group: BaseExceptionGroup[E]) -> list[E]:
    """The individual exceptions of a (nested) group, in order."""
    out: list[E] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            out.extend(_leaves(exc))
        else:
            out.append(exc)
    return out


def _first_config_error(group: BaseExceptionGroup[ConfigError]) -> ConfigError:
    return _leaves(group)[0]


def _config_exit(exc: ConfigError) -> NoReturn:
    click.echo(f"plasma-trio: configuration error: {exc}", err=True)
    sys.exit(EXIT_CONFIG)


def _bad_parameter_line(exc: click.BadParameter) -> str:
    """One line naming the environment variable (or option) and the problem."""
    param = exc.param
    message = exc.format_message().splitlines()[0] if exc.message else "invalid value"
    if isinstance(param, click.Option):
        envs = (
            param.envvar
            if isinstance(param.envvar, list)
            else [param.envvar]
            if param.envvar
            else []
        )
        ctx = exc.ctx
        source = ctx.get_parameter_source(param.name) if ctx and param.name else None
        used_env = next((e for e in envs if e and e in os.environ), None)
        flag = param.opts[0]
        if source is not click.core.ParameterSource.COMMANDLINE and used_env:
            return f"{used_env}: {exc.message} (option {flag})"
        return f"{flag}: {exc.message} (env {envs[0] if envs else '-'})"
    return message


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point; ``argv`` defaults to ``sys.argv[1:]``."""
    try:
        cli.main(
            args=list(argv) if argv is not None else None,
            prog_name="plasma-trio",
            standalone_mode=False,
        )
    except click.BadParameter as exc:
        click.echo(f"plasma-trio: configuration error: {_bad_parameter_line(exc)}", err=True)
        sys.exit(EXIT_CONFIG)
    except click.ClickException as exc:
        click.echo(f"plasma-trio: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.Abort:
        sys.exit(EXIT_FAILURE)
