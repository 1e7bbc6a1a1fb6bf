"""A model directory's safetensors weights (one file, or Hugging Face shards + index), read tensor by tensor.

Nothing is read until asked for: the headers give every tensor's dtype and shape; `read` memory-maps the file with
`safe_open` and copies out only the named tensors, so a model larger than memory can be visited block by block.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from compress.errors import UserError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


class Checkpoint:
    """The tensors of DIR/model.safetensors or DIR/model-0000k-of-0000n.safetensors (through the index json)."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = Path(path)
        self.files = weight_files(self.path)
        self.where: dict[str, Path] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.bytes_read = 0  # for progress: how much of the checkpoint has been read so far
        for f in self.files:
            try:
                with safe_open(str(f), framework="pt") as h:
                    for name in h.keys():  # noqa: SIM118 (safe_open has no __iter__)
                        s = h.get_slice(name)
                        self.where[name] = f
                        self.dtypes[name] = _DTYPES.get(s.get_dtype(), torch.uint8)
                        self.shapes[name] = tuple(s.get_shape())
            except Exception as exc:  # safetensors raises its own types on a damaged header
                raise UserError(f"{f}: unreadable safetensors header ({str(exc).splitlines()[0][:160]}); the "
                                "file is truncated or damaged, re-create it") from exc

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors, copied out of the memory-mapped files in their stored dtype."""
        from safetensors import safe_open

        out: dict[str, torch.Tensor] = {}
        by_file: dict[Path, list[str]] = {}
        for n in names:
            if n not in self.where:
                raise UserError(f"{self.path}: no tensor {n} in its safetensors files; the checkpoint does not "
                                "match its config.json")
            by_file.setdefault(self.where[n], []).append(n)
        for f, group in by_file.items():
            with safe_open(str(f), framework="pt") as h:
                for n in group:
                    t = h.get_tensor(n)
                    self.bytes_read += t.numel() * t.element_size()
                    out[n] = t
        return out


def has_checkpoint(path: Path) -> bool:
    """True when DIR holds safetensors weights this module can read lazily."""
    return (Path(path) / SINGLE).is_file() or (Path(path) / INDEX).is_file()


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of DIR: the shards its index names, or model.safetensors."""
    if (path / INDEX).is_file():
        try:
            index = json.loads((path / INDEX).read_text(encoding="utf-8"))
            files = sorted(set(index["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise UserError(f"{path / INDEX}: unreadable shard index ({exc}); re-create the checkpoint") from exc
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise UserError(f"{path}: shard {missing[0]} named in {INDEX} is missing; copy the whole checkpoint")
        return [path / f for f in files]
    if (path / SINGLE).is_file():
        return [path / SINGLE]
    raise UserError(f"{path}: no {SINGLE} or {INDEX}; streaming reads safetensors checkpoints (convert .bin/.pt "
                    "with transformers' save_pretrained first)")


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
