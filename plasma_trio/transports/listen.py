"""Listening sockets, bound before anything serves.

Both servers get a socket bound here, so that a port in use (or any bind
error) is a :class:`ConfigError` naming its variable, reported before the
process serves anything, and so that port 0 means one ephemeral port for
IPv4 and IPv6 alike (asyncio's own binding would pick one port per family).
"""

from __future__ import annotations

import socket

from plasma_trio.errors import ConfigError

__all__ = ["bind", "stream_options"]


def bind(
    port: int, variable: str, *, host: str = "", backlog: int = 4096, reuse_port: bool = False
) -> socket.socket:
    """Listen on ``port`` on ``host`` (default: every interface, dual-stack when available).

    ``reuse_port``: share the port with the other workers of ``serve
    --workers`` (``SO_REUSEPORT``: the kernel spreads new connections).

    Raises:
        ConfigError: naming ``variable`` when the port cannot be bound.
    """
    try:
        if host and host not in ("0.0.0.0", "::"):
            sock = socket.create_server((host, port), backlog=backlog, reuse_port=reuse_port)
        elif socket.has_dualstack_ipv6():
            sock = socket.create_server(
                ("", port),
                family=socket.AF_INET6,
                dualstack_ipv6=True,
                backlog=backlog,
                reuse_port=reuse_port,
            )
        else:
            sock = socket.create_server(("", port), backlog=backlog, reuse_port=reuse_port)
    except OSError as exc:
        raise ConfigError(
            variable, f"cannot listen on port {port}: {exc.strerror or exc}"
        ) from None
    sock.setblocking(False)
    return sock


# (Linux's value: the socket module names it from Python 3.12 on.)
TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)
NOTSENT_LOWAT = 16 * 1024  # trio's SocketStream's


def stream_options(sock: socket.socket) -> None:
    """What trio's SocketStream sets on each connection, set once on a
    listener (Linux's accepted sockets inherit both): no Nagle delay, and at
    most 16 KiB unsent in the kernel, so that a client that stops reading
    leaves its events in the session's queue, where its bounds count them."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, NOTSENT_LOWAT)
