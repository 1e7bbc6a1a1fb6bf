"""Integrity of written outputs: each file's size and sha256 recorded in the marker, checked before use."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from compress.errors import UserError
from compress.outputs import MARKER

_VERIFIED: dict[str, tuple] = {}  # directory -> (marker mtime, file stats) already checked in this process


@dataclass
class Problem:
    """One file that does not match its record."""

    file: str
    what: str  # "missing" | "size" | "sha256"
    expected: str
    found: str

    def line(self, root: Path) -> str:
        """One line naming the file and the mismatch."""
        if self.what == "missing":
            return f"{Path(root) / self.file}: missing (recorded {self.expected} bytes)"
        return f"{Path(root) / self.file}: {self.what} {self.found} does not match the recorded {self.expected}"


def sha256(path: Path) -> str:
    """The sha256 of a file, read in chunks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_records(root: Path) -> dict[str, dict]:
    """{relative path: {bytes, sha256}} for every file under `root` but the marker."""
    root = Path(root)
    out = {}
    for f in sorted(root.rglob("*")):
        if f.is_file() and f.name != MARKER:
            out[f.relative_to(root).as_posix()] = {"bytes": f.stat().st_size, "sha256": sha256(f)}
    return out


def recorded(root: Path) -> dict[str, dict] | None:
    """The file records of ROOT's marker, or None when it has none (no marker, or a work directory)."""
    marker = Path(root) / MARKER
    if not marker.is_file():
        return None
    try:
        body = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{marker}: unreadable ({exc}); the output was damaged, re-create it") from exc
    files = body.get("files") if isinstance(body, dict) else None
    return files if isinstance(files, dict) else None


def verify(root: Path, hashes: bool = True) -> tuple[list[Problem], int]:
    """Check every recorded file of ROOT; return the problems and how many files were checked."""
    root = Path(root)
    records = recorded(root) or {}
    problems = []
    for rel, rec in records.items():
        f = root / rel
        if not f.is_file():
            problems.append(Problem(rel, "missing", str(rec.get("bytes")), "-"))
            continue
        size = f.stat().st_size
        if size != rec.get("bytes"):
            problems.append(Problem(rel, "size", f"{rec.get('bytes')} bytes", f"{size} bytes"))
        elif hashes and sha256(f) != rec.get("sha256"):
            problems.append(Problem(rel, "sha256", str(rec.get("sha256"))[:16] + "…", "a different sha256"))
    return problems, len(records)


def check_before_use(root: Path) -> None:
    """UserError naming the first damaged file of an output this tool wrote (truncated, changed, missing); a
    directory without records passes. Checked once per process while nothing changes."""
    root = Path(root).absolute()
    marker = root / MARKER
    if not marker.is_file():
        return
    key = str(root)
    state = (marker.stat().st_mtime_ns, tuple(sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns)
                                                     for f in root.iterdir() if f.is_file())))
    if _VERIFIED.get(key) == state:
        return
    problems, _ = verify(root)
    if problems:
        raise UserError(f"{problems[0].line(root)}: the output was damaged after compress wrote it; re-create it "
                        f"(`compress verify {root}` lists every file)")
    _VERIFIED[key] = state


def verify_tree(root: Path) -> list[dict]:
    """Verify ROOT and every output directory below it (a tune or recipe workdir holds several); one row per
    output: {dir, files, problems: [line]}. UserError when ROOT holds no output this tool wrote."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: not a directory; pass a directory written by compress")
    rows = []
    for marker in sorted(root.rglob(MARKER)):
        d = marker.parent
        if any(part.endswith(".tmp") for part in d.relative_to(root).parts):
            continue  # a temporary sibling of an unfinished write, not an output
        if recorded(d) is None:
            continue
        problems, n = verify(d)
        rows.append({"dir": str(d), "files": n, "problems": [p.line(d) for p in problems]})
    if not rows:
        raise UserError(f"{root}: no output written by compress here (no {MARKER} with file records); nothing to "
                        "verify")
    return rows
