"""Weights written as Hugging Face writes them: `model.safetensors` when they fit one shard, else
`model-0000k-of-0000n.safetensors` + `model.safetensors.index.json`. Groups (a block, or the tensors outside the
stack) are added in order and never split; a shard is written as soon as the next group would overflow it, so a
streaming run holds at most one shard of output in memory. The in-memory and streaming paths feed the same groups
in the same order, hence the same bytes."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from compress.stream.checkpoint import INDEX, SINGLE

SHARD_BYTES = 256 * 2**20  # small enough to hold while the next block is worked on


class ShardWriter:
    """Accumulate groups of tensors; write a shard whenever the next group would make it exceed `max_bytes`."""

    def __init__(self, root: Path, max_bytes: int | None = None, metadata: dict[str, str] | None = None):
        self.root, self.metadata = Path(root), metadata or {}
        self.max_bytes = max_bytes if max_bytes is not None else SHARD_BYTES
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """One group (e.g. a block): goes to the current shard, or starts the next one if it would not fit."""
        size = sum(_nbytes(t) for t in tensors.values())
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending.update({k: v.contiguous() for k, v in tensors.items()})
        self.pending_bytes += size

    def finish(self) -> list[Path]:
        """Write the last shard, give the shards their final names (and the index when there are several)."""
        if self.pending or not self.written:
            self._flush()
        n = len(self.written)
        weight_map: dict[str, str] = {}
        final = []
        for k, (tmp, names) in enumerate(self.written, start=1):
            name = SINGLE if n == 1 else f"model-{k:05d}-of-{n:05d}.safetensors"
            tmp.rename(self.root / name)
            final.append(self.root / name)
            weight_map.update(dict.fromkeys(names, name))
        if n > 1:
            index = {"metadata": {"total_size": self.total, **self.metadata},
                     "weight_map": dict(sorted(weight_map.items()))}
            (self.root / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return final

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.root / f".shard-{len(self.written) + 1:05d}.safetensors"
        save_file(self.pending, str(path), metadata=self.metadata)
        self.written.append((path, sorted(self.pending)))
        self.total += self.pending_bytes
        self.pending, self.pending_bytes = {}, 0


def block_groups(state: dict[str, torch.Tensor], blocks_path: str, num_blocks: int) -> list[dict[str, torch.Tensor]]:
    """The state split into the groups both paths write in this order: block 0 … block N−1, then the rest."""
    groups: list[dict[str, torch.Tensor]] = [{} for _ in range(num_blocks + 1)]
    prefix = blocks_path + "."
    for name, t in state.items():
        if name.startswith(prefix):
            groups[int(name[len(prefix):].split(".", 1)[0])][name] = t
        else:
            groups[-1][name] = t
    return groups


def as_stored(tensors: dict[str, torch.Tensor], dtypes: dict[str, torch.dtype],
              compute: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Tensors still in the compute dtype cast back to the dtype their source checkpoint stores them in (lossless:
    they were read from it unchanged); what a transform made (codes, fp16 scales, fp16 layers) keeps its dtype."""
    out = {}
    for name, t in tensors.items():
        want = dtypes.get(name)
        out[name] = t.to(want) if want is not None and t.dtype == compute and want.is_floating_point else t
    return out


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
