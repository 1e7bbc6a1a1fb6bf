"""Which paths a verb may write: new or empty paths, its own earlier outputs, or what the user forced — never a
user's files, and never `/`, the home directory or the working directory (nor a folder holding them)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from compress.errors import UserError

MARKER = ".compress-output"  # in every directory the tool writes: who wrote it, and each file's size and sha256
SIGNATURE = "written by compress"  # in every single file the tool writes where a user names the path
_SNIFF = (SIGNATURE.encode(), b'"written_by": "compress')
_LEGACY = ("compress.json", "compress-zoo.json", "tune.json", "export.json")  # manifests of outputs made before MARKER
_FORCED: set[Path] = set()


def claim(path: Path | str, force: bool = False, kind: str = "dir", flag: str = "--out") -> Path:
    """Check now, before any work, that `path` may be written; with `force`, allow replacing what is there.

    Raise UserError naming the path and the fix otherwise. Writers check again when they finish (`may_replace`)."""
    path = Path(path).expanduser().absolute()
    reason = protected(path)
    if reason:
        raise UserError(f"{flag} {path}: refusing to write {reason}; pass a new path, e.g. {path}/compress-out")
    if path.is_symlink():
        raise UserError(f"{flag} {path}: is a symbolic link; pass the path it points to, or a new path")
    if not path.exists():
        _check_writable(path, flag)
        return path
    if kind == "dir" and not path.is_dir():
        raise UserError(f"{flag} {path}: is a file, and a directory is written here; pass a new path")
    if kind == "file" and path.is_dir():
        raise UserError(f"{flag} {path}: is a directory, and a file is written here; pass a file path")
    if force:
        _FORCED.add(path)
    elif not may_replace(path):
        raise UserError(refusal(path, flag))
    _check_writable(path, flag)
    return path


def may_replace(path: Path) -> bool:
    """True when `path` is absent, an empty directory or file, written by this tool, inside a directory this tool
    wrote, or claimed with force."""
    path = Path(path).absolute()
    if not path.exists() and not path.is_symlink():
        return True
    if path in _FORCED or owned_dir(path.parent):
        return True
    if path.is_dir() and not path.is_symlink():
        return not any(path.iterdir()) or owned_dir(path)
    return path.is_file() and (path.stat().st_size == 0 or owned_file(path))


def refusal(path: Path, flag: str = "--out") -> str:
    """The one-line refusal for an existing path this tool did not write."""
    if path.is_dir():
        entries = sorted(p.name for p in path.iterdir())
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        what = f"the directory exists and was not written by compress ({len(entries)} entries: {shown})"
    else:
        what = "the file exists and was not written by compress"
    return f"{flag} {path}: {what}; pass a new path, or --force to replace it"


def owned_dir(path: Path) -> bool:
    """True for a directory this tool wrote: its marker, or a manifest of an output made before the marker."""
    path = Path(path)
    if (path / MARKER).is_file():
        return True
    for name in _LEGACY:
        f = path / name
        if f.is_file():
            try:
                body = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(body, dict) and ("tool_version" in body or str(body.get("format", "")).startswith(
                    "compress")):
                return True
    return False


def owned_file(path: Path) -> bool:
    """True for a single file this tool wrote: its signature in the first MiB (JSON key, PNG/GGUF metadata,
    a comment in XML/Markdown/HTML)."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 20)
    except OSError:
        return False
    return any(s in head for s in _SNIFF)


def protected(path: Path) -> str | None:
    """Why `path` may never be replaced (`/`, home, the working directory or a folder holding either), else None."""
    path = Path(path).expanduser().absolute()
    real = Path(os.path.realpath(path))
    home, cwd = Path.home().resolve(), Path.cwd().resolve()
    if real == Path(real.anchor):
        return "the filesystem root"
    if real == home:
        return "the home directory"
    if real == cwd:
        return "the current working directory"
    if real in home.parents or real in cwd.parents:
        return "a directory that holds the home or working directory"
    return None


def _check_writable(path: Path, flag: str) -> None:
    """The nearest existing folder must accept new entries (read-only filesystems, no permission: exit 2 now)."""
    probe = nearest_existing(path.parent)
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: cannot write in {probe} (read-only or no permission); pass a writable path")


def signature() -> str:
    """The mark put in a single file's text or metadata: "written by compress X.Y.Z"."""
    from compress.version import __version__

    return f"{SIGNATURE} {__version__}"


def nearest_existing(path: Path) -> Path:
    """`path` or its closest ancestor that exists (where a new output's folders would be created)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def stamp() -> dict:
    """Who wrote an output: tool, version and command line."""
    from compress.version import __version__

    return {"written_by": f"compress {__version__}", "command": " ".join(
        [Path(sys.argv[0]).name, *sys.argv[1:]])[:1000]}


def claim_outputs(force: bool = False, dirs: dict[str, Path | None] | None = None,
                  files: dict[str, Path | None] | None = None) -> None:
    """`claim` every output a verb was given ({flag: path}, None skipped) before any work starts."""
    for flag, path in (dirs or {}).items():
        if path is not None:
            claim(path, force, "dir", flag)
    for flag, path in (files or {}).items():
        if path is not None:
            claim(path, force, "file", flag)
