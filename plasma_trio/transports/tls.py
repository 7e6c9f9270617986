"""The server's TLS context: built once at start-up, shared by every TLS port.

The main port (HTTPS, HTTP/1.1 and HTTP/2 by ALPN) and the gRPC port use the
same certificate pair, so they share one ``ssl.SSLContext``: the files are
read once, and a missing, unreadable or mismatched pair is a
:class:`~plasma_trio.errors.ConfigError` naming the variable before anything
serves. ALPN offers ``h2`` first (gRPC clients offer nothing else) and
``http/1.1``.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

from plasma_trio.errors import ConfigError

if TYPE_CHECKING:
    from plasma_trio.config import Config

__all__ = ["server_context"]


def server_context(config: Config) -> ssl.SSLContext | None:
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
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION
    try:
        context.load_cert_chain(config.tls_cert_file, config.tls_key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            "PLASMA_TLS_CERT_FILE", f"cannot load the certificate and key: {exc}"
        ) from None
    context.set_alpn_protocols(["h2", "http/1.1"])
    return context
