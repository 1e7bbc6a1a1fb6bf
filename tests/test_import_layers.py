"""Imports point down: `compress` (the library) < `exporters`, `evals` < `flows` (one function per verb) < `cli.py`.
The library imports no exporter, evaluator, flow, CLI or terminal UI; `exporters/` and `evals/` import the library
and not each other. Read from the source (ast), so an import hidden inside a function counts."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ABOVE = {"compress": {"exporters", "evals", "flows", "cli", "typer", "rich"},
         "exporters": {"evals", "flows", "cli", "typer", "rich"},
         "evals": {"exporters", "flows", "cli", "typer", "rich"},
         "flows": {"cli", "typer"}}


def imported(path: Path) -> set[str]:
    """Top-level names of every absolute import in a file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
    return names


@pytest.mark.parametrize("layer", sorted(ABOVE))
def test_no_layer_imports_upward(layer):
    bad = {}
    for f in sorted((REPO / layer).rglob("*.py")):
        rel = f.relative_to(REPO).as_posix()
        up = imported(f) & ABOVE[layer]
        if up:
            bad[rel] = sorted(up)
    assert not bad, f"upward imports: {bad}"


def test_importing_the_library_pulls_in_no_exporter_cli_or_ui():
    above = {"exporters", "evals", "flows", "typer", "rich", "cli"}
    code = ("import sys, compress, compress.models, compress.data, compress.evaluate, compress.atomic; "
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {above!r}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
