"""The garbage collector's settings for a server process (``plasma-trio serve``).

A server holding thousands of streams keeps hundreds of thousands of
long-lived objects (sessions, queues, sockets, tasks), and a reconnect storm
allocates a few hundred more per connection. With CPython's default
thresholds (700, 10, 10) a full collection, over the whole heap, comes every
70,000 allocations or so (and whenever the heap has grown by a quarter): in
a storm of 15,000 connects that was about a third of the server's CPU
(bench/RESULTS.md, issue 22). So, at start-up, once the modules are loaded:

* :func:`gc.freeze` moves what exists then (modules, classes, the
  configuration) out of the collector's sight for good;
* :data:`THRESHOLDS`: the young generation is collected about as often as
  by default (short-lived cycles, such as a failed connection's exception
  and its frames, are freed as promptly: with a young generation of 10,000
  the RSS after an hour of hostile clients grew by 46 MB, over the hostile
  test's bound), the middle one half as often, and a full collection comes
  about thirty times less often.

Only the CLI does this (an application that embeds :func:`plasma_trio.app.serve`
keeps its own settings). ``/metrics/python`` shows the thresholds
(``gc_threshold``), the frozen objects (``gc_frozen``), the collections and
their pauses.
"""

from __future__ import annotations

import gc
from typing import Final

__all__ = ["THRESHOLDS", "tune"]

THRESHOLDS: Final = (1000, 20, 100)


def tune() -> None:
    """Freeze what is loaded now; collect with THRESHOLDS."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
