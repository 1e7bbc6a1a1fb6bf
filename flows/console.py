"""Terminal plumbing shared by CLI verbs: error reporting with exit codes, progress bars, tables."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from compress.errors import EnvironmentFault, UserError
from compress.progress import PlainProgress, attach

T = TypeVar("T")
stderr = Console(stderr=True)
LEFT = {"path", "name", "sublayer", "description", "kind", "check", "result", "rule", "node", "op", "message",
        "severity", "unit", "spec", "metric", "reference", "plan", "order"}
stdout = Console()


def run_command(fn: Callable[[], T], debug: bool) -> T:
    """Run a verb: bad input -> one line on stderr and exit 2; a failing environment or other failures -> one line
    and exit 1."""
    try:
        return fn()
    except UserError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except EnvironmentFault as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as exc:  # noqa: BLE001 - reported as one line; --debug shows the traceback
        if debug:
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        print(f"error: {type(exc).__name__}: {first} (rerun with --debug for the traceback)", file=sys.stderr)
        raise SystemExit(1) from None


@contextlib.contextmanager
def progress_bar(enabled: bool = True) -> Iterator[Progress | PlainProgress | None]:
    """Bars on stderr in a terminal, one line per finished phase otherwise (CI logs), or None when disabled; the
    display is made current, so library phases (`compress.progress.phase`) report to it."""
    if not enabled:
        yield None
        return
    if not stderr.is_terminal:
        plain = PlainProgress()
        try:
            with attach(plain):
                yield plain
        finally:
            plain.stop()
        return
    p = Progress(TextColumn("{task.description:>10}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                 TimeRemainingColumn(),
                 console=stderr, transient=False)
    with p, attach(p):
        yield p


def print_json(obj: Any) -> None:
    """Machine-readable output on stdout."""
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


def table(title: str, columns: list[str], rows: list[list[Any]]) -> Table:
    """A rich table with right-aligned numbers, at least as wide as its title (up to the terminal), so the title
    wraps between words only when the terminal is narrower."""
    t = Table(title=title, title_justify="left", min_width=min(len(title), stdout.width))
    for c in columns:
        t.add_column(c, justify="left" if c in LEFT else "right")
    for r in rows:
        t.add_row(*[fmt(v) for v in r])
    return t


def fmt(v: Any) -> str:
    """Numbers printed compactly, None as '-'."""
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != v:
            return "nan"
        if v == 0:
            return "0"  # never "-0"
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int) and abs(v) >= 10000:
        return f"{v:,}"
    return str(v)
