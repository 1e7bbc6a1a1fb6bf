"""`compress tune` on SmolLM2 (issue 8), written to BENCHMARKS.md: a 10-minute budget run (Pareto set, chosen model)
and a second run interrupted with SIGINT, checked to leave best/ and pareto.json behind.

    python benchmarks/tune.py
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
AUSTEN = REPO.parent / "shared" / "data" / "text" / "austen"
CALIB = ",".join(str(p) for p in sorted(AUSTEN.glob("*.txt")) if p.name != "persuasion.txt")
HEADING = "compress tune on SmolLM2 (issue 8)"
GATE = "max_kl: 0.1\nmin_top1: 0.75\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--time-budget", default="10m")
    ap.add_argument("--reuse-full", action="store_true", help="Keep run 1 from WORK/full (rerun the interrupt only)")
    a = ap.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="compress-tune-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "gate.yaml").write_text(GATE)
    exe = str(Path(sys.executable).parent / "compress")
    args = ["tune", "smollm2-135m", "--gate", str(work / "gate.yaml"), "--time-budget", a.time_budget,
            "--data", CALIB, "--json"]
    if a.reuse_full:
        state = json.loads((work / "full" / "tune.json").read_text())
        wall, returncode = state["seconds"], 0 if state["best"] else 1
    else:
        t0 = time.perf_counter()
        p = subprocess.run([exe, *args, "--out", str(work / "full")], capture_output=True, text=True)
        wall, returncode = time.perf_counter() - t0, p.returncode
        if p.returncode not in (0, 1):
            raise SystemExit(f"tune exited {p.returncode}: {p.stderr[-800:]}")
        state = json.loads(p.stdout)

    # Interrupted run: SIGINT once two candidates are in pareto.json.
    out2 = work / "interrupted"
    shutil.rmtree(out2, ignore_errors=True)  # a previous run's pareto.json would trigger the interrupt at once
    # A background job inherits an ignored SIGINT; restore the default so Python turns it into KeyboardInterrupt.
    proc = subprocess.Popen([exe, *args, "--out", str(out2)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    t1 = time.perf_counter()
    while proc.poll() is None:
        pareto = out2 / "pareto.json"
        if pareto.is_file() and len(json.loads(pareto.read_text() or "[]")) >= 2:
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(1)
    _, err = proc.communicate()
    after = time.perf_counter() - t1
    kept = json.loads((out2 / "pareto.json").read_text())
    saved = json.loads((out2 / "tune.json").read_text())
    best_ok = (out2 / "best" / "model.safetensors").is_file()

    cmd = "compress " + " ".join(x.replace(str(work), "$W").replace(str(AUSTEN), "austen") for x in args)
    lines = [f"Written by `python benchmarks/tune.py` on {time.strftime('%Y-%m-%d')}. Command (`$W` scratch, "
             f"`austen` = ../shared/data/text/austen, calibration and held-out windows from the five novels other "
             f"than persuasion.txt): `{cmd} --out $W/full`, gate `{GATE.strip().replace(chr(10), ', ')}`.", "",
             f"Run 1: exit {returncode}, wall {wall:.0f} s (time budget {a.time_budget}; distortion table "
             f"{state['distortion_seconds']} s, then {len(state['points'])} candidates; "
             + (f"stopped by the time budget with the smallest passing and largest failing budget {_gap(state):.3f} "
                "bpw apart" if state["timed_out"] else "the bisection stopped when the smallest passing and largest "
                f"failing budget were {_gap(state):.3f} bpw apart")
             + ").", "", "| budget bpw | weight bytes | KL | top-1 | gate | Pareto | s |",
             "|---|---|---|---|---|---|---|"]
    for pt in state["points"]:
        lines.append(f"| {pt['avg_bits']:.3f} | {pt['size_bytes']:,} | {pt['kl_mean']:.4f} | {pt['top1']:.3f} | "
                     f"{'pass' if pt['passed'] else 'fail'} | {'yes' if pt.get('pareto') else ''} | "
                     f"{pt['seconds']} |")
    best = state.get("best")
    lines += ["", f"Chosen: {best['label']}, {best['size_bytes']:,} weight bytes, KL {best['kl_mean']:.4f}, top-1 "
                  f"{best['top1']:.3f} (written to `$W/full/best`, plot `$W/full/pareto.png`)." if best else
              "No candidate passed."]
    lines += ["", f"Run 2, interrupted with SIGINT {after:.0f} s after start (two candidates measured): exit "
                  f"{proc.returncode}; pareto.json kept {len(kept)} points, tune.json says interrupted="
                  f"{saved['interrupted']}, best/ {'present' if best_ok else 'MISSING'}"
                  + (f" ({saved['best']['label']})" if saved.get("best") else "") + "."]
    sys.path.insert(0, str(REPO / "benchmarks"))
    from markdown import replace_section

    replace_section(REPO / "BENCHMARKS.md", HEADING, "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(err[-300:], file=sys.stderr)


def _gap(state: dict) -> float:
    passing = [p["avg_bits"] for p in state["points"] if p["passed"]]
    failing = [p["avg_bits"] for p in state["points"] if not p["passed"] and passing and p["avg_bits"] < min(passing)]
    return min(passing) - max(failing) if passing and failing else float("nan")


if __name__ == "__main__":
    main()
