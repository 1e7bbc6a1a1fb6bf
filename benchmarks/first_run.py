"""What a newcomer waits for: `make demo` in a fresh clone (new .venv, empty model cache), then again (all cached),
and optionally `make test` after it; wall times written to BENCHMARKS.md.

    python benchmarks/first_run.py [--with-test]

The clone is of this checkout's HEAD (commit what you measure). pip's wheel cache and the local torch file are
the machine's, as on any machine that installed the stack once; llama-cpp-python's build is cached by pip.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def timed(cmd: list[str], cwd: Path, env: dict) -> tuple[float, int, str]:
    """Wall seconds, exit code and the last lines of output of one command."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
    return time.perf_counter() - t0, proc.returncode, tail


def main() -> None:
    from markdown import replace_section

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--with-test", action="store_true", help="also time `make test` in the same clone")
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="first-run-"))
    clone = root / "compress"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=clone, capture_output=True,
                          text=True).stdout.strip()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH"))}
    env["COMPRESS_CACHE"] = str(root / "cache")  # an empty model cache: the pull is part of the first run
    env["COMPRESS_TEST_TEXT"] = str(REPO.parent / "shared" / "data" / "text" / "austen")  # the tests' data
    rows = []
    for label in ("first `make demo` (new .venv, empty model cache)", "second `make demo` (everything cached)"):
        seconds, rc, tail = timed(["make", "demo"], clone, env)
        rows.append((label, seconds, rc, tail))
        print(f"{label}: {seconds:.0f} s, exit {rc}", flush=True)
    if a.with_test:
        seconds, rc, tail = timed(["make", "test"], clone, env)
        rows.append(("`make test` after it (test extras installed, whole suite)", seconds, rc, tail))
        print(f"make test: {seconds:.0f} s, exit {rc}", flush=True)
    load = os.getloadavg()[0]
    table = "\n".join(f"| {label} | {s / 60:.1f} min ({s:.0f} s) | {rc} |" for label, s, rc, _ in rows)
    body = (f"Written by `python benchmarks/first_run.py{' --with-test' if a.with_test else ''}` on "
            f"{time.strftime('%Y-%m-%d')}: a fresh clone of {head}, {os.cpu_count()} cores, load average "
            f"{load:.1f} at the end. pip's wheel cache was warm (as after any earlier install on the machine), so a "
            "machine that never installed the stack adds its downloads, and llama-cpp-python's ~5 minute build for "
            f"`make test`.\n\n| run | wall | exit |\n|---|---|---|\n{table}")
    replace_section(REPO / "BENCHMARKS.md", "A newcomer's first run (issue 19)", body)
    print(body)
    raise SystemExit(max(rc for _, _, rc, _ in rows))


if __name__ == "__main__":
    main()
