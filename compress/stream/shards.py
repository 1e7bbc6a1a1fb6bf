"""Weights written as Hugging Face writes them: `model.safetensors` when they fit one shard, else
`model-0000k-of-0000n.safetensors` + `model.safetensors.index.json`. Groups (a block, or the tensors outside the
stack) are added in order and never split; each is spooled to disk as it is added (so a killed run keeps it), and
at the end they are packed into shards, one shard in memory at a time. The in-memory and streaming paths feed the
same groups in the same order, hence the same bytes."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from compress.stream.checkpoint import INDEX, SINGLE

SHARD_BYTES = 256 * 2**20  # small enough to hold while the next block is worked on


class ShardWriter:
    """Groups are written as they come, each to its own spool file (complete or absent: written aside and renamed),
    so a run killed midway keeps every finished group and can go on from there (`done`); `finish` packs them into
    shards, a new shard whenever the next group would make the current one exceed `max_bytes`."""

    def __init__(self, root: Path, max_bytes: int | None = None, metadata: dict[str, str] | None = None):
        self.root, self.metadata = Path(root), metadata or {}
        self.max_bytes = max_bytes if max_bytes is not None else SHARD_BYTES
        for part in self.root.glob(".group-*.part"):  # cut short by a kill
            part.unlink()
        self.groups = sorted(self.root.glob(".group-*.safetensors"))  # an interrupted run's finished groups
        if [g.name for g in self.groups] != [_group_name(k) for k in range(len(self.groups))]:
            raise RuntimeError(f"{self.root}: spooled groups are not numbered 0..{len(self.groups) - 1}")

    @property
    def done(self) -> int:
        """How many groups are written."""
        return len(self.groups)

    def add(self, tensors: dict[str, torch.Tensor], notes: dict[str, str] | None = None) -> None:
        """Write one group (e.g. a block) with optional string `notes` kept beside it (see `notes`)."""
        from safetensors.torch import save_file

        path = self.root / _group_name(len(self.groups))
        tmp = path.with_name(path.name + ".part")
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=notes or {})
        tmp.replace(path)
        self.groups.append(path)

    def notes(self, k: int) -> dict[str, str]:
        """The notes written with group k."""
        return _header(self.groups[k]).get("__metadata__", {})

    def finish(self) -> list[Path]:
        """Pack the groups into shards with their final names (and the index when there are several)."""
        from safetensors.torch import load_file, save_file

        shards: list[list[Path]] = []
        size = 0
        for g in self.groups:
            n = _data_bytes(g)
            if not shards or (shards[-1] and size + n > self.max_bytes):
                shards.append([])
                size = 0
            shards[-1].append(g)
            size += n
        if not shards:
            shards = [[]]
        total, weight_map, final = 0, {}, []
        for k, part in enumerate(shards, start=1):
            name = SINGLE if len(shards) == 1 else f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            tensors: dict[str, torch.Tensor] = {}
            for g in part:
                tensors.update(load_file(str(g)))
            save_file(tensors, str(self.root / name), metadata=self.metadata)
            total += sum(_nbytes(t) for t in tensors.values())
            weight_map.update(dict.fromkeys(tensors, name))
            final.append(self.root / name)
            del tensors
            for g in part:
                g.unlink()
        if len(shards) > 1:
            index = {"metadata": {"total_size": total, **self.metadata},
                     "weight_map": dict(sorted(weight_map.items()))}
            (self.root / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        self.groups = []
        return final


def _group_name(k: int) -> str:
    return f".group-{k:05d}.safetensors"


def _header(path: Path) -> dict:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n))


def _data_bytes(path: Path) -> int:
    return sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in _header(path).items() if k != "__metadata__")


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
