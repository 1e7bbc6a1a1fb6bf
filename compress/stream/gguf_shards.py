"""A GGUF file as an HF directory of safetensors shards, converted one tensor at a time (dequantized to fp32 by
gguf-py, reordered by transformers' own GGUF tensor processors, named by its GGUF→HF name map), block by block, so
a model larger than memory is never dequantized whole. Done once per file: the result is cached and streamed."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import torch

from compress.errors import UserError
from compress.stream.shards import ShardWriter

DONE = ".converted"  # written last: a directory without it is an interrupted conversion


def cached_conversion(path: Path, progress=None) -> Path:
    """The converted directory of GGUF `path` in the cache (converted now if missing); keyed by the file's name,
    size and first MiB, so a changed file converts again."""
    from compress.atomic import atomic_dir
    from compress.models.zoo import cache_root

    path = Path(path).expanduser().absolute()
    with open(path, "rb") as f:
        head = hashlib.sha256(f.read(2**20) + str(path.stat().st_size).encode()).hexdigest()[:16]
    out = cache_root() / "gguf" / f"{path.stem}-{head}"
    if (out / DONE).is_file():
        return out
    with atomic_dir(out) as tmp:
        convert_gguf(path, tmp, progress)
        (tmp / DONE).write_text(str(path) + "\n")
    return out


def convert_gguf(path: Path, out: Path, progress=None) -> None:
    """Write GGUF `path` into `out` as config, tokenizer and fp32 safetensors shards (block by block)."""
    from accelerate import init_empty_weights
    from gguf import GGUFReader, dequantize
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
        read_field,
    )

    from compress.models.hf import quiet_transformers

    quiet_transformers()
    path, out = Path(path), Path(out)
    try:
        parsed = load_gguf_checkpoint(str(path), return_tensors=False)  # config and tokenizer fields only
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, KeyError, OSError) as exc:
        raise UserError(f"cannot convert GGUF {path}: {str(exc).splitlines()[0]}") from exc
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    names = get_gguf_hf_weights_map(skeleton)
    reader = GGUFReader(str(path))
    arch = read_field(reader, "general.architecture")[0]
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=parsed["config"])
    groups: dict[int, list] = {}
    last = int(config.num_hidden_layers)
    for t in reader.tensors:
        m = re.match(r"blk\.(\d+)\.", t.name)
        groups.setdefault(int(m.group(1)) if m else last, []).append(t)
    writer = ShardWriter(out)
    task = progress.add_task("convert GGUF blocks", total=len(groups)) if progress is not None else None
    for g in sorted(groups):
        tensors = {}
        for t in groups[g]:
            r = processor.process(weights=dequantize(t.data, t.tensor_type), name=t.name,
                                  tensor_key_mapping=names, parsed_parameters=parsed)
            if r.name in names:
                tensors[names[r.name]] = torch.from_numpy(np.array(r.weights, dtype=np.float32))
        writer.add(tensors)
        if task is not None:
            progress.advance(task)
    writer.finish()
    config.save_pretrained(out)
    if skeleton.generation_config is not None:
        skeleton.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)


def gguf_params(path: Path) -> int:
    """Parameters in a GGUF file (from its tensor headers; nothing is dequantized)."""
    from gguf import GGUFReader

    return sum(int(t.n_elements) for t in GGUFReader(str(path)).tensors)
