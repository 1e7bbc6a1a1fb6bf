"""Progress of long phases, reported wherever the run is watched: bars in a terminal, one line per finished phase
(with its duration) in a log, nothing when the library is used without a display.

The CLI makes a display current (`attach`); library code marks its long phases with `phase(...)` and needs no
progress argument threaded through to it."""

from __future__ import annotations

import contextlib
import contextvars
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

_CURRENT: contextvars.ContextVar[Any] = contextvars.ContextVar("compress_progress", default=None)


@contextlib.contextmanager
def attach(progress: Any) -> Iterator[Any]:
    """Make `progress` (rich Progress, PlainProgress or None) the display `phase` reports to."""
    token = _CURRENT.set(progress)
    try:
        yield progress
    finally:
        _CURRENT.reset(token)


def current() -> Any:
    """The display phases report to, or None."""
    return _CURRENT.get()


@contextlib.contextmanager
def phase(description: str, total: int | None = None, progress: Any = None) -> Iterator[Callable[..., None]]:
    """A task on the current display (or `progress`) for the duration of the block; yields `advance(n=1)`. The task
    is shown complete when the block ends, also when its total was unknown."""
    p = progress if progress is not None else current()
    if p is None:
        yield lambda n=1: None
        return
    task = p.add_task(description, total=total)
    try:
        yield lambda n=1: p.advance(task, n)
    finally:
        done = total if total is not None else 1
        p.update(task, total=done, completed=done)


class PlainProgress:
    """The Progress interface for logs (stderr is not a terminal): one line per task when it finishes, with its
    duration, so a CI log shows what ran and how long it took."""

    def __init__(self, stream: Any = None):
        self.stream = stream or sys.stderr
        self.tasks: dict[int, dict] = {}

    def add_task(self, description: str, total: float | None = None, **_: Any) -> int:
        """Start a task; returns its id."""
        tid = len(self.tasks)
        self.tasks[tid] = {"description": description, "total": total, "completed": 0.0,
                           "t0": time.perf_counter(), "done": False}
        return tid

    def advance(self, task: int, advance: float = 1) -> None:
        """Count `advance` more steps of `task`; print its line when it reaches its total."""
        self.update(task, advance=advance)

    def update(self, task: int, *, total: float | None = None, completed: float | None = None,
               advance: float | None = None, description: str | None = None, **_: Any) -> None:
        """Change a task (rich's signature); print its line when it reaches its total."""
        t = self.tasks[task]
        if description is not None:
            t["description"] = description
        if total is not None:
            t["total"] = total
        if completed is not None:
            t["completed"] = completed
        if advance is not None:
            t["completed"] += advance
        if t["total"] is not None and t["completed"] >= t["total"]:
            self._finish(t)

    def stop(self) -> None:
        """Print the tasks still open (interrupted or of unknown length)."""
        for t in self.tasks.values():
            self._finish(t, ended=False)

    def _finish(self, t: dict, ended: bool = True) -> None:
        if t["done"]:
            return
        t["done"] = True
        steps = f" {t['completed']:g}/{t['total']:g}" if t["total"] not in (None, 1) else ""
        state = "" if ended else " (not finished)"
        print(f"{t['description']}:{steps} {time.perf_counter() - t['t0']:.1f} s{state}", file=self.stream,
              flush=True)
