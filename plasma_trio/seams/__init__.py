"""Each library's internals behind one seam.

plasma-trio relies on a few libraries beyond their documented surface
(grpclib's HTTP/2 connection and stream objects, h2's flow-control state and
frame buffer, Hypercorn's trio connection server and HTTP/2 protocol, the
stdlib's asyncio TLS protocol). Every such use lives in one module per
library here (:mod:`.grpclib`, :mod:`.h2`, :mod:`.hypercorn`,
:mod:`.asyncio_tls`), whose docstring lists what it touches and why; the rest
of the package calls the named functions and classes of these modules only.

Each module's ``check()`` verifies every attribute, method and signature it
relies on, on the installed version, and raises :class:`SeamBroken` (naming
the library, its version and what is missing) when one is not there.
:func:`check_all` runs them all; the server calls it once at start-up, so
that a changed library stops the start loudly instead of breaking delivery
later (or, worse, silently taking a slower path). The libraries are pinned
exactly (``==``) in ``pyproject.toml`` for the same reason; ``tests/test_seams.py``
takes each attribute away in turn and expects its name in the error.
"""

from __future__ import annotations

from plasma_trio.seams import asyncio_tls, grpclib, h2, hypercorn
from plasma_trio.seams.base import Requirement, SeamBroken, verify

__all__ = ["Requirement", "SeamBroken", "check_all", "verify"]

_checked = False


def check_all() -> None:
    """Every seam's ``check()`` (called at server start; once per process:
    the libraries loaded do not change under it)."""
    global _checked
    if _checked:
        return
    for module in (grpclib, h2, hypercorn, asyncio_tls):
        module.check()
    _checked = True
