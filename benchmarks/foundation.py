"""Foundation figures on real models, written to BENCHMARKS.md: scoring wall time and peak RSS, eval checks.

Run: `make bench` (or `.venv/bin/python benchmarks/foundation.py [--repeats N]`). Needs ../shared/data (Austen).
Each CLI command runs in a fresh process; wall time is the median over repeats, peak RSS the max.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
AUSTEN = REPO.parent / "shared" / "data" / "text" / "austen"
BIN = Path(sys.executable).parent / "compress"
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))


def run_timed(args: list[str], repeats: int) -> dict:
    """Run `compress ARGS` `repeats` times; median wall seconds, max peak RSS (MiB), last JSON output."""
    walls, rss, out = [], [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-f", "%M", str(BIN), *args], capture_output=True, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
        walls.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            raise SystemExit(f"failed: compress {' '.join(args)}\n{proc.stderr[-2000:]}")
        rss.append(int(proc.stderr.strip().splitlines()[-1]) / 1024)
        out = proc.stdout
    return {"wall_s": statistics.median(walls), "walls": walls, "rss_mib": max(rss), "stdout": out}


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=3, help="runs per cheap command (ablation runs once)")
    ap.add_argument("--out", default=str(REPO / "BENCHMARKS.md"))
    a = ap.parse_args()
    rows = []
    tmp = Path(tempfile.mkdtemp())
    data = str(AUSTEN)
    cases = [
        ("smollm2-135m lim+zd", ["score", "smollm2-135m", "--data", data, "--methods", "lim,zd"], a.repeats),
        ("smollm2-135m lim+zd+ablation", ["score", "smollm2-135m", "--data", data, "--methods", "lim,zd,ablation"], 1),
        ("minilm-l6 lim+zd", ["score", "minilm-l6", "--data", data, "--methods", "lim,zd"], a.repeats),
        ("minilm-l6 lim+zd+ablation", ["score", "minilm-l6", "--data", data, "--methods", "lim,zd,ablation"],
         a.repeats),
    ]
    for name, args, reps in cases:
        out = tmp / f"{name.replace(' ', '_')}.json"
        r = run_timed([*args, "--out", str(out), "--json"], reps)
        rep = json.loads(r["stdout"])
        rows.append((name, "compress " + " ".join(args).replace(data, "../shared/data/text/austen"), r, rep))
        print(f"{name}: {r['wall_s']:.1f}s, {r['rss_mib']:.0f} MiB, methods {rep['timings_s']}", flush=True)

    from markdown import replace_section
    from test_real_models import q4_0_round_trip

    from compress.data import load_windows
    from compress.evaluate import evaluate
    from compress.models import layer_map, load_model

    ref = load_model("smollm2-135m")
    cand = load_model("smollm2-135m")
    with torch.no_grad():
        for blk in layer_map(cand.module).blocks:
            for p in blk.linears:
                lin = cand.module.get_submodule(p)
                lin.weight.copy_(q4_0_round_trip(lin.weight))
    w = load_windows(str(AUSTEN / "persuasion.txt"), ref, split="all", tokens=3072, seq_len=512, sequential=True)
    q4 = evaluate(cand, ref, w)
    self_eval = evaluate(ref, ref, w)

    lines = [
        f"Written by `python benchmarks/foundation.py --repeats {a.repeats}` on {time.strftime('%Y-%m-%d')}.",
        f"Machine: {machine()}.", "",
        "### Importance scoring", "",
        "2,048 calibration tokens (4 windows of 512 for SmolLM2, 8 of 256 for MiniLM) from the six Austen novels, "
        "seed 0. Wall time is the whole command in a fresh process (load, tokenize, score, write), median of the "
        "runs listed; peak RSS is the maximum resident set size of the process. Per-method seconds come from the "
        "report's `timings_s` (last run).", "",
        "| case | command | runs | wall median (s) | peak RSS (MiB) | per method (s) |",
        "|---|---|---|---|---|---|",
    ]
    for name, cmd, r, rep in rows:
        per = ", ".join(f"{k} {v:.1f}" for k, v in rep["timings_s"].items())
        lines.append(f"| {name} | `{cmd}` | {len(r['walls'])} | {r['wall_s']:.1f} | {r['rss_mib']:.0f} | {per} |")
    lines += [
        "", "Targets: lim+zd under 60 s; ablation (30 blocks + 60 sublayers) under 5 minutes at 2,048 tokens.", "",
        "### Eval checked against a known answer (ANCHORS protocol)", "",
        "SmolLM2, persuasion.txt tokenized whole (BOS first), first 6 windows of 512 tokens, KL(reference ‖ "
        "candidate) over the full vocabulary at all 3,072 positions. Candidate: every block Linear weight replaced "
        "by its llama.cpp-Q4_0 round trip (signed 4-bit, group 32, fp16 scale = max-magnitude weight / −8); "
        "embedding and tied LM head untouched. Anchor: KL 0.318, top-1 0.653 (llama.cpp Q4_0 and ORT int4).", "",
        "| candidate | KL mean | KL median | KL p99 | top-1 | ppl | ppl ref |",
        "|---|---|---|---|---|---|---|",
        f"| Q4_0 round trip | {q4.kl_mean:.4f} | {q4.kl_median:.4f} | {q4.kl_p99:.3f} | {q4.top1_agreement:.3f} | "
        f"{q4.ppl:.2f} | {q4.ppl_ref:.2f} |",
        f"| self | {self_eval.kl_mean:.2e} | {self_eval.kl_median:.2e} | {self_eval.kl_p99:.2e} | "
        f"{self_eval.top1_agreement:.3f} | {self_eval.ppl:.2f} | {self_eval.ppl_ref:.2f} |",
        "", f"Q4_0 KL / anchor = {q4.kl_mean / 0.318:.3f} (target within ±20%).", "",
    ]
    replace_section(Path(a.out), "Foundation: scoring and evaluation (issue 2)", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
