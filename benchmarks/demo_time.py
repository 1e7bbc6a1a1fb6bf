"""Wall time and peak RSS of the `make demo` quantization (model already cached), written to BENCHMARKS.md.

    python benchmarks/demo_time.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def demo_args() -> list[str]:
    """The `compress quantize ...` arguments of the Makefile's demo target (minus --out), so the two never drift."""
    text = (REPO / "Makefile").read_text().replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if "compress quantize" in ln)
    args = line.split("compress", 1)[1].split()
    return args[: args.index("--out")] if "--out" in args else args


ARGS = demo_args()


def main() -> None:
    from markdown import replace_section

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    exe = str(Path(sys.executable).parent / "compress")
    walls, rss, kls = [], [], []
    load = os.getloadavg()
    for _ in range(a.repeats):
        out = Path(tempfile.mkdtemp()) / "demo"
        t0 = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-f", "%M", exe, *ARGS, "--out", str(out), "--json"],
                              capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        walls.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-2000:])
        rss.append(int(proc.stderr.strip().splitlines()[-1]) / 1024)
        kls.append(json.loads(proc.stdout)["metrics"]["kl_mean"])
    body = (f"Written by `python benchmarks/demo_time.py --repeats {a.repeats}` on {time.strftime('%Y-%m-%d')}.\n\n"
            f"Command: `compress {' '.join(ARGS)} --out DIR` (SmolLM2 already in the cache; data sampled from the "
            "model itself).\n\n| runs | wall median (s) | all runs (s) | peak RSS max (MiB) | KL (self-sampled "
            "held-out) |\n"
            "|---|---|---|---|---|\n"
            f"| {a.repeats} | {statistics.median(walls):.1f} | {', '.join(f'{w:.1f}' for w in walls)} | "
            f"{max(rss):.0f} | {statistics.median(kls):.4f} |\n\nTargets (issue 3): ≤ 60 s, ≤ 4 GB RSS. Load average "
            f"(1 min) before / after: {load[0]:.1f} / {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores.")
    replace_section(REPO / "BENCHMARKS.md", "Demo quantization time (issue 3)", body)
    print(body)


if __name__ == "__main__":
    main()
