"""The exceptions plasma-trio raises on purpose.

::

    PlasmaError
     ├── ConfigError        a setting is unusable; .variable names it (exit status 2)
     ├── ServiceUnavailable the hub refuses a new subscriber (limit or shutdown)
     └── SourceFailed       the event source gave up for good (exit status 1)
"""

from __future__ import annotations

__all__ = ["ConfigError", "PlasmaError", "ServiceUnavailable", "SourceFailed"]


class PlasmaError(Exception):
    """Root of plasma-trio's own exceptions."""


class ConfigError(PlasmaError):
    """A setting cannot be used. ``variable`` is the environment variable's name."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable
        self.problem = problem


class ServiceUnavailable(PlasmaError):
    """A new subscriber is refused: connection limit reached, or shutting down."""


class SourceFailed(PlasmaError):
    """The event source failed for good (e.g. Redis retries exhausted with ``die``)."""
