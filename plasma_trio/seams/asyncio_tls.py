"""asyncio's TLS protocol, with a smaller read buffer for our connections only.

asyncio's ``SSLProtocol`` allocates its read buffer (``max_size``, 256 KiB)
for every connection up front, handshake pending or not, and
``loop.start_tls`` offers no way to choose it. gRPC subscribers read little
(Requests, PINGs, window updates), so the gRPC port's connections are
upgraded by :func:`start_tls` here: ``loop.start_tls`` (CPython 3.11-3.13),
except that the protocol is a subclass of ``SSLProtocol`` whose ``max_size``
is the one asked for. Nothing else in the process (another asyncio TLS user)
is affected. What it touches:

``asyncio.sslproto.SSLProtocol`` (undocumented module) and its class
attribute ``max_size``
    subclassed, ``max_size`` set on the subclass; its ``__init__`` parameters
    ``loop, app_protocol, sslcontext, waiter, server_side, server_hostname,
    call_connection_made, ssl_handshake_timeout, ssl_shutdown_timeout``.
``SSLProtocol._app_transport``
    the TLS transport ``start_tls`` returns once the handshake is done.
``SSLProtocol.__init__`` allocating ``bytearray(self.max_size)``
    checked by :func:`check` (a subclass's ``max_size`` must size the buffer),
    on a sample whose ``_SSLProtocolTransport._closed`` is set so that it is
    collected without a warning.

The running loop is trio-asyncio's (a ``SelectorEventLoop``): its
transports have ``set_protocol``, ``pause_reading`` and ``resume_reading``.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import functools
import platform
import ssl
from typing import Any

from plasma_trio.seams.base import Requirement, verify

__all__ = ["check", "requirements", "start_tls", "tls_protocol_class"]


@functools.cache
def tls_protocol_class(max_size: int) -> type[asyncio.sslproto.SSLProtocol]:
    """``SSLProtocol`` reading at most ``max_size`` bytes at a time (its buffer)."""
    return type(
        f"SSLProtocol{max_size}",
        (asyncio.sslproto.SSLProtocol,),
        {"max_size": max_size, "__module__": __name__},
    )


async def start_tls(
    transport: asyncio.Transport,
    protocol: asyncio.BaseProtocol,
    context: ssl.SSLContext,
    *,
    read_buffer: int,
    ssl_handshake_timeout: float,
) -> asyncio.Transport:
    """``loop.start_tls(transport, protocol, context, server_side=True, ...)``
    with a TLS read buffer of ``read_buffer`` bytes for this connection."""
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()
    tls = tls_protocol_class(read_buffer)(
        loop,
        protocol,
        context,
        waiter,
        server_side=True,
        server_hostname=None,
        # (typeshed says int; asyncio takes any positive number of seconds)
        ssl_handshake_timeout=ssl_handshake_timeout,  # type: ignore[arg-type]
        call_connection_made=False,
    )
    # Paused so that tls.data_received cannot run before tls.connection_made.
    transport.pause_reading()
    transport.set_protocol(tls)
    made = loop.call_soon(tls.connection_made, transport)
    resumed = loop.call_soon(transport.resume_reading)
    try:
        await waiter
    except BaseException:
        transport.close()
        made.cancel()
        resumed.cancel()
        raise
    app_transport: asyncio.Transport = tls._app_transport
    return app_transport


def _buffer_follows_max_size() -> str | None:
    """A subclass's ``max_size`` sizes the read buffer it allocates."""
    build: Any = tls_protocol_class(4096)
    sample = build(
        None,  # (no loop, no waiter: the sample never runs)
        asyncio.Protocol(),
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER),
        None,
        server_side=True,
        call_connection_made=False,
    )
    size = len(sample.get_buffer(-1))
    # Its TLS transport (made by __init__) would warn, unclosed, when collected.
    sample._app_transport._closed = True
    if size != 4096:
        return (
            "asyncio.sslproto.SSLProtocol no longer sizes its read buffer by"
            f" max_size (a buffer of {size} bytes for max_size 4096)"
        )
    return None


def requirements() -> list[Requirement]:
    """What this module relies on (see the module docstring)."""
    protocol = getattr(asyncio.sslproto, "SSLProtocol", None)
    if protocol is None:
        return [Requirement(asyncio.sslproto, "SSLProtocol")]
    return [
        Requirement(asyncio.sslproto, "SSLProtocol"),
        Requirement(protocol, "max_size"),
        Requirement(
            protocol,
            "__init__",
            params=(
                "loop",
                "app_protocol",
                "sslcontext",
                "waiter",
                "server_side",
                "server_hostname",
                "call_connection_made",
                "ssl_handshake_timeout",
            ),
        ),
        Requirement(protocol, "_app_transport", assigned_in="__init__"),
    ]


def check() -> None:
    """Raise :class:`~plasma_trio.seams.SeamBroken` if asyncio lacks any of it."""
    verify(
        "Python asyncio",
        requirements(),
        [_buffer_follows_max_size],
        version=platform.python_version(),
    )
