"""Error and access logs as JSON lines (plasma's ``PLASMA_ERROR_LOG_*`` /
``PLASMA_ACCESS_LOG_*``), on the standard library with python-json-logger.

* ``plasma_trio`` (and its children, e.g. ``plasma_trio.http`` for the HTTP
  server's own messages) is the error log.
* ``plasma_trio.access`` is the access log: one entry per finished stream,
  with its fields as JSON members. Nothing is logged per event.
* Everything else that logs in the process (grpclib, coredis, h2, hypercorn,
  trio-asyncio, asyncio), Python warnings and exceptions nobody could raise
  (``sys.unraisablehook``, ``threading.excepthook``) goes through the error
  log's handler and level too: every line the server writes is one JSON
  object, whatever wrote it.

Levels are plasma's names: ``panic`` and ``fatal`` map to CRITICAL, ``warn``
to WARNING. Out is ``stdout``, ``stderr``, ``discard`` or a file path
(appended to).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import IO, TYPE_CHECKING

from pythonjsonlogger.json import JsonFormatter

from plasma_trio.errors import ConfigError

if TYPE_CHECKING:
    from plasma_trio.config import Config

__all__ = ["ACCESS", "ERROR", "configure", "level_of", "log_sse_stream"]

ERROR = logging.getLogger("plasma_trio")
ACCESS = logging.getLogger("plasma_trio.access")

_LEVELS = {
    "panic": logging.CRITICAL,
    "fatal": logging.CRITICAL,
    "error": logging.ERROR,
    "warn": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
}


def level_of(name: str) -> int:
    return _LEVELS[name.lower()]


def _handler(out: str, variable: str) -> logging.Handler:
    if out == "discard":
        return logging.NullHandler()
    stream: IO[str]
    if out == "stdout":
        stream = sys.stdout
    elif out == "stderr":
        stream = sys.stderr
    else:
        try:
            return logging.FileHandler(out, mode="a", encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                variable, f"cannot open {out!r} for appending: {exc.strerror or exc}"
            ) from None
    return logging.StreamHandler(stream)


def _formatter() -> logging.Formatter:
    return JsonFormatter(
        "{levelname}{name}{message}",
        style="{",
        rename_fields={"levelname": "level", "name": "logger", "message": "msg"},
        timestamp="time",
    )


def _install(logger: logging.Logger, out: str, level: str, variable: str) -> logging.Handler:
    handler = _handler(out, variable)
    for old in list(logger.handlers):
        logger.removeHandler(old)
        old.close()
    handler.setFormatter(_formatter())
    logger.addHandler(handler)
    logger.setLevel(level_of(level))
    logger.propagate = False
    return handler


_OURS = "_plasma_trio"  # marks the handler we put on the root logger

# Loggers whose debug output carries request headers verbatim (hpack logs
# every header block it encodes or decodes: Authorization, cookies, gRPC
# metadata): held at INFO even when the error log is at debug, so that no
# level ever writes a token (and so that debug does not cost a log call per
# header).
_NEVER_DEBUG = ("hpack",)


def _install_root(handler: logging.Handler, level: str) -> None:
    """Every other logger propagates to the root: give it the error log's handler."""
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, _OURS, False):
            root.removeHandler(old)  # from an earlier configure()
    shared = _Shared(handler)
    setattr(shared, _OURS, True)
    root.addHandler(shared)
    root.setLevel(level_of(level))
    for name in _NEVER_DEBUG:
        logging.getLogger(name).setLevel(max(logging.INFO, level_of(level)))
    logging.captureWarnings(True)  # warnings.warn -> the "py.warnings" logger
    sys.unraisablehook = _unraisable
    threading.excepthook = _thread_exception


class _Shared(logging.Handler):
    """The error log's handler, reached from the root logger (not closed twice)."""

    def __init__(self, target: logging.Handler) -> None:
        super().__init__()
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        self.target.handle(record)


def _unraisable(unraisable: sys.UnraisableHookArgs) -> None:
    exc = unraisable.exc_value
    ERROR.getChild("unraisable").error(
        "exception ignored in %r: %s",
        unraisable.object,
        unraisable.err_msg or "",
        exc_info=(type(exc), exc, unraisable.exc_traceback) if exc is not None else None,
    )


def _thread_exception(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    ERROR.getChild("thread").error(
        "exception in thread %s",
        args.thread.name if args.thread is not None else "?",
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback)
        if args.exc_value is not None
        else None,
    )


def log_sse_stream(
    *,
    remote_addr: str,
    user_agent: str,
    topics: frozenset[str],
    started: float,
    events: int,
    ending: str,
    subject: str | None = None,
) -> None:
    """The access entry of one finished SSE stream (either SSE path);
    ``subject``: the ``sub`` of its token (access control; never the token)."""
    ACCESS.info(
        "sse stream ended",
        extra={
            "transport": "sse",
            "status": 200,
            "remote_addr": remote_addr,
            "user_agent": user_agent,
            "topics": sorted(topics),
            "duration": round(time.monotonic() - started, 6),
            "events": events,
            "ending": ending,
            **({"subject": subject} if subject is not None else {}),
        },
    )


def configure(config: Config) -> None:
    """Point both logs where the configuration says. Safe to call again.

    Raises:
        ConfigError: a log file cannot be opened for appending.
    """
    errors = _install(ERROR, config.error_log_out, config.error_log_level, "PLASMA_ERROR_LOG_OUT")
    _install(ACCESS, config.access_log_out, config.access_log_level, "PLASMA_ACCESS_LOG_OUT")
    _install_root(errors, config.error_log_level)
