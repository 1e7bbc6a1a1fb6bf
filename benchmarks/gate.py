"""The CI gate on real SmolLM2 candidates (issue 8), written to BENCHMARKS.md: the exact commands a CI job runs.

Baseline: the original evaluated against itself on the ANCHORS.md windows. Candidates: uniform q4g32s and q3g32s RTN
of the blocks' Linears. One gate (KL, top-1, perplexity increase) must pass the first and fail the second; the JUnit
XML must parse and the Markdown is embedded here as it renders in a CI job summary.

    python benchmarks/gate.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from xml.etree import ElementTree as ET

REPO = Path(__file__).resolve().parents[1]
AUSTEN = REPO.parent / "shared" / "data" / "text" / "austen"
HEADING = "CI regression gate on SmolLM2 (issue 8)"
GATE = ["--max-kl", "0.35", "--min-top1", "0.6", "--max-ppl-increase", "30%"]


def compress(*args: str) -> tuple[int, float, str]:
    """Run the installed `compress` CLI; exit code, wall seconds, stderr."""
    t0 = time.perf_counter()
    p = subprocess.run([str(Path(sys.executable).parent / "compress"), *args], capture_output=True, text=True)
    return p.returncode, time.perf_counter() - t0, p.stderr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=None)
    a = ap.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="compress-gate-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    data = str(AUSTEN / "persuasion.txt")
    ev = ["--reference", "smollm2-135m", "--data", data, "--protocol", "anchors"]
    rows, cmds = [], []

    def step(*args: str, expect: int = 0) -> tuple[int, float]:
        rc, s, err = compress(*args)
        cmds.append("compress " + " ".join(x.replace(str(work), "$W").replace(str(AUSTEN), "austen") for x in args))
        if rc != expect:
            raise SystemExit(f"{' '.join(args)} exited {rc} (expected {expect}): {err.strip()[-500:]}")
        return rc, s

    step("eval", "smollm2-135m", *ev, "--out", str(work / "baseline.json"))
    for bits in ("4", "3"):
        step("quantize", "smollm2-135m", "--bits", bits, "--data", data, "--tokens", "512", "--eval-tokens", "512",
             "--out", str(work / f"q{bits}"))
        step("eval", str(work / f"q{bits}"), *ev, "--out", str(work / f"q{bits}.json"))
    for bits, expect in (("4", 0), ("3", 1)):
        junit, md = work / f"q{bits}.xml", work / f"q{bits}.md"
        rc, s = step("gate", "--baseline", str(work / "baseline.json"), "--candidate", str(work / f"q{bits}.json"),
                     *GATE, "--junit", str(junit), "--markdown", str(md), expect=expect)
        suite = ET.parse(junit).getroot()
        rep = json.loads((work / f"q{bits}.json").read_text())
        rows.append({"candidate": f"uniform q{bits}g32s RTN", "kl": rep["kl_mean"], "top1": rep["top1_agreement"],
                     "ppl": rep["ppl"], "exit": rc, "tests": suite.get("tests"), "failures": suite.get("failures"),
                     "gate_s": s, "markdown": md.read_text()})
    base = json.loads((work / "baseline.json").read_text())
    lines = [f"Written by `python benchmarks/gate.py` on {time.strftime('%Y-%m-%d')}. Commands (`$W` a scratch dir, "
             "`austen` = ../shared/data/text/austen):", "", "```", *cmds, "```", "",
             f"Baseline: the original against itself (ppl {base['ppl']:.2f}, KL 0). Gate: `{' '.join(GATE)}`.", "",
             "| candidate | KL | top-1 | ppl | gate exit | JUnit testcases / failures | gate wall s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['candidate']} | {r['kl']:.4f} | {r['top1']:.3f} | {r['ppl']:.2f} | {r['exit']} | "
                     f"{r['tests']} / {r['failures']} | {r['gate_s']:.1f} |")
    for r in rows:
        body = r["markdown"].replace("### ", "#### ")
        lines += ["", f"Markdown written by `--markdown` for {r['candidate']}:", "", body]
    text = "\n".join(lines) + "\n"
    sys.path.insert(0, str(REPO / "benchmarks"))
    from markdown import replace_section

    replace_section(REPO / "BENCHMARKS.md", HEADING, text)
    print(text)


if __name__ == "__main__":
    main()
