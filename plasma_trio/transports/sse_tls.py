"""The SSE fast path over TLS (HTTP/1.1): the fan-out encrypts and writes, with no task.

Over TLS, an SSE stream used to go through Hypercorn and a task per
subscriber: every event woke the response body's task, went through
Quart, Hypercorn's h11 and ``trio.SSLStream`` (a lock, a retry loop) before
it reached the socket, ~100 us per delivery against ~10 us plain. Here the
front door does the handshake (``trio.SSLStream``), reads the request head
through it, and, for an SSE request the fast path takes, serves the stream
as the plain path does: :class:`TlsSocketWriter` is the plain
:class:`~plasma_trio.transports.sse_fast.SocketWriter` with the connection's
``ssl.SSLObject`` (from :class:`~plasma_trio.transports.tls.TlsContext`)
between the frames and the socket. ``trio.SSLStream`` is not used again on
that connection.

A write encrypts the frames (a batch's, joined) one TLS record (16 KiB) at
a time into the memory BIO, and writes each record's ciphertext with one
non-blocking ``write``: a batch under 16 KiB is one record and one write.
When the socket does not take a whole record, the rest of its ciphertext
waits in the writer, nothing more is encrypted, and the writer reports the
record's last byte as not taken: the session's outbox keeps it queued with
the frames after it (so the stream counts as stalled, the bound and the
write deadline apply, and the frame is counted as delivered only once all
of its ciphertext is in the kernel), and when the outbox offers that byte
again, the writer writes the waiting ciphertext, which already carries it.

While nothing is to be written, the connection's task waits for the socket
to become readable and feeds what arrives to the TLS object: a
``close_notify``, a reset or EOF is the client going away.
"""

from __future__ import annotations

import contextlib
import os
import ssl
from typing import TYPE_CHECKING, Any, Final

import trio

from plasma_trio.transports.sse_fast import SocketWriter
from plasma_trio.transports.wire import sse_response_head
from plasma_trio.writer import WriterGone

if TYPE_CHECKING:
    from plasma_trio.config import Config
    from plasma_trio.session import Session
    from plasma_trio.transports.tls import TlsState
    from plasma_trio.writer import Buffer

__all__ = ["RECORD", "TlsSocketWriter"]

# Plaintext per TLS record (the protocol's largest).
RECORD: Final = 16384


class TlsSocketWriter(SocketWriter):
    """One fast-path SSE connection over TLS (see the module doc)."""

    head_sent = True  # (run sends it through trio.SSLStream first)
    __slots__ = ("incoming", "outgoing", "owed", "pending", "stream", "tls")

    def __init__(
        self,
        sock: trio.socket.SocketType,
        session: Session,
        stream: trio.SSLStream[Any],
        state: TlsState,
    ) -> None:
        super().__init__(sock, session)
        self.stream = stream
        self.tls = state.ssl_object
        self.incoming = state.incoming
        self.outgoing = state.outgoing
        # Ciphertext the socket has not taken yet, and how many bytes of
        # plaintext it carries that the outbox still holds (the last one).
        self.pending: memoryview | None = None
        self.owed = 0

    async def run(self, config: Config) -> None:
        """The response head goes out through ``trio.SSLStream`` (which sends
        with it what TLS 1.3 held back after the handshake, its session
        tickets), then the stream is served as on the plain path."""
        try:
            with trio.move_on_after(config.subscriber_write_timeout) as scope:
                await self.stream.send_all(sse_response_head(config.origin))
        except trio.BrokenResourceError:
            scope = None
        if scope is None or scope.cancelled_caught:
            self.sock.close()  # (gone, or not reading, before the stream began)
            return
        self.session.status = 200  # (a refusal from here on ends an empty stream)
        await super().run(config)

    # -- the Writer ------------------------------------------------------------

    def write_nowait(self, data: Buffer) -> int:
        if self.pending is None and not self.owed and len(data) <= RECORD:
            # The common case (a frame, or a batch, of one record), inlined.
            try:
                self.tls.write(data)
            except ssl.SSLError:
                raise WriterGone from None  # (a TLS state that takes no data: cut)
            cipher = self.outgoing.read()
            try:
                sent = os.write(self.fd, cipher)
            except BlockingIOError:
                sent = 0
            except OSError:
                raise WriterGone from None  # EPIPE, ECONNRESET...
            if sent == len(cipher):
                return len(data)
            self.pending = memoryview(cipher)[sent:]
            self.owed = 1  # (see below)
            return len(data) - 1
        return self._write(data)

    def _write(self, data: Buffer) -> int:
        owed = self.owed
        if self.pending is not None:
            if not self._send_pending():
                return 0
            self.owed = 0
        # (What the outbox offers again starts with the bytes already sent.)
        view = memoryview(data)
        taken = owed
        # One TLS record (16 KiB of plaintext) at a time, written at once: what
        # the socket does not take is at most one record's ciphertext.
        while taken < len(view):
            record = view[taken : taken + RECORD]
            try:
                self.tls.write(record)
            except ssl.SSLError:
                raise WriterGone from None  # (a TLS state that takes no data: cut)
            self.pending = memoryview(self.outgoing.read())
            if not self._send_pending():
                # Its last byte stays with the outbox until the rest is out.
                self.owed = 1
                return taken + len(record) - 1
            taken += len(record)
        return len(view)

    def _send_pending(self) -> bool:
        """Write the waiting ciphertext; whether all of it went."""
        pending = self.pending
        assert pending is not None
        try:
            sent = os.write(self.fd, pending)
        except BlockingIOError:
            return False
        except OSError:
            raise WriterGone from None  # EPIPE, ECONNRESET...
        self.pending = pending[sent:] if sent < len(pending) else None
        return self.pending is None

    async def receive(self) -> None:
        # Readable: a TLS record (close_notify, or anything the client sends,
        # which an SSE connection ignores), or EOF.
        data = await self.read_client(65536)
        if not data:
            return
        self.incoming.write(data)
        try:
            while self.tls.read(65536):
                pass
        except ssl.SSLWantReadError:
            pass
        except (ssl.SSLZeroReturnError, ssl.SSLError):
            raise WriterGone from None  # close_notify, or a broken record
        if self.outgoing.pending and self.pending is None:
            # (TLS's own answer, e.g. to a key update: sent with the next frames.)
            self.pending = memoryview(self.outgoing.read())
            self._send_pending()

    def goodbye(self) -> None:
        """The stream is over: a ``close_notify``, if the socket takes it now."""
        if self.pending is not None:
            return
        with contextlib.suppress(ssl.SSLError):  # (SSLWantReadError: its answer)
            self.tls.unwrap()
        if self.outgoing.pending:
            with contextlib.suppress(OSError):
                os.write(self.fd, self.outgoing.read())
