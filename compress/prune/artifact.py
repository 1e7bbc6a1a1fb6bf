"""Artifact dirs of sublayer-pruned models: the remaining weights (safetensors), config, tokenizer and compress.json
listing the removed sublayers; `compress load` rebuilds the skeleton, puts Removed modules in place and loads.

The safetensors metadata format is ours, so transformers' from_pretrained refuses the file instead of silently
re-initialising the removed weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from compress.artifact import MANIFEST, load_weights, loaded_from, save_dir
from compress.errors import UserError

FORMAT = "compress-pruned-v1"


def save_pruned(loaded, removed_modules: dict[str, dict], out: Path, manifest: dict[str, Any]) -> Path:
    """Write the pruned model in `loaded` (Removed modules in place) to `out`, atomically."""
    return save_dir(loaded, out, FORMAT, {"removed_modules": removed_modules, **manifest})


def load_pruned(path: Path, manifest: dict[str, Any]):
    """Rebuild a model saved by `save_pruned`: skeleton from config, Removed modules swapped in, weights loaded."""
    from transformers import AutoConfig
    from transformers.modeling_utils import no_init_weights

    from compress.models.load import _model_class
    from compress.prune.sublayers import Removed, swap

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    with no_init_weights():
        model = _model_class(config, str(path)).from_config(config, dtype=torch.float32)
    model.eval()
    try:
        swap(model, {p: Removed(**spec) for p, spec in manifest["removed_modules"].items()})
    except (AttributeError, KeyError, TypeError) as exc:
        raise UserError(f"{path}/{MANIFEST}: removed_modules do not fit the model in config.json ({exc})") from exc
    if getattr(config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    load_weights(model, path)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return loaded_from(model, path, manifest)
