"""The server's TLS context: built once at start-up, shared by every TLS port,
reloaded in place.

The main port (HTTPS, HTTP/1.1 and HTTP/2 by ALPN) and the gRPC port use the
same certificate pair, so they share one ``ssl.SSLContext``: the files are
read once, and a missing, unreadable or mismatched pair is a
:class:`~plasma_trio.errors.ConfigError` naming the variable before anything
serves. ALPN offers ``h2`` first (gRPC clients offer nothing else) and
``http/1.1``.

Rotation (cert-manager, ACME clients): :class:`CertificateReloader` loads a
new pair into that same context on SIGHUP and when the files change
(``PLASMA_TLS_RELOAD_INTERVAL``). New handshakes get the new certificate;
connections already open keep theirs, so no stream is dropped. The pair is
read once into a private copy and tried on a scratch context first: a bad
pair (unreadable, mismatched, half-written) leaves the live context as it
was, and the failure is logged.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import trio

from plasma_trio.errors import ConfigError
from plasma_trio.logs import ERROR

if TYPE_CHECKING:
    from plasma_trio.config import Config

__all__ = ["CertificateReloader", "TlsContext", "TlsState", "server_context"]

_log = ERROR.getChild("tls")


class TlsState(NamedTuple):
    """One connection's TLS object and its memory BIOs (``ssl.SSLContext.wrap_bio``)."""

    ssl_object: ssl.SSLObject
    incoming: ssl.MemoryBIO
    outgoing: ssl.MemoryBIO


class TlsContext(ssl.SSLContext):
    """The server's context. It remembers the TLS state of the last
    connection it wrapped (:meth:`take`): the front door reads it right after
    ``trio.SSLStream`` makes it, in the same step, so that the SSE fast path
    can write through that connection's TLS synchronously (encrypt, then one
    non-blocking write), as the plain fast path writes to its socket."""

    _last: TlsState | None = None

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        ssl_object = super().wrap_bio(incoming, outgoing, server_side, server_hostname, session)
        self._last = TlsState(ssl_object, incoming, outgoing)
        return ssl_object

    def take(self) -> TlsState | None:
        """The state :meth:`wrap_bio` made last (once)."""
        last, self._last = self._last, None
        return last


def server_context(config: Config) -> TlsContext | None:
    """The server-side TLS context, or ``None`` when TLS is off.

    Raises:
        ConfigError: a file cannot be read, or the pair cannot be loaded.
    """
    if not config.tls_enabled:
        return None
    for variable, path in (
        ("PLASMA_TLS_CERT_FILE", config.tls_cert_file),
        ("PLASMA_TLS_KEY_FILE", config.tls_key_file),
    ):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise ConfigError(variable, f"cannot read {path!r}: {exc.strerror or exc}") from None
    # (What ssl.create_default_context(Purpose.CLIENT_AUTH) makes, as a TlsContext.)
    context = TlsContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    try:
        context.load_cert_chain(config.tls_cert_file, config.tls_key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            "PLASMA_TLS_CERT_FILE", f"cannot load the certificate and key: {exc}"
        ) from None
    context.set_alpn_protocols(["h2", "http/1.1"])
    return context


class CertificateReloader:
    """Loads a changed certificate pair into the live context (see the module doc)."""

    def __init__(self, config: Config, context: ssl.SSLContext) -> None:
        self.cert_file = config.tls_cert_file
        self.key_file = config.tls_key_file
        self.context = context
        self._stamp = self._files_stamp()

    def _files_stamp(self) -> tuple[tuple[int, int, int], ...] | None:
        try:
            return tuple(
                (st.st_mtime_ns, st.st_size, st.st_ino)
                for st in (os.stat(self.cert_file), os.stat(self.key_file))
            )
        except OSError:
            return None

    def changed(self) -> bool:
        """Whether either file differs from the last pair looked at."""
        return self._files_stamp() != self._stamp

    def reload(self, reason: str) -> bool:
        """Load the files now; ``False`` (logged) when the pair is not usable."""
        self._stamp = self._files_stamp()
        try:
            with tempfile.TemporaryDirectory(prefix="plasma-tls-") as tmp:
                # One read of each file: what is tried is what is loaded.
                cert = Path(tmp, "cert.pem")
                key = Path(tmp, "key.pem")
                cert.write_bytes(Path(self.cert_file).read_bytes())
                key.write_bytes(Path(self.key_file).read_bytes())
                key.chmod(0o600)
                scratch = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                scratch.load_cert_chain(cert, key)
                self.context.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            _log.warning(
                "tls certificate not reloaded: keeping the current one",
                extra={"reason": reason, "cert_file": self.cert_file, "error": str(exc)},
            )
            return False
        _log.info(
            "tls certificate reloaded",
            extra={"reason": reason, "cert_file": self.cert_file},
        )
        return True

    async def watch(self, interval: float) -> None:
        """Reload whenever the files change, checking every ``interval`` seconds."""
        while True:
            await trio.sleep(interval)
            if self.changed():
                self.reload("files changed")
