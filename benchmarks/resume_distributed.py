"""`--resume` after a real SIGKILL, and torchrun with 2 gloo ranks, on SmolLM2 (issue 16): the same weight bytes as
an uninterrupted single process, and what each costs.

    python benchmarks/resume_distributed.py [--kill-at-block 15]
    python benchmarks/resume_distributed.py --part resume --model ~/.cache/compress/bench/llama-3b-synth \
        --method rtn --kill-at-block 14 --no-eval          # the 3 B model (its own section)

Resume: `quantize smollm2-135m --bits 4 --method gptq --stream on` uninterrupted; then the same command killed with
SIGKILL as soon as block K's group is on disk (watched from outside, as a user's kill would land), then run again
with --resume. torchrun: `quantize --layerwise --avg-bits 4.5 --measure fast` in one process (torch's default
threads) and under `torchrun --standalone --nproc-per-node 2` (one thread per rank), weight bytes compared, wall
time ratio. Run it alone: the two cores are the whole machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "text" / "austen"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def run(cmd: list[str], cwd: Path, env: dict | None = None) -> tuple[int, float]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=cwd, env=env or ENV, capture_output=True, text=True)
    if p.returncode:
        print(p.stderr[-2000:], file=sys.stderr)
    return p.returncode, time.perf_counter() - t0


def kill_when(cmd: list[str], cwd: Path, watch: Path, groups: int) -> tuple[int, float]:
    """Start `cmd`, SIGKILL it once `watch` holds `groups` finished block groups; (exit code, seconds)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=cwd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while p.poll() is None:
        if len(list(watch.glob(".group-*.safetensors"))) >= groups:
            p.send_signal(signal.SIGKILL)
            break
        time.sleep(0.2)
    return p.wait(), time.perf_counter() - t0


def main() -> None:
    from markdown import replace_section
    from stream_big import weights_sha

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kill-at-block", type=int, default=15)
    ap.add_argument("--model", default="smollm2-135m", help="a zoo name or a model directory (resume part only; "
                                                            "another model than SmolLM2 gets its own section)")
    ap.add_argument("--method", default="gptq", help="the resumed run's --method")
    ap.add_argument("--no-eval", action="store_true", help="the resumed runs write the artifact only "
                                                           "(quantize --no-eval): a large model's evaluation "
                                                           "would double each run")
    ap.add_argument("--part", choices=("all", "resume", "torchrun"), default="all",
                    help="run one half only (its rows alone are written)")
    a = ap.parse_args()
    cli = [sys.executable, str(REPO / "cli.py")]
    work = Path(tempfile.mkdtemp(prefix="resume-dist-"))
    base = ["quantize", a.model, "--bits", "4", "--method", a.method, "--stream", "on",
            *(["--no-eval"] if a.no_eval else []), "--data", str(DATA), "--json"]
    lw = ["quantize", "smollm2-135m", "--layerwise", "--avg-bits", "4.5", "--measure", "fast", "--data", str(DATA),
          "--json"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                str(REPO / "cli.py")]
    try:
        if a.part in ("all", "resume"):
            rc_whole, t_whole = run([*cli, *base, "--out", "whole"], work)
            rc_kill, t_kill = kill_when([*cli, *base, "--out", "q"], work, work / ".q.partial", a.kill_at_block + 1)
            kept = len(list((work / ".q.partial").glob(".group-*.safetensors")))
            rc_res, t_res = run([*cli, *base, "--out", "q", "--resume"], work)
            resume_same = rc_whole == rc_res == 0 and weights_sha(work / "whole") == weights_sha(work / "q")
            print(f"resume: whole {t_whole:.0f} s, killed ({rc_kill}) after {t_kill:.0f} s with {kept} groups, "
                  f"resumed {t_res:.0f} s, same bytes: {resume_same}", flush=True)
        if a.part in ("all", "torchrun"):
            rc_one, t_one = run([*cli, *lw, "--out", "one"], work)
            rc_two, t_two = run([*torchrun, *lw, "--out", "two"], work, {**ENV, "OMP_NUM_THREADS": "1"})
            dist_same = rc_one == rc_two == 0 and weights_sha(work / "one") == weights_sha(work / "two")
            print(f"torchrun: one {t_one:.0f} s, two ranks {t_two:.0f} s, same bytes: {dist_same}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    head = [
        f"Written by `{shown(['python', 'benchmarks/resume_distributed.py', *sys.argv[1:]])}` on "
        f"{time.strftime('%Y-%m-%d')} ({platform.machine()}, {os.cpu_count()} cores, no GPU). Data: the Austen "
        "novels (`austen/`, the shared test data).", "",
        "| case | command | exit | wall | weight files vs uninterrupted single process |", "|---|---|---|---|---|"]
    resume_rows = [
        f"| uninterrupted | `compress {shown(base[:-2])} austen/ --out whole` | {rc_whole} | {t_whole:.0f} s | "
        "(reference) |",
        f"| SIGKILL once block {a.kill_at_block} is written | same, `--out q` | {rc_kill} | {t_kill:.0f} s | "
        f"{kept} block groups kept in `.q.partial` |",
        f"| `--resume` | same, `--out q --resume` | {rc_res} | {t_res:.0f} s | "
        f"**{'byte-identical' if resume_same else 'DIFFERENT'}** |"] if a.part != "torchrun" else []
    torchrun_rows = [
        f"| one process | `compress {' '.join(lw[:-2])} austen/ --out one` | {rc_one} | {t_one:.0f} s | (reference) |",
        f"| torchrun, 2 gloo ranks | `torchrun --standalone --nproc-per-node 2 cli.py ...same... --out two` | "
        f"{rc_two} | {t_two:.0f} s | **{'byte-identical' if dist_same else 'DIFFERENT'}** |"] \
        if a.part != "resume" else []
    ratios = []
    if resume_rows:
        ratios.append(f"Killed + resumed wall time / uninterrupted: **{(t_kill + t_res) / t_whole:.2f}×** (the "
                      "resumed run redoes the capture of calibration inputs and the content hash of the inputs).")
    if torchrun_rows:
        ratios.append(f"Two ranks / one process: **{t_two / t_one:.2f}×** wall time (the ranks split the measured "
                      "cells; each also loads the model, builds the reference and, on rank 0, evaluates, and the two "
                      "cores were already both used by one process's threads).")
    lines = [*head, *resume_rows, *torchrun_rows, "", " ".join(ratios)]
    heading = "Resume after SIGKILL, and torchrun (issue 16)" if a.model == "smollm2-135m" else \
        f"Resume after SIGKILL: {Path(a.model).name} (issue 16)"
    replace_section(REPO / "BENCHMARKS.md", heading, "\n".join(lines) + "\n")


def shown(args: list[str]) -> str:
    """A command line as the reader would type it: ~ for the home directory."""
    from markdown import tilde

    return tilde(" ".join(args))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
