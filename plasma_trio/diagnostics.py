"""A live dump of the trio task tree with every task's current stack.

The counterpart of Go's pprof goroutine dump (``PLASMA_PPROF_*``): when a
server seems stuck, ``curl host:6060/debug/pprof/goroutine`` shows what every
task is waiting on. Pure formatting over :mod:`plasma_trio.tasks`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    import types
    from collections.abc import Iterator

__all__ = ["dump_tasks"]


def _frames(coro: Any) -> Iterator[types.FrameType]:
    """The frames of a coroutine chain, outermost first."""
    seen = 0
    while coro is not None and seen < 200:
        seen += 1
        frame = (
            getattr(coro, "cr_frame", None)
            or getattr(coro, "gi_frame", None)
            or getattr(coro, "ag_frame", None)
        )
        if frame is not None:
            yield frame
        coro = (
            getattr(coro, "cr_await", None)
            or getattr(coro, "gi_yieldfrom", None)
            or getattr(coro, "ag_await", None)
        )


def dump_tasks(root: trio.lowlevel.Task | None = None) -> str:
    """Render the task tree under ``root`` (default: the whole run) as text."""
    lines: list[str] = []
    count = 0

    def visit(task: trio.lowlevel.Task, depth: int) -> None:
        nonlocal count
        count += 1
        indent = "  " * depth
        lines.append(f"{indent}task {task.name}")
        for frame in _frames(task.coro):
            code = frame.f_code
            lines.append(f"{indent}    {code.co_filename}:{frame.f_lineno} in {code.co_name}")
        for nursery in task.child_nurseries:
            for child in sorted(nursery.child_tasks, key=lambda t: t.name):
                visit(child, depth + 1)

    visit(root or trio.lowlevel.current_root_task() or trio.lowlevel.current_task(), 0)
    return f"{count} trio tasks\n\n" + "\n".join(lines) + "\n"
