"""Artifact dirs of expert-pruned MoE models: remaining weights, config, tokenizer and compress.json with the kept
expert ids per layer; the loader rebuilds the skeleton from config, cuts every MoE layer to its stored expert count
and loads the weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compress.artifact import MANIFEST, rebuild, save_dir
from compress.errors import UserError

FORMAT = "compress-moe-pruned-v1"


def save_moe_pruned(loaded, plan: Any, out: Path, manifest: dict[str, Any] | None = None) -> Path:
    """Write the expert-pruned model in `loaded` to `out` atomically; `plan` is a MoePrunePlan or its dict (or the
    record of prune_experts)."""
    body = plan.to_dict() if hasattr(plan, "to_dict") else dict(plan)
    layers = {str(i): {"kept": list(r["kept"]), "dropped": list(r["dropped"]),
                       "merged_into": {str(d): k for d, k in r.get("merged_into", {}).items()}}
              for i, r in body["layers"].items()}
    from compress.moe.layout import moe_layers

    counts = {str(ly.index): ly.num_experts for ly in moe_layers(loaded.module)}
    for i, r in layers.items():
        if i in counts and counts[i] != len(r["kept"]):
            raise UserError(f"plan: layer {i} keeps {len(r['kept'])} experts but the model has {counts[i]}; save "
                            "the model the plan was applied to")
    fields = {"moe_layers": layers, "experts_per_layer": counts,
              "moe_prune": {k: v for k, v in body.items() if k not in ("layers", "experts_per_layer")},
              **(manifest or {})}
    return save_dir(loaded, out, FORMAT, fields)


def load_moe_pruned(path: Path, manifest: dict[str, Any]):
    """Rebuild a model saved by `save_moe_pruned`: skeleton from config, experts cut to the stored counts, weights."""
    path = Path(path)
    return rebuild(path, manifest, lambda model: restructure_pruned(model, manifest, path))


def restructure_pruned(model, manifest: dict[str, Any], path: Path | str = "artifact") -> None:
    """Cut a freshly built model's experts to the counts in `manifest["experts_per_layer"]` (in place)."""
    from compress.moe.layout import moe_family, moe_layers
    from compress.moe.prune import slice_block, sync_config

    family, _ = moe_family(model)
    try:
        counts = {int(i): int(n) for i, n in manifest["experts_per_layer"].items()}
    except (KeyError, AttributeError, TypeError, ValueError) as exc:
        raise UserError(f"{path}/{MANIFEST}: experts_per_layer missing or malformed ({exc}); re-save the model "
                        "with save_moe_pruned") from exc
    layers = {ly.index: ly for ly in moe_layers(model)}
    for i, n in counts.items():
        if i not in layers or not 1 <= n <= layers[i].num_experts:
            have = layers[i].num_experts if i in layers else 0
            raise UserError(f"{path}/{MANIFEST}: layer {i} stores {n} experts but the model in config.json has "
                            f"{have} there; the manifest and config.json do not belong together")
        if n < layers[i].num_experts:
            slice_block(model.get_submodule(layers[i].path), family, list(range(n)))
    sync_config(model)
