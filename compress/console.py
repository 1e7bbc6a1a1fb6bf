"""Terminal plumbing shared by CLI verbs: error reporting with exit codes, progress bars, tables."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from compress.errors import UserError

T = TypeVar("T")
stderr = Console(stderr=True)
LEFT = {"path", "name", "sublayer", "description", "kind", "check", "result", "rule", "node", "op", "message",
        "severity", "unit", "spec", "metric", "reference", "plan", "order"}
stdout = Console()


def run_command(fn: Callable[[], T], debug: bool) -> T:
    """Run a verb: bad input -> one line on stderr and exit 2; other failures -> one line and exit 1."""
    try:
        return fn()
    except UserError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
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
def progress_bar(enabled: bool = True) -> Iterator[Progress | None]:
    """A rich progress display on stderr, or None when disabled."""
    if not enabled:
        yield None
        return
    p = Progress(TextColumn("{task.description:>10}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                 console=stderr, transient=False)
    with p:
        yield p


def print_json(obj: Any) -> None:
    """Machine-readable output on stdout."""
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


def table(title: str, columns: list[str], rows: list[list[Any]]) -> Table:
    """A rich table with right-aligned numbers."""
    t = Table(title=title, title_justify="left")
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
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int) and abs(v) >= 10000:
        return f"{v:,}"
    return str(v)
