"""Containment: one connection's failure never leaves that connection.

Every per-connection task of every port runs under :meth:`ConnectionGuard.run`
(the main port with or without TLS, the metrics and diagnostics ports: see
:mod:`plasma_trio.transports.frontdoor`), and the gRPC server reports the
failures of its asyncio-side connections through :meth:`ConnectionGuard.record`
(:mod:`plasma_trio.transports.grpc`). Whatever a connection's handler raises
(one exception or an exception group from the nurseries of the HTTP stack
below it) is

* classified: ordinary client misbehaviour (resets, broken pipes, TLS or
  HTTP protocol errors, a peer that went away while the server was
  answering) or an internal error (anything else: a bug, ours or a
  library's);
* logged as one JSON line: ``debug`` for client misbehaviour (a server in
  front of thousands of flaky mobile networks sees it all day), ``warn`` with
  the traceback for an internal error;
* counted, by port and kind (``plasma_connection_errors_total``);
* and the connection is closed.

It also counts the connections each port drops before their request head
(``plasma_connections_dropped_total``, SPEC 10): ``head_timeout`` (no
complete head, TLS handshake included, within ``PLASMA_HEADER_TIMEOUT``)
and ``head_limit`` (the slowest of 1,024 waiting, dropped to make room once
it has waited :data:`~plasma_trio.transports.heads.SLOW_HEAD`).

It never reaches the root nursery, which stays for the failures of the
server itself (a listener that cannot accept, the source giving up).
Cancellation is not a failure: ``Cancelled`` passes through untouched
(``except*`` splits it off a mixed group).
"""

from __future__ import annotations

import ssl
from collections import Counter
from typing import TYPE_CHECKING, Final, Literal

import h2.exceptions
import h11
import trio

from plasma_trio.logs import ERROR

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

__all__ = ["CLIENT_ERRORS", "DROPS", "PORTS", "ConnectionGuard", "Drop", "Kind", "classify"]

Kind = Literal["client", "internal"]
# Why a connection was dropped before its request head (see the module docstring).
Drop = Literal["head_timeout", "head_limit"]
DROPS: Final[tuple[Drop, ...]] = ("head_timeout", "head_limit")

# The ports whose connections are guarded, as the metrics label them.
PORTS: Final = ("main", "grpc", "metrics", "pprof")

# What a misbehaving or vanished client makes the stack raise. Not here:
# trio.BusyResourceError, two tasks of the server writing one stream at once,
# which is a bug of the stack whatever the client did (Hypercorn 0.18 had one:
# see PrefixedStream.send_eof); it is contained too, but logged with its
# traceback and counted as internal.
CLIENT_ERRORS: Final[tuple[type[BaseException], ...]] = (
    OSError,  # resets, broken pipes, timeouts of the socket (ssl.SSLError is one too)
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.TooSlowError,
    EOFError,
    h11.ProtocolError,
    h2.exceptions.ProtocolError,
    ssl.SSLError,
    UnicodeDecodeError,
)

_log = ERROR.getChild("connections")


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def classify(exc: BaseException) -> Kind:
    """``client`` when every exception in ``exc`` (a group is flattened) is one
    that client behaviour explains, else ``internal``."""
    return "client" if all(isinstance(e, CLIENT_ERRORS) for e in _leaves(exc)) else "internal"


def _summary(exc: BaseException) -> str:
    leaves = _leaves(exc)
    first = leaves[0]
    text = f"{type(first).__name__}: {first}" if str(first) else type(first).__name__
    return text if len(leaves) == 1 else f"{text} (and {len(leaves) - 1} more)"


class ConnectionGuard:
    """Logs, counts and closes what one connection's handler raises. One per server."""

    def __init__(self) -> None:
        self._counts: Counter[tuple[str, Kind]] = Counter()
        self._drops: Counter[tuple[str, Drop]] = Counter()

    def dropped(self, port: str, reason: Drop) -> None:
        """Count one connection ``port`` dropped before its request head."""
        self._drops[port, reason] += 1

    def drops(self) -> dict[tuple[str, str], int]:
        """Connections dropped before their head, by (port, reason), every pair present."""
        return {(port, reason): self._drops[port, reason] for port in PORTS for reason in DROPS}

    def record(self, port: str, exc: BaseException, *, peer: str = "") -> Kind:
        """Log and count one contained connection failure; returns its kind."""
        kind = classify(exc)
        self._counts[port, kind] += 1
        extra = {"port": port, "peer": peer, "kind": kind, "error": _summary(exc)}
        if kind == "client":
            _log.debug("connection failed (client)", extra=extra)
        else:
            _log.warning("connection failed (internal error)", extra=extra, exc_info=exc)
        return kind

    async def run(
        self,
        port: str,
        handler: Callable[[], Awaitable[object]],
        sock: trio.socket.SocketType,
        peer: str,
    ) -> None:
        """Serve one connection with ``handler``; contain what it raises
        (and close ``sock``, the connection's socket, then)."""
        try:
            await handler()
        except* Exception as group:
            self.record(port, group, peer=peer)
            sock.close()  # (a TLS stream above it is gone either way)

    def statistics(self) -> dict[tuple[str, str], int]:
        """Contained failures so far, by (port, kind), every pair present."""
        return {
            (port, kind): self._counts[port, kind]
            for port in PORTS
            for kind in ("client", "internal")
        }
