"""Introspection of the running trio task tree (metrics and diagnostics)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["iter_tasks", "live_task_count"]


def iter_tasks(root: trio.lowlevel.Task | None = None) -> Iterator[trio.lowlevel.Task]:
    """Every live task under ``root`` (default: the run's root task), depth first."""
    stack = [root or trio.lowlevel.current_root_task()]
    while stack:
        task = stack.pop()
        if task is None:
            continue
        yield task
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)


def live_task_count() -> int:
    """How many trio tasks are alive in this run."""
    return sum(1 for _ in iter_tasks())
