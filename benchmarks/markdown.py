"""Keep BENCHMARKS.md as sections, each owned by one script: a script replaces only its own section."""

from __future__ import annotations

import re
from pathlib import Path

HEADER = ("# Benchmarks\n\nEach section is written by the script it names, with the exact command; "
          "medians where timed.\n")


def replace_section(path: Path, heading: str, body: str) -> None:
    """Put `## heading` + body into the file, replacing the section of that heading if present."""
    text = path.read_text() if path.exists() else HEADER
    section = f"## {heading}\n\n{body.strip()}\n\n"
    pattern = re.compile(rf"^## {re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    found = pattern.search(text)
    text = pattern.sub(lambda _: section, text) if found else text.rstrip() + "\n\n" + section
    path.write_text(text.rstrip() + "\n")
