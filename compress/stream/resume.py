"""`--resume`: what an interrupted streamed run was asked (a hash of its inputs: options, plan file, calibration
tokens, the model's weight bytes) and what it had decided (the plan), kept in its partial output directory, so a
later run continues it only when it would make the same artifact."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from compress.atomic import RESUME_RECORD
from compress.errors import UserError

CHUNK = 16 * 2**20


def inputs_digest(options: dict, files: list[Path], extra: list[str]) -> str:
    """sha256 of the options (JSON, sorted), the `extra` strings (e.g. a token hash) and the bytes of `files`."""
    h = hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode())
    for e in extra:
        h.update(e.encode())
    for f in files:
        h.update(Path(f).name.encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(CHUNK):
                h.update(chunk)
    return h.hexdigest()


def check_resumable(out: Path, digest: str) -> None:
    """UserError unless an interrupted run of `out` with these inputs is there to continue (nothing is changed)."""
    from compress.atomic import partial_dir

    record = partial_dir(out) / RESUME_RECORD
    if not record.is_file():
        raise UserError(f"--resume: there is no interrupted run of --out {out} to continue; drop --resume")
    if json.loads(record.read_text(encoding="utf-8")).get("inputs") != digest:
        raise UserError(f"--resume: the interrupted run of --out {out} had other inputs (model weights, data or "
                        "options); run the same command again, or drop --resume to start over")


class ResumeRecord:
    """RESUME_RECORD in a partial output directory: the inputs' digest and what the run decided so far (read back
    when resuming, after check_resumable)."""

    def __init__(self, root: Path, digest: str, resume: bool):
        self.path = Path(root) / RESUME_RECORD
        if resume:
            self.body = json.loads(self.path.read_text(encoding="utf-8"))
        else:
            self.body = {"inputs": digest}
            self._write()

    def get(self, key: str):
        """What the run recorded under `key` (None if it had not got there)."""
        return self.body.get(key)

    def put(self, **values) -> None:
        """Record `values` (JSON) for a later --resume."""
        self.body.update(values)
        self._write()

    def _write(self) -> None:
        tmp = self.path.with_name(self.path.name + ".part")
        tmp.write_text(json.dumps(self.body) + "\n", encoding="utf-8")
        tmp.replace(self.path)
