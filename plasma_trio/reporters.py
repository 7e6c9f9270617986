"""Periodic metrics reports (``PLASMA_METRICS_TYPE=log|syslog``), as plasma did.

Every ``PLASMA_METRICS_LOG_INTERVAL`` (log) or ``PLASMA_METRICS_SYSLOG_INTERVAL``
(syslog) one line carries the JSON of ``/metrics/plasma`` merged with
``/metrics/python`` (figures are read live at each report, so
``PLASMA_METRICS_INTERVAL`` is accepted for compatibility only).

* ``log``: written to ``PLASMA_METRICS_LOG_OUT`` in Go's ``log`` format:
  ``PLASMA_METRICS_LOG_PREFIX`` then the date/time the Go flags of
  ``PLASMA_METRICS_LOG_FLAG`` ask for (Ldate 1, Ltime 2, Lmicroseconds 4,
  LUTC 32, Lmsgprefix 64; the file-name flags have no Python meaning).
* ``syslog``: RFC 3164 messages tagged ``PLASMA_METRICS_SYSLOG_TAG[pid]:`` with
  ``..._FACILITY`` and ``..._SEVERITY``, over ``..._NETWORK`` (udp, tcp,
  unix, unixgram; empty: the local ``/dev/log``) to ``..._ADDR``.
"""

from __future__ import annotations

import json
import logging.handlers
import os
import socket
import sys
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from plasma_trio.config import Config
    from plasma_trio.metrics import Figures

__all__ = ["format_go_log", "make_syslog_handler", "run_reporter"]

LDATE, LTIME, LMICROSECONDS, LUTC, LMSGPREFIX = 1, 2, 4, 32, 64


def format_go_log(message: str, *, prefix: str, flags: int, now: float) -> str:
    """One line as Go's ``log.Logger`` writes it."""
    moment = datetime.fromtimestamp(now, tz=UTC if flags & LUTC else None)
    stamp = ""
    if flags & LDATE:
        stamp += moment.strftime("%Y/%m/%d ")
    if flags & (LTIME | LMICROSECONDS):
        stamp += moment.strftime("%H:%M:%S")
        if flags & LMICROSECONDS:
            stamp += f".{moment.microsecond:06d}"
        stamp += " "
    if flags & LMSGPREFIX:
        return f"{stamp}{prefix}{message}\n"
    return f"{prefix}{stamp}{message}\n"


class _SyslogHandler(logging.handlers.SysLogHandler):
    def __init__(self, severity: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.severity = severity

    def mapPriority(self, levelName: str) -> str:
        # The configured severity, whatever the record's level.
        return {v: k for k, v in self.priority_names.items()}[self.severity]


def make_syslog_handler(config: Config) -> logging.handlers.SysLogHandler:
    network, addr = config.metrics_syslog_network, config.metrics_syslog_addr
    address: str | tuple[str, int]
    socktype = socket.SOCK_DGRAM
    if network in ("udp", "tcp"):
        host, _, port = addr.rpartition(":")
        address = (host.strip("[]") or "localhost", int(port or 514))
        socktype = socket.SOCK_STREAM if network == "tcp" else socket.SOCK_DGRAM
    elif network in ("unix", "unixgram"):
        address = addr or "/dev/log"
        socktype = socket.SOCK_STREAM if network == "unix" else socket.SOCK_DGRAM
    else:
        address = "/dev/log"
    handler = _SyslogHandler(
        config.metrics_syslog_severity,
        address=address,
        facility=config.metrics_syslog_facility,
        socktype=socktype,
    )
    handler.ident = f"{config.metrics_syslog_tag}[{os.getpid()}]: "
    handler.append_nul = False
    return handler


def _figures(figures: Figures) -> str:
    return json.dumps({**figures.plasma(), **figures.runtime()}, separators=(",", ":"))


async def run_reporter(config: Config, figures: Figures) -> None:
    """Report every interval until cancelled."""
    if config.metrics_type == "log":
        if config.metrics_log_out in ("stdout", "stderr"):
            out = trio.wrap_file(sys.stdout if config.metrics_log_out == "stdout" else sys.stderr)
            close = False
        else:
            out = await trio.open_file(config.metrics_log_out, "a", encoding="utf-8")
            close = True
        try:
            while True:
                await trio.sleep(config.metrics_log_interval)
                line = format_go_log(
                    _figures(figures),
                    prefix=config.metrics_log_prefix,
                    flags=config.metrics_log_flag,
                    now=time.time(),
                )
                await out.write(line)
                await out.flush()
        finally:
            if close:
                with trio.CancelScope(shield=True):
                    await out.aclose()
    else:
        handler = await trio.to_thread.run_sync(make_syslog_handler, config)
        try:
            while True:
                await trio.sleep(config.metrics_syslog_interval)
                record = logging.LogRecord(
                    "plasma_trio.metrics",
                    logging.INFO,
                    __file__,
                    0,
                    _figures(figures),
                    None,
                    None,
                )
                # A blocking send (TCP, a full socket): keep it off the event loop.
                await trio.to_thread.run_sync(handler.emit, record)
        finally:
            handler.close()
