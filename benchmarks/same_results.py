"""Run the same commands on two revisions of the code and compare their results: a refactoring (issue 15's seams,
issue 16's loading) must give the same plans, removals, scores and metrics. Writes a BENCHMARKS.md section.

    python benchmarks/same_results.py --base REV [--only NAME]

REV is checked out into a temporary git worktree and imported in place of this checkout (PYTHONPATH), with this
checkout's .venv; both run every command in a fresh process on the same inputs, offline.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
DATA = "examples/data"
# name -> (arguments, the result fields compared: dotted paths into the --json output)
CASES = {
    "quantize layer-wise 4.5 bpw, --measure fast": (
        ["quantize", "smollm2-135m", "--layerwise", "--avg-bits", "4.5", "--measure", "fast", "--tokens", "512",
         "--eval-tokens", "1024", "--seq-len", "256", "--data", DATA, "--json"],
        ["plan.meta.units", "plan.meta.planned_bytes", "bpw", "metrics.kl_mean", "metrics.top1_agreement",
         "metrics.ppl"]),
    "quantize uniform 4-bit g32": (
        ["quantize", "smollm2-135m", "--bits", "4", "--eval-tokens", "1024", "--seq-len", "256", "--data", DATA,
         "--json"],
        ["size_bytes", "metrics.kl_mean", "metrics.kl_p99", "metrics.top1_agreement"]),
    "prune 2 blocks by BI": (
        ["prune", "smollm2-135m", "--blocks", "2", "--method", "bi", "--tokens", "1024", "--eval-tokens", "1024",
         "--data", DATA, "--json"],
        ["removed", "params_after", "metrics.kl_mean", "metrics.top1_agreement"]),
    "export int4 (MatMulNBits) of a 4-bit --target ort artifact, validated": (
        ["export", "{artifact}", "--onnx", "{out}/int4", "--format", "int4", "--tokens", "256", "--data", DATA,
         "--json"],
        ["size_bytes", "export.extra.rewrite.bits", "passed", "validation.vs artifact (kernel rounding).checks",
         "validation.vs original float.checks"]),
    "score minilm-l6 lim, zd, ablation": (
        ["score", "minilm-l6", "--data", DATA, "--methods", "lim,zd,ablation", "--json"],
        ["blocks", "sublayers"]),
}


def field(obj, path: str):
    """obj['a']['b'] for 'a.b'."""
    for key in path.split("."):
        obj = obj[key] if isinstance(obj, dict) else None
    return obj


def same(a, b, rel: float = 1e-6) -> bool:
    """Equal, floats within `rel` (JSON rounding), recursively."""
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, int | float) and isinstance(b, int | float) and (
            a == b or math.isclose(a, b, rel_tol=rel, abs_tol=1e-12))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k], rel) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y, rel) for x, y in zip(a, b, strict=True))
    return a == b


def run(code: Path, args: list[str], fill: dict[str, str] | None = None) -> tuple[dict, float]:
    """`compress ARGS` with the package at `code`, from the checkout (for examples/); JSON result and seconds.
    `{name}` in an argument is replaced from `fill` (e.g. each tree's own output directory)."""
    args = [x.format(**(fill or {})) for x in args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(code)}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", "import sys; from cli import main; sys.argv[0] = 'compress'; main()",
                           *args], cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{code}: compress {' '.join(args)} exited {proc.returncode}: {proc.stderr[-500:]}")
    return json.loads(proc.stdout), time.perf_counter() - t0


def main() -> None:
    from markdown import replace_section

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--base", required=True, help="the revision to compare with (e.g. the commit before a refactor)")
    ap.add_argument("--only", default=None)
    a = ap.parse_args()
    base_rev = subprocess.run(["git", "rev-parse", "--short", a.base], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    head_rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    work = Path(tempfile.mkdtemp(prefix="same-results-")) / "base"
    subprocess.run(["git", "worktree", "add", "--detach", str(work), a.base], cwd=REPO, check=True,
                   capture_output=True)
    rows, failed = [], 0
    scratch = work.parent
    try:
        # one input artifact for the export case, made once (by HEAD) so both trees export the same codes
        run(REPO, ["quantize", "smollm2-135m", "--bits", "4", "--target", "ort", "--eval-tokens", "256",
                   "--seq-len", "256", "--data", DATA, "--out", str(scratch / "artifact"), "--json"])
        for name, (args, fields) in CASES.items():
            if a.only and a.only not in name:
                continue
            (scratch / "base-out").mkdir(exist_ok=True)
            (scratch / "head-out").mkdir(exist_ok=True)
            old, t_old = run(work, args, {"artifact": str(scratch / "artifact"), "out": str(scratch / "base-out")})
            new, t_new = run(REPO, args, {"artifact": str(scratch / "artifact"), "out": str(scratch / "head-out")})
            diff = [f for f in fields if not same(field(old, f), field(new, f))]
            failed += bool(diff)
            shown = next((f for f in fields if f.startswith("metrics.kl")), fields[0])
            rows.append((name, args, fields, diff, field(new, shown), shown, t_old, t_new))
            print(f"[{'same' if not diff else 'DIFFERENT: ' + ', '.join(diff)}] {name}", flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(work)], cwd=REPO, capture_output=True)
    lines = [f"Written by `python benchmarks/same_results.py --base {base_rev}` on {time.strftime('%Y-%m-%d')} "
             f"(HEAD {head_rev}; 2 cores; each command in a fresh process, the same inputs, offline). A refactoring "
             "passes when every compared field is equal (floats to 1e-6 relative, i.e. JSON rounding). The seconds are "
             "each run's wall time, not a speed comparison (other jobs may share the cores).", "",
             "| case | command | fields compared | result | shown value (HEAD) | s base / HEAD |",
             "|---|---|---|---|---|---|"]
    for name, args, fields, diff, value, shown, t_old, t_new in rows:
        verdict = "same" if not diff else "**different**: " + ", ".join(diff)
        shown_value = f"{shown} {value:.4f}" if isinstance(value, float) else shown
        lines.append(f"| {name} | `compress {' '.join(args)}` | {', '.join(fields)} | {verdict} | {shown_value} | "
                     f"{t_old:.0f} / {t_new:.0f} |")
    if not a.only:
        replace_section(REPO / "BENCHMARKS.md", "Same results before and after a refactoring (issue 15)",
                        "\n".join(lines) + "\n")
    print(f"{len(rows) - failed}/{len(rows)} cases give the same results")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
