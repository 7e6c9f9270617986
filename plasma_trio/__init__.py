"""plasma-trio: event push middleware on trio (SSE and gRPC fan-out)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("plasma-trio")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

__all__ = ["__version__"]
