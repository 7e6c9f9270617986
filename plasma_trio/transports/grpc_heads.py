"""The gRPC port's bound on connections that have not sent their "request
head" yet (TLS handshake, HTTP/2 preface and SETTINGS): see :class:`GrpcHeads`."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from plasma_trio.transports.heads import MAX_PENDING_HEADS, SLOW_HEAD

if TYPE_CHECKING:
    from plasma_trio.transports.guard import ConnectionGuard

__all__ = ["GrpcHeads"]


class GrpcHeads:
    """The gRPC port's bound on connections that have not completed their
    TLS handshake and sent their HTTP/2 preface and SETTINGS (a gRPC
    connection's "request head", as grpc-go's ConnectionTimeout sees it):
    each gets ``PLASMA_HEADER_TIMEOUT`` from its accept. Beyond
    MAX_PENDING_HEADS waiting, the ones waiting longest are dropped once they
    are slow themselves (have waited SLOW_HEAD, as on the HTTP ports, where
    the newer ones wait in the backlog meanwhile; asyncio accepts on its
    own, so here they wait accepted), or at once beyond four times the bound.
    Keys are the protocols waiting (grpc_server's ``_TlsAccept`` during the
    handshake, then the connection's ``_Protocol``), each with its transport,
    aborted when dropped or late.
    """

    def __init__(self, timeout: float, guard: ConnectionGuard) -> None:
        self.timeout = timeout
        self.grace = min(SLOW_HEAD, timeout / 2)
        self.guard = guard  # counts the drops (plasma_connections_dropped_total)
        # In arrival order: the transport to abort, and the timer that does.
        self.waiting: dict[object, tuple[asyncio.BaseTransport, asyncio.TimerHandle]] = {}
        self.trimming: asyncio.TimerHandle | None = None

    def admit(self, key: object, transport: asyncio.BaseTransport, accepted: float) -> None:
        loop = asyncio.get_running_loop()
        timer = loop.call_at(accepted + self.timeout, self._expire, key)
        self.waiting[key] = (transport, timer)
        if len(self.waiting) > MAX_PENDING_HEADS:
            self._trim()

    def _trim(self) -> None:
        """Beyond the bound: drop the oldest while they are slow (or while
        over four times the bound); else look again when the oldest will be."""
        loop = asyncio.get_running_loop()
        self.trimming = None
        while len(self.waiting) > MAX_PENDING_HEADS:
            oldest = next(iter(self.waiting))
            transport, timer = self.waiting[oldest]
            since = timer.when() - self.timeout
            if len(self.waiting) <= 4 * MAX_PENDING_HEADS and loop.time() - since < self.grace:
                self.trimming = loop.call_at(since + self.grace, self._trim)
                return
            transport.abort()  # type: ignore[attr-defined]
            self.done(oldest)
            self.guard.dropped("grpc", "head_limit")

    def _expire(self, key: object) -> None:
        waiting = self.waiting.pop(key, None)
        if waiting is not None:
            waiting[0].abort()  # type: ignore[attr-defined]
            self.guard.dropped("grpc", "head_timeout")

    def done(self, key: object) -> None:
        waiting = self.waiting.pop(key, None)
        if waiting is not None:
            waiting[1].cancel()
        if self.trimming is not None and len(self.waiting) <= MAX_PENDING_HEADS:
            self.trimming.cancel()
            self.trimming = None
