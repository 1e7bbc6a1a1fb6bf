"""Artifact directories: packed weights (safetensors) + config + tokenizer + compress.json, saved atomically; the
building blocks every format's loader uses (skeleton, strict weight loading). Loading by format: artifact_formats."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compress.atomic import atomic_dir
from compress.errors import UserError
from compress.version import __version__

if TYPE_CHECKING:
    import torch

MANIFEST = "compress.json"
FORMAT = "compress-packed-v1"
def is_artifact(path: Path) -> bool:
    """True for a directory written by `save_artifact`."""
    return (Path(path) / MANIFEST).is_file()


def save_artifact(loaded, specs: dict, out: Path, manifest: dict[str, Any],
                  storage: dict[str, torch.dtype] | None = None, extra=None) -> Path:
    """Write the (already quantized) model in `loaded` to `out` with its specs and manifest; float tensors the
    quantization left alone are stored in their `storage` dtype (the source checkpoint's); `extra(dir)` writes
    further files into the directory before it is installed."""
    return save_dir(loaded, out, FORMAT, manifest_fields(specs, manifest), storage=storage, extra=extra)


def manifest_fields(specs: dict, manifest: dict[str, Any]) -> dict[str, Any]:
    """The compress.json fields of a quantized artifact: every module's spec, then the run's manifest."""
    return {"modules": {n: s.to_dict() for n, s in specs.items()}, **manifest}


def save_dir(loaded, out: Path, fmt: str, fields: dict[str, Any], weights_format: str | None = None,
             storage: dict[str, torch.dtype] | None = None, extra=None) -> Path:
    """Write `loaded` to `out` atomically: safetensors shards (tied tensors once, tagged `weights_format`, default
    `fmt`; see compress.stream.shards), config, tokenizer and compress.json = {format, tool_version, base, family,
    kind, pooling, **fields}."""
    from compress.stream.shards import ShardWriter, as_stored, block_groups

    out = Path(out)
    state = as_stored(_dedupe({k: v.contiguous() for k, v in loaded.module.state_dict().items()}), storage or {})
    with atomic_dir(out, expected_bytes=sum(v.numel() * v.element_size() for v in state.values())) as tmp:
        writer = ShardWriter(tmp, metadata={"format": weights_format or fmt})
        for group in block_groups(state, *_stack(loaded.module)):
            writer.add(group)
        writer.finish()
        write_beside(loaded, tmp, fmt, fields)
        if extra is not None:
            extra(tmp)
    return out


def write_beside(loaded, root: Path, fmt: str, fields: dict[str, Any]) -> None:
    """Config, tokenizer and compress.json beside the weights."""
    loaded.module.config.save_pretrained(root)
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(root)
    body = {"format": fmt, "tool_version": __version__, "base": loaded.spec, "family": loaded.family,
            "kind": loaded.kind, "pooling": loaded.pooling, **fields}
    (Path(root) / MANIFEST).write_text(json.dumps(body, indent=2) + "\n")


def _stack(model) -> tuple[str, int]:
    """(blocks path, number of blocks) for grouping the shards; ("", 0) when the model has no block stack."""
    from compress.models.stack import find_block_stack

    try:
        path, blocks = find_block_stack(model)
    except UserError:
        return "", 0
    return path, len(blocks)


def skeleton(path: Path) -> torch.nn.Module:
    """The model of DIR/config.json in fp32 with uninitialised weights, in eval mode: what every loader fills."""
    import torch
    from transformers import AutoConfig
    from transformers.modeling_utils import no_init_weights

    from compress.models.hf import check_remote_code, model_class

    remote = check_remote_code(path, str(path))
    config = AutoConfig.from_pretrained(path, trust_remote_code=remote)
    with no_init_weights():
        model = model_class(config, str(path)).from_config(config, dtype=torch.float32, trust_remote_code=remote)
    return model.eval()


def rebuild(path: Path, manifest: dict[str, Any], restructure, what: str = "the manifest"):
    """A LoadedModel from an artifact dir: skeleton from config, `restructure(model)` (the format's structural
    edits), weights loaded strictly, tied weights restored."""
    model = skeleton(path)
    restructure(model)
    if getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    load_weights(model, path, what)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return loaded_from(model, path, manifest)


def load_weights(model: torch.nn.Module, path: Path, what: str = "the manifest") -> None:
    """Load DIR's safetensors weights (one file or shards) into `model`: every tensor must fit (tied copies and
    rotary buffers aside); otherwise one UserError naming the directory and a tensor that does not match `what`."""
    from safetensors.torch import load_file

    from compress.stream.checkpoint import weight_files

    state = {}
    for weights in weight_files(Path(path)):
        try:
            state.update(load_file(str(weights)))
        except Exception as exc:  # safetensors raises its own types on truncated or corrupted files
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise UserError(f"{weights}: unreadable ({first}); the file is truncated or damaged, re-create it"
                            ) from exc
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # size mismatch
        raise UserError(f"{path}: weights do not match {what} ({str(exc).splitlines()[-1].strip()})") from exc
    shared = _shared_with_loaded(model, state)
    missing = [m for m in missing if not m.endswith("inv_freq") and m not in shared]
    if missing or unexpected:
        raise UserError(f"{path}: weights do not match {what} ({len(missing)} missing, {len(unexpected)} "
                        f"unexpected tensors, e.g. {(missing + unexpected)[0]})")


def loaded_from(model: torch.nn.Module, path: Path, manifest: dict[str, Any]):
    """The LoadedModel of an artifact directory, its manifest kept in extra."""
    from compress.models.hf import LoadedModel, load_tokenizer

    loaded = LoadedModel(model, load_tokenizer(path), manifest.get("kind", "decoder"), model.config.model_type,
                         str(path), Path(path), manifest.get("pooling", "mean"))
    loaded.extra["manifest"] = manifest
    return loaded


def _shared_with_loaded(model: torch.nn.Module, state: dict) -> set[str]:
    """Names of tensors tied to a tensor that was loaded (e.g. lm_head.weight tied to the embedding)."""
    sd = model.state_dict(keep_vars=True)
    loaded_ptrs = {sd[k].data_ptr() for k in state if k in sd}
    return {k for k, v in sd.items() if k not in state and v.data_ptr() in loaded_ptrs}


def _dedupe(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared storage: keep the first name of tied tensors (tie_weights restores the rest)."""
    seen: dict[int, str] = {}
    out = {}
    for k, v in state.items():
        key = v.data_ptr()
        if v.numel() and key in seen:
            continue
        seen[key] = k
        out[k] = v
    return out
