"""The parsers and the record behind every ``PLASMA_*`` setting.

:mod:`plasma_trio.config` declares each setting once as a field of
``Config``; this module holds what a declaration is made of: the click
parameter types (Go-style durations, comma lists, bounded integers, plasma's
log levels), the :class:`Setting` record in each field's metadata, and how a
default is shown to a user.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import click

from plasma_trio.core.durations import format_duration, parse_duration

__all__ = [
    "COUNT",
    "DURATION",
    "LEVEL",
    "LOG_LEVELS",
    "PORT",
    "POSITIVE",
    "DurationType",
    "IntType",
    "ListType",
    "Setting",
    "describe_default",
    "setting",
    "split_host_port",
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


def setting(
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


def describe_default(setting: Setting) -> str:
    """The default as a user would write it (for --help and the README)."""
    value = setting.cli_default
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and isinstance(setting.type, DurationType):
        return format_duration(value)
    return str(value)


def split_host_port(addr: str) -> tuple[str, int]:
    """``host:port`` (IPv6 in brackets; an empty host is localhost)."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{addr!r} is not host:port")
    host = host.strip("[]") or "localhost"
    return host, int(port)
