"""Accepting an HTTP port's connections: in batches, and never faster than
the process can take them (SPEC 8, "Connection storms" and "Descriptors").

One task per port calls ``accept`` on the non-blocking listening socket
until the kernel has no more connections or :data:`BATCH` are taken, starts
each connection's task, and then waits for the socket again. Waiting is a
trip through trio's scheduler, so the connections just accepted run (and
read their heads) before the next batch is accepted: a storm is taken at the
pace the process serves it, and the connects it cannot take yet wait in the
kernel's listen backlog (``PLASMA_LISTEN_BACKLOG``) instead of being
accepted and then dropped.

It stops accepting while

* the port's connections waiting for their heads are at their bound
  (:meth:`~plasma_trio.transports.heads.Waiting.wait_room`: until one
  leaves, or the slowest is slow enough to drop), and
* on the subscriber-facing ports, the descriptors are down to the
  server's own reserve (:attr:`~plasma_trio.descriptors.Descriptors.accept_room`;
  the metrics port accepts until the limit itself).

When ``accept`` fails for want of descriptors (EMFILE, ENFILE) or kernel
memory, the warning line is logged (at most every 10 s) and accepting waits
for a descriptor to be released, at most 0.1 s: no error per connect.

Every accepted socket is counted in the process's descriptor budget until
the connection's task closes it.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any, Final

import trio

if TYPE_CHECKING:
    import socket
    from collections.abc import Awaitable, Callable

    from plasma_trio.descriptors import Descriptors
    from plasma_trio.transports.heads import Waiting

__all__ = ["BATCH", "serve_accepts"]

# Connections accepted per wake-up at most (then the scheduler runs them).
BATCH: Final = 64

# accept() failures that mean "not now" for the whole port.
_EXHAUSTED: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


async def serve_accepts(
    listener: socket.socket,
    handle: Callable[[socket.socket, Any], Awaitable[object]],
    nursery: trio.Nursery,
    *,
    waiting: Waiting,
    descriptors: Descriptors,
    keep_reserve: bool,
) -> None:
    """Accept ``listener``'s connections for ever (cancel to stop), each
    served by ``handle(sock, address)`` in ``nursery`` (which must call
    ``waiting.started()`` before its first wait; ``waiting.clock`` must
    run beside); ``keep_reserve``: stop at the descriptor reserve (see the
    module docstring)."""
    listener.setblocking(False)
    accept = listener.accept
    while True:
        # A connection first: a slow one is dropped to make room only for another.
        await trio.lowlevel.wait_readable(listener)
        if waiting.full:
            await waiting.wait_room()
        if keep_reserve and not descriptors.accept_room:
            descriptors.warn()
            with trio.move_on_after(0.1):
                await descriptors.wait_released()
            continue
        for _ in range(BATCH):
            try:
                sock, address = accept()
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno in _EXHAUSTED:
                    descriptors.warn(exhausted=True)
                    with trio.move_on_after(0.1):
                        await descriptors.wait_released()
                    break
                # The client left before its connection was accepted (ECONNABORTED,
                # EPROTO...): that connection's affair, not the port's.
                continue
            descriptors.opened()
            waiting.accepted()
            nursery.start_soon(handle, sock, address)
            if waiting.full or (keep_reserve and not descriptors.accept_room):
                break
