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


def _module_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (anywhere in the file), for compress/, exporters/, evals/, flows/."""
    files = {}
    for top in ABOVE:
        for f in (REPO / top).rglob("*.py"):
            name = ".".join(f.relative_to(REPO).with_suffix("").parts)
            files[name.removesuffix(".__init__")] = f
    graph = {}
    for name, f in files.items():
        out = set()
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                out.update(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                           for a in node.names)
            elif isinstance(node, ast.Import):
                out.update(a.name for a in node.names)
        graph[name] = {t for t in out if t in files and t != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on, stack, found, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_no_module_imports_itself_through_others():
    """No loop between files either, counting imports inside functions (they only hide a loop, not remove it)."""
    graph = _module_graph()
    assert len(graph) > 100
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_loop():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
