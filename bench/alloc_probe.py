#!/usr/bin/env python3
"""``plasma-trio`` with an allocator probe, to pass as ``head_flood.py --server``.

``ALLOC_PROBE=tracemalloc``: Python's allocations traced (12 frames), a
snapshot dumped every 15 s to ``$ALLOC_PROBE_DIR/snap_<n>.pickle`` (compare
them with ``tracemalloc.Snapshot.load(...).compare_to(...)``).
``ALLOC_PROBE=trim``: glibc's ``malloc_trim(0)`` every 3 s, from a thread.

    ALLOC_PROBE=trim .nox/tests/bin/python bench/head_flood.py \\
        --server bench/alloc_probe.py --port main --floods 12 --timeout 2

Run it with the Python that has plasma-trio installed (the shebang finds
``python3`` on PATH: activate ``.nox/tests`` first, or call it through that
interpreter).
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys
import threading
import time
import tracemalloc


def _snapshots(directory: str) -> None:
    n = 0
    while True:
        time.sleep(15)
        gc.collect()
        tracemalloc.take_snapshot().dump(os.path.join(directory, f"snap_{n}.pickle"))
        n += 1


def _trim() -> None:
    libc = ctypes.CDLL("libc.so.6")
    while True:
        time.sleep(3)
        libc.malloc_trim(0)


def main() -> None:
    probe = os.environ.get("ALLOC_PROBE", "")
    if probe == "tracemalloc":
        tracemalloc.start(12)
        directory = os.environ.get("ALLOC_PROBE_DIR", "/tmp")
        threading.Thread(target=_snapshots, args=(directory,), daemon=True).start()
    elif probe == "trim":
        threading.Thread(target=_trim, daemon=True).start()
    else:
        sys.exit("ALLOC_PROBE must be tracemalloc or trim")
    from plasma_trio.cli import main as cli_main

    sys.argv = ["plasma-trio", *sys.argv[1:]]
    cli_main()


if __name__ == "__main__":
    main()
