"""Content keys for `compress run`: canonical JSON hashed with sha256, and fingerprints of what a step reads.

A step's key covers everything that decides its output: its name and resolved options, the key of the step before
it, the tool version, and the contents of the files it reads (data specs, scores, plans, thresholds, the original
model). Data files and small model files are hashed whole; model files above LARGE_FILE bytes are fingerprinted by
size, mtime and their first and last MiB (hashing gigabytes on every run would cost more than some steps).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from compress.errors import UserError

DONE = "done.json"
LARGE_FILE = 64 << 20
EDGE = 1 << 20
_HASHES: dict[tuple[str, int, int, bool], str] = {}  # (path, size, mtime_ns, whole) -> digest, for one process


def canonical(obj: Any) -> str:
    """Stable JSON: sorted keys, no whitespace, paths as strings."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def content_key(payload: Any) -> str:
    """sha256 of the canonical JSON of `payload`."""
    return hashlib.sha256(canonical(payload).encode()).hexdigest()


def file_digest(path: Path, whole: bool = True) -> str:
    """sha256 of a file's contents; `whole=False` above LARGE_FILE: size, mtime and the first and last MiB."""
    path = Path(path)
    st = path.stat()
    whole = whole or st.st_size <= LARGE_FILE
    memo = (str(path.resolve()), st.st_size, st.st_mtime_ns, whole)
    if memo in _HASHES:
        return _HASHES[memo]
    h = hashlib.sha256()
    with path.open("rb") as f:
        if whole:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        else:
            h.update(f"{st.st_size}:{st.st_mtime_ns}:".encode())
            h.update(f.read(EDGE))
            f.seek(st.st_size - EDGE)
            h.update(f.read(EDGE))
    _HASHES[memo] = digest = ("" if whole else "partial:") + h.hexdigest()
    return digest


def file_fingerprint(path: Path, what: str) -> dict:
    """{name, sha256} of one file the user named (scores, plan, thresholds); a missing file is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path}: no such file")
    return {"name": path.name, "sha256": file_digest(path)}


def data_fingerprint(spec: str | None) -> Any:
    """'self' / None as they are; text data as the ordered (name, sha256) of every file the spec resolves to;
    several comma-separated sources (mixed in equal shares) as the list of theirs."""
    if spec in (None, "self"):
        return spec
    from compress.inputs import resolve_text_files, split_sources

    sources = split_sources(spec)
    if len(sources) > 1:
        return {"sources": [data_fingerprint(s) for s in sources], "mix": "equal"}
    return {"files": [[f.name, file_digest(f)] for f in resolve_text_files(spec)]}


def model_fingerprint(spec: str) -> dict:
    """A zoo entry (pinned package and version), or every file of a model directory / weights file."""
    from compress.models.zoo import ZOO

    if spec in ZOO:
        return {"zoo": asdict(ZOO[spec])}
    path = Path(spec).expanduser()
    if path.is_file():
        return {"file": [path.name, file_digest(path, whole=False)]}
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        return {"dir": [[str(p.relative_to(path)), file_digest(p, whole=False)] for p in files]}
    raise UserError(f"model {spec}: not a zoo name and no such file or directory")


def jsonable(obj: Any) -> Any:
    """A JSON-ready copy: paths and other objects as strings, dataclasses as dicts, NaN/inf as null."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        items = sorted(obj, key=str) if isinstance(obj, set | frozenset) else obj
        return [jsonable(v) for v in items]
    if isinstance(obj, bool) or obj is None or isinstance(obj, int | str):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "__dataclass_fields__"):
        return jsonable(asdict(obj))
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        try:
            return jsonable(obj.item())
        except (TypeError, ValueError, RuntimeError):
            pass
    return str(obj)


def read_done(step_dir: Path, key: str) -> dict | None:
    """The step's done.json when it exists, parses and carries `key`; else None (the step must run)."""
    path = Path(step_dir) / DONE
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return body if isinstance(body, dict) and body.get("key") == key else None


def write_done(step_dir: Path, body: dict) -> None:
    """Write done.json atomically: the last file a step writes, the one that marks it complete."""
    from compress.atomic import write_json

    write_json(Path(step_dir) / DONE, jsonable(body))
