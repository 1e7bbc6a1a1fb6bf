"""Keep BENCHMARKS.md as sections, each owned by one script: a script replaces only its own section."""

from __future__ import annotations

import re
from pathlib import Path

HEADER = ("# Benchmarks\n\nEach section is written by the script it names, with the exact command; "
          "medians where timed.\n")


def tilde(text: str) -> str:
    """`text` with the user's home directory written as `~`: committed files name no path of this machine."""
    return text.replace(str(Path.home()), "~")


def replace_section(path: Path, heading: str, body: str) -> None:
    """Put `## heading` + body into the file, replacing the section of that heading if present; under a lock, so
    benchmarks running side by side (the ones whose figures are not timings) do not lose each other's sections."""
    import fcntl

    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        text = path.read_text() if path.exists() else HEADER
        section = f"## {heading}\n\n{body.strip()}\n\n"
        pattern = re.compile(rf"^## {re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
        found = pattern.search(text)
        text = pattern.sub(lambda _: section, text) if found else text.rstrip() + "\n\n" + section
        path.write_text(text.rstrip() + "\n")


def publish_state(state: dict, started: float, results: Path, heading: str, render, markdown: bool = True) -> None:
    """Stamp a benchmark's state with its wall time and machine, keep it as JSON, and (unless `markdown` is off)
    rewrite its BENCHMARKS.md section with `render(state)`: called after every row, so a stopped run keeps them."""
    import json
    import os
    import platform
    import time

    import torch

    state["seconds"] = round(time.perf_counter() - started, 1)
    state["machine"] = {"cores": os.cpu_count(), "arch": platform.machine(), "torch": torch.__version__,
                        "load": os.getloadavg()[0]}
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(state, indent=1))
    if markdown:
        replace_section(results.parents[2] / "BENCHMARKS.md", heading, render(state))
