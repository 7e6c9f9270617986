"""The garbage collector's settings for a server process (``plasma-trio serve``).

A server holding thousands of streams keeps hundreds of thousands of
long-lived objects (sessions, queues, sockets, tasks), and a reconnect storm
allocates a few dozen more per connection. With CPython's default thresholds
(700, 10, 10) the collector then runs a young collection every 700
allocations and, every hundred of those, a full one over the whole heap: in a
storm of 15,000 connects that was about a quarter of the server's CPU
(bench/RESULTS.md, issue 22). So, at start-up, once the modules are loaded:

* :func:`gc.freeze` moves what exists then (modules, classes, the
  configuration) out of the collector's sight for good;
* the young generation is collected every :data:`YOUNG` allocations instead
  of 700: cyclic garbage waits a little longer (it is rare here: a stream's
  objects are freed by reference counting when it ends), and each full
  collection comes 14 times less often.

Only the CLI does this (an application that embeds :func:`plasma_trio.app.serve`
keeps its own settings). ``plasma_gc_*`` / ``python_gc_*`` on the metrics
port show the collections and their pauses.
"""

from __future__ import annotations

import gc
from typing import Final

__all__ = ["YOUNG", "tune"]

YOUNG: Final = 10_000


def tune() -> None:
    """Freeze what is loaded now; collect the young generation every YOUNG allocations."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG, older, oldest)
