"""Every artifact format and its loader, by explicit import: `load_artifact(DIR)` reads compress.json and hands the
directory to the loader of its format. A new format adds one import and one line to FORMATS."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from compress.artifact import FORMAT, MANIFEST, load_weights, loaded_from, skeleton
from compress.errors import UserError
from compress.models.hf import LoadedModel
from compress.moe.balanced import load_balanced, restructure_balanced
from compress.moe.prune_artifact import load_moe_pruned, restructure_pruned
from compress.prune.artifact import load_pruned
from compress.prune.width import load_width_pruned
from compress.reparam.artifact import load_reparam


def load_packed(path: Path, manifest: dict[str, Any]) -> LoadedModel:
    """A quantized artifact: the skeleton from config (restructured as its source was), modules swapped for the
    packed specs, weights loaded strictly."""
    from compress.models.layers import layer_map
    from compress.quantize.apply import apply_plan
    from compress.quantize.spec import QuantSpec

    model = skeleton(path)
    for key, restructure in STRUCTURE.items():
        if key in manifest:
            restructure(model, manifest, path)
    if getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    lmap = layer_map(model)
    specs = {n: QuantSpec(**d) for n, d in manifest["modules"].items()}
    apply_plan(model, lmap, specs, empty=True)
    load_weights(model, path)
    if hasattr(model, "tie_weights") and not any(n == lmap.embeddings for n in specs):
        model.tie_weights()
    return loaded_from(model, path, manifest)


# format (compress.json "format") -> loader(path, manifest)
FORMATS: dict[str, Callable[[Path, dict[str, Any]], LoadedModel]] = {
    FORMAT: load_packed,
    "compress-pruned-v1": load_pruned,
    "compress-width-v1": load_width_pruned,
    "compress-reparam-v1": load_reparam,
    "compress-moe-v1": load_balanced,
    "compress-moe-pruned-v1": load_moe_pruned,
}
# Manifest fields describing structure beyond config.json -> restructure(model, manifest, path). A quantized
# artifact made from such an artifact keeps the fields, and load_packed applies them first.
STRUCTURE: dict[str, Callable[[torch.nn.Module, dict[str, Any], Path], None]] = {
    "experts_per_layer": restructure_pruned,
    "moe_balance": restructure_balanced,
}


def load_artifact(path: Path) -> LoadedModel:
    """The model of an artifact directory written by any compress verb, checked against its file records first."""
    from compress.integrity import check_before_use

    path = Path(path)
    check_before_use(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except ValueError as exc:
        raise UserError(f"{path}/{MANIFEST}: not valid JSON ({exc})") from exc
    loader = FORMATS.get(manifest.get("format"))
    if loader is None:
        raise UserError(f"{path}: unknown artifact format {manifest.get('format')!r} (one of {', '.join(FORMATS)})")
    return loader(path, manifest)
