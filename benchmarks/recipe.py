"""`compress run` on SmolLM2 (issue 8), written to BENCHMARKS.md: the recipe prune 10% blocks → score → quantize
layer-wise 4.5 bpw (the seed's rank allocation by the cached scores) → export int4 → validate → eval → gate, run
twice: the second time with one quantize option changed, so prune and score come from the cache.

    python benchmarks/recipe.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
AUSTEN = REPO.parent / "shared" / "data" / "text" / "austen"
HEADING = "compress run: a cached, resumable recipe on SmolLM2 (issue 8)"
RECIPE = """model: smollm2-135m
data: {data}
workdir: {work}
defaults:
  seq_len: 256
steps:
  - prune: {{blocks: 10%, method: bi, tokens: 512, eval_tokens: 512}}
  - score: {{methods: [lim, zd], tokens: 1024}}
  - quantize: {{layerwise: true, avg_bits: {bits}, allocator: rank, rank_by: lim, target: ort, tokens: 512,
                eval_tokens: 512}}
  - export: {{format: int4, tokens: 256}}
  - validate: {{}}
  - eval: {{protocol: anchors, data: {persuasion}}}
  - gate: {{max_kl: 1.5, min_top1: 0.35}}
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=None)
    a = ap.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="compress-recipe-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    exe = str(Path(sys.executable).parent / "compress")
    runs = []
    for bits in (4.5, 4.25):
        path = work / "recipe.yaml"
        path.write_text(RECIPE.format(data=AUSTEN / "emma.txt", work=work / "out", bits=bits,
                                      persuasion=AUSTEN / "persuasion.txt"))
        t0 = time.perf_counter()
        p = subprocess.run([exe, "run", str(path), "--json"], capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if p.returncode not in (0, 1):
            raise SystemExit(f"compress run exited {p.returncode}: {p.stderr[-800:]}")
        summary = json.loads(p.stdout)
        runs.append((bits, wall, p.returncode, summary))
        print(f"avg_bits {bits}: exit {p.returncode}, {wall:.0f} s", flush=True)
    lines = [f"Written by `python benchmarks/recipe.py` on {time.strftime('%Y-%m-%d')}. Recipe (paths shortened):",
             "", "```yaml", RECIPE.format(data="austen/emma.txt", work="$W/out", bits="4.5",
                                          persuasion="austen/persuasion.txt").strip(), "```", "",
             "Run 2 changes only `avg_bits: 4.5` to `4.25`.", "",
             "| step | run 1 (avg_bits 4.5) | s | run 2 (avg_bits 4.25) | s |", "|---|---|---|---|---|"]
    first, second = runs[0][3]["steps"], runs[1][3]["steps"]
    for e1, e2 in zip(first, second, strict=True):
        lines.append(f"| {e1['index']} {e1['step']} | {e1['status']} | {e1['seconds']:.1f} | {e2['status']} | "
                     f"{e2['seconds']:.1f} |")
    lines.append(f"| **whole command (wall)** | exit {runs[0][2]} | {runs[0][1]:.0f} | exit {runs[1][2]} | "
                 f"{runs[1][1]:.0f} |")
    ev = [next(e for e in r[3]["steps"] if e["step"] == "gate") for r in runs]
    lines += ["", "Gate results: " + "; ".join(
        f"run {i + 1}: {'passed' if (g['record'] or {}).get('passed') else 'failed'}" for i, g in enumerate(ev))
        + ". The second run re-uses the cached prune and score steps (their keys do not depend on the quantize "
          "options) and reruns quantize and everything after it."]
    sys.path.insert(0, str(REPO / "benchmarks"))
    from markdown import replace_section

    replace_section(REPO / "BENCHMARKS.md", HEADING, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
