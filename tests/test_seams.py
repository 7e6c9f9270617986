"""Each library's internals behind one seam (``plasma_trio/seams``).

For every seam: ``check()`` passes on the installed versions, and taking
away any one thing it relies on (an attribute deleted from its class, an
instance attribute no longer set, a method whose parameters changed) makes
``check()`` raise ``SeamBroken`` naming it. Then the seams' own code paths,
on the real libraries: a truncated gRPC message, the per-connection TLS
read buffer.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import ssl
from typing import Any

import pytest
import trustme

from plasma_trio.seams import (
    Requirement,
    SeamBroken,
    asyncio_tls,
    check_all,
    grpclib,
    h2,
    hypercorn,
)

SEAMS = [grpclib, h2, hypercorn, asyncio_tls]


def _name(seam: Any) -> str:
    return str(seam.__name__).rsplit(".", 1)[1]


@pytest.mark.parametrize("seam", SEAMS, ids=_name)
def test_check_passes_on_the_installed_versions(seam: Any) -> None:
    seam.check()


def test_check_all_passes() -> None:
    check_all()


def _label(requirement: Requirement) -> str:
    owner = requirement.owner
    owner_name = getattr(owner, "__qualname__", None) or getattr(owner, "__name__", "?")
    what = requirement.attribute
    if requirement.params:
        what += "(params)"
    elif requirement.assigned_in:
        what += f"@{requirement.assigned_in}"
    return f"{owner_name}.{what}"


def _cases() -> list[Any]:
    return [
        pytest.param(seam, index, id=f"{_name(seam)}:{_label(requirement)}")
        for seam in SEAMS
        for index, requirement in enumerate(seam.requirements())
    ]


def _assigns_nothing(self: object, *args: object, **kwargs: object) -> None:
    """A stand-in for a method that no longer sets the attribute."""


async def _run_assigns_nothing(self: object, *args: object, **kwargs: object) -> None:
    """A stand-in for an async method that no longer sets the attribute."""


def _takes_other_parameters(self: object, *values: object) -> None:
    """A stand-in for a method whose parameters changed."""


def _take_away(monkeypatch: pytest.MonkeyPatch, seam: Any, requirement: Requirement) -> str:
    """Take away what ``requirement`` needs; return the name the error must mention."""
    owner = requirement.owner
    name = requirement.attribute
    if requirement.params:
        monkeypatch.setattr(owner, name, _takes_other_parameters)
        return requirement.params[0]
    if requirement.assigned_in is not None:
        method = getattr(owner, requirement.assigned_in)
        stand_in = _run_assigns_nothing if asyncio.iscoroutinefunction(method) else _assigns_nothing
        monkeypatch.setattr(owner, requirement.assigned_in, stand_in)
        return name
    if not isinstance(owner, type):  # a module's attribute
        monkeypatch.delattr(owner, name)
        return name
    for cls in owner.__mro__:
        if name in vars(cls):
            try:
                monkeypatch.delattr(cls, name)
            except (AttributeError, TypeError):
                # An enum's member cannot be deleted: the seam sees a
                # stand-in class, of the same name, without it.
                stand_in = type(owner.__name__, (), {"__module__": owner.__module__})
                stand_in.__qualname__ = owner.__qualname__
                for global_name, value in vars(seam).items():
                    if value is owner:
                        monkeypatch.setattr(seam, global_name, stand_in)
                return name
            break
    if requirement.sample is not None:
        # An instance attribute: the sample is built, then loses it.
        original = owner.__init__

        def init(self: Any, *args: Any, **kwargs: Any) -> None:
            original(self, *args, **kwargs)
            if name in vars(self):
                object.__delattr__(self, name)

        monkeypatch.setattr(owner, "__init__", init)
    return name


@pytest.mark.parametrize(("seam", "index"), _cases())
def test_check_names_what_was_taken_away(
    monkeypatch: pytest.MonkeyPatch, seam: Any, index: int
) -> None:
    requirement = seam.requirements()[index]
    assert requirement.problem() is None
    expected = _take_away(monkeypatch, seam, requirement)
    with pytest.raises(SeamBroken) as caught:
        seam.check()
    message = str(caught.value)
    assert repr(expected) in message, message
    assert message.startswith(f"{caught.value.library} {caught.value.version}: ")
    assert caught.value.version != "?"


def test_the_message_names_library_version_and_attribute(monkeypatch: pytest.MonkeyPatch) -> None:
    from grpclib.server import Stream

    original = Stream.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        del self._stream

    monkeypatch.setattr(Stream, "__init__", init)
    with pytest.raises(SeamBroken) as caught:
        grpclib.check()
    assert str(caught.value) == (
        f"grpclib {caught.value.version}: grpclib.server.Stream has no attribute '_stream'"
    )


def test_grpclib_short_read_no_longer_asserting_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    from grpclib.protocol import Buffer

    async def read(self: Any, size: int) -> bytes:
        return b""  # a grpclib that signals a short read some other way

    monkeypatch.setattr(Buffer, "read", read)
    with pytest.raises(SeamBroken, match=r"Buffer\.read no longer asserts"):
        grpclib.check()


def test_tls_buffer_no_longer_sized_by_max_size_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        asyncio.sslproto.SSLProtocol, "get_buffer", lambda self, n: bytearray(256 * 1024)
    )
    with pytest.raises(SeamBroken, match="max_size"):
        asyncio_tls.check()


# -- the seams' code paths on the real libraries ---------------------------------


def test_recv_exact_reads_and_names_a_truncated_message() -> None:
    """``recv_exact`` on grpclib's stream buffer: whole reads, the end of the
    stream, and a message cut short (grpclib's AssertionError) as
    ``TruncatedMessage``."""

    from grpclib.protocol import Buffer

    def handle() -> grpclib.H2StreamHandle:
        stream = grpclib._handle()
        stream.buffer = Buffer(lambda size: None)  # (no h2 stream 1 to acknowledge on)
        return stream

    async def main() -> None:
        stream = handle()
        stream.buffer.add(b"abcdefg", 7)
        assert await grpclib.recv_exact(stream, 5) == b"abcde"
        stream.buffer.eof()
        with pytest.raises(grpclib.TruncatedMessage):
            await grpclib.recv_exact(stream, 5)  # 2 bytes, then END_STREAM
        end = handle()
        end.buffer.eof()
        assert await grpclib.recv_exact(end, 5) == b""

    asyncio.run(main())


def test_start_tls_uses_a_small_read_buffer_for_that_connection_only() -> None:
    """``asyncio_tls.start_tls``: a real handshake and a read, with the TLS
    read buffer asked for, and asyncio's class left as it was."""
    ca = trustme.CA()
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("localhost").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    default = asyncio.sslproto.SSLProtocol.max_size

    class App(asyncio.Protocol):
        def __init__(self) -> None:
            self.received = asyncio.get_running_loop().create_future()

        def data_received(self, data: bytes) -> None:
            if not self.received.done():
                self.received.set_result(data)

    async def main() -> None:
        import socket

        loop = asyncio.get_running_loop()
        server_sock, client_sock = socket.socketpair()
        raw, _ = await loop.connect_accepted_socket(asyncio.Protocol, server_sock)
        app = App()
        client = asyncio.ensure_future(
            asyncio.open_connection(
                sock=client_sock, ssl=client_context, server_hostname="localhost"
            )
        )
        tls = await asyncio_tls.start_tls(
            raw, app, server_context, read_buffer=32 * 1024, ssl_handshake_timeout=5.0
        )
        tls_protocol = raw.get_protocol()
        assert isinstance(tls_protocol, asyncio.sslproto.SSLProtocol)
        assert type(tls_protocol).max_size == 32 * 1024
        assert len(tls_protocol.get_buffer(-1)) == 32 * 1024
        app.connection_made(tls)
        _, writer = await client
        writer.write(b"hello")
        await writer.drain()
        assert await asyncio.wait_for(app.received, 5) == b"hello"
        writer.close()
        tls.close()
        await asyncio.sleep(0)

    asyncio.run(main())
    assert asyncio.sslproto.SSLProtocol.max_size == default  # the process's default is untouched
