"""Run every command of the README's ```bash blocks, in order, as a newcomer would after `make demo`; write which
passed, their exit codes and wall times to BENCHMARKS.md.

    python benchmarks/readme_check.py [--workdir DIR] [--timeout 1800] [--only SUBSTRING] [--from N]

`--from N` continues an interrupted run: it needs the same `--workdir` (commands 1..N-1 left their outputs there)
and keeps those commands' rows from BENCHMARKS.md; the section then says which rows came from the earlier run.

Commands run with bash in a scratch directory holding `examples/` and `benchmarks/` (links to the checkout) and
the demo's artifact (made first, with the Makefile's own demo command), with `.venv/bin` first on PATH. Lines that
set up the machine (`make ...`, `pip ...`, `source ...`) are skipped, and so is the GPU section (no GPU here).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests"))
SKIP = ("make ", "pip ", "source ", ".venv/bin/pip ")


def commands() -> list[str]:
    """The README's shell lines (continuations joined, comments kept out), in order."""
    from test_readme import readme_commands

    return readme_commands((REPO / "README.md").read_text())


def demo_command() -> str:
    """The Makefile's demo quantization, as a shell line."""
    text = (REPO / "Makefile").read_text().replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if "compress quantize" in ln)
    return "compress" + line.split("compress", 1)[1]


def main() -> None:
    from markdown import replace_section

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--only", default=None, help="run only the lines containing this (and report them alone)")
    ap.add_argument("--from", dest="start", type=int, default=1,
                    help="continue an interrupted run at command N (1-based) in the same --workdir")
    a = ap.parse_args()
    if a.start > 1 and a.workdir is None:
        ap.error("--from needs the --workdir of the run it continues")
    work = a.workdir or Path(tempfile.mkdtemp(prefix="readme-check-"))
    work.mkdir(parents=True, exist_ok=True)
    for name in ("examples", "benchmarks"):
        link = work / name
        if link.is_symlink() and not link.exists():  # left by a checkout that is gone: point it at this one
            link.unlink()
        if not link.exists():
            link.symlink_to(REPO / name)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "GITHUB_STEP_SUMMARY": str(work / "step-summary.md")}
    lines = [demo_command(), *[c for c in commands() if not c.startswith(SKIP)]]
    if a.only:
        lines = [c for c in lines if a.only in c]
    section = "README examples, run as written (issue 19)"
    rows = _earlier_rows(REPO / "BENCHMARKS.md", section, lines[:a.start - 1]) if a.start > 1 else []
    continued = len(rows)
    for cmd in lines[a.start - 1:]:
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(["bash", "-c", cmd], cwd=work, env=env, capture_output=True, text=True,
                                  timeout=a.timeout)
            rc, tail = proc.returncode, (proc.stderr.strip().splitlines() or [""])[-1]
        except subprocess.TimeoutExpired:
            rc, tail = "timeout", f"killed after {a.timeout} s"
        seconds = time.perf_counter() - t0
        rows.append((cmd, rc, seconds, tail))
        print(f"[{'ok' if rc == 0 else rc}] {seconds:7.1f} s  {cmd}", flush=True)
        if rc != 0:
            print(f"      {tail}", flush=True)
        if not a.only:  # after every command: an interrupted run still leaves what it measured
            replace_section(REPO / "BENCHMARKS.md", section, _body(rows, len(lines), continued))
    passed = sum(r[1] == 0 for r in rows)
    print(f"{passed}/{len(rows)} passed in {work}")
    raise SystemExit(0 if passed == len(rows) else 1)


def _earlier_rows(path: Path, section: str, lines: list[str]) -> list[tuple]:
    """The rows an interrupted run wrote for these commands, read back from its BENCHMARKS.md section."""
    text = path.read_text().split(f"## {section}\n", 1)[-1].split("\n## ", 1)[0]
    found = {}
    for m in re.finditer(r"^\| `(.*)` \| (pass|exit \S+) \| (\d+) \|$", text, re.M):
        found[m.group(1).replace("\\|", "|")] = (0 if m.group(2) == "pass" else m.group(2)[5:], float(m.group(3)))
    missing = [c for c in lines if c not in found]
    if missing:
        raise SystemExit(f"--from: BENCHMARKS.md has no earlier row for `{missing[0]}`; run from the start")
    return [(c, *found[c], "") for c in lines]


def _body(rows: list[tuple], total: int, continued: int = 0) -> str:
    """The BENCHMARKS.md section for the commands run so far."""
    passed = sum(r[1] == 0 for r in rows)
    bar = "\\|"
    table = "\n".join(f"| `{c.replace('|', bar)}` | {'pass' if rc == 0 else f'exit {rc}'} | {s:.0f} |"
                      for c, rc, s, _ in rows)
    failures = "\n".join(f"- `{c}`: {t}" for c, rc, _, t in rows if rc != 0) or "- none"
    done = "" if len(rows) == total else f" (run in progress or stopped: {len(rows)} of {total} commands so far)"
    if continued:
        done += (f"; commands 1-{continued} are from an earlier run that stopped, and this run continued from command "
                 f"{continued + 1} in the same directory (`--from {continued + 1}`)")
    return (f"Written by `python benchmarks/readme_check.py` on {time.strftime('%Y-%m-%d')} ({os.cpu_count()} cores, "
            f"models cached): every README command in order, from a scratch directory holding only `examples/` and "
            f"the demo's artifact{done}. {passed} of {len(rows)} passed; total {sum(r[2] for r in rows) / 60:.1f} min."
            f"\n\n| command | result | seconds |\n|---|---|---|\n{table}\n\n"
            f"Failures (last line of stderr):\n{failures}")


if __name__ == "__main__":
    main()
