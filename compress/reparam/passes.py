"""The reparameterization passes by name (one registry), and `apply_passes`: run them in order, each checked for
equivalence."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.errors import UserError
from compress.reparam.record import Record


def _fold_bn(model, inputs, **kw):
    from compress.reparam import bn_fold

    return bn_fold.apply(model, inputs, tol=kw.get("tol"))


def _merge_branches(model, inputs, **kw):
    from compress.reparam import repvgg

    return repvgg.apply(model, inputs, tol=kw.get("tol"))


def _fold_norm(model, inputs, **kw):
    from compress.reparam import norm_fold

    return norm_fold.apply(model, inputs, untie=kw.get("untie", False), tol=kw.get("tol"))


def _merge_linear(model, inputs, **kw):
    from compress.reparam import merge_linear

    return merge_linear.apply(model, inputs, allow_growth=kw.get("allow_growth", False), tol=kw.get("tol"))


def _merge_lora(model, inputs, **kw):
    from compress.reparam import lora_merge

    if kw.get("adapter") is None:
        raise UserError("merge-lora needs the adapter directory (--merge-lora DIR)")
    return lora_merge.apply(model, kw["adapter"], inputs, tol=kw.get("tol"))


PASSES: dict[str, Callable[..., Record]] = {
    "merge-lora": _merge_lora,
    "fold-bn": _fold_bn,
    "merge-branches": _merge_branches,
    "fold-norm": _fold_norm,
    "merge-linear": _merge_linear,
}
CNN_IMAGE = 224  # sample image side for zoo CNNs (ImageNet resolution)


def sample_inputs_for(loaded, batch: int = 2, seed: int = 0) -> Any:
    """Random inputs fitting the model: ImageNet-size images for zoo CNNs, token ids for transformers models."""
    from compress.reparam.check import default_inputs

    if loaded.kind == "cnn":
        first = next((m for m in loaded.module.modules() if isinstance(m, nn.Conv2d)), None)
        ch = first.in_channels if first is not None else 3
        return torch.randn(batch, ch, CNN_IMAGE, CNN_IMAGE, generator=torch.Generator().manual_seed(seed))
    return default_inputs(loaded.module, batch=batch, seed=seed)


def apply_passes(model: nn.Module, passes: list[str], sample_inputs: Any = None, untie: bool = False,
                 allow_mismatch: bool = False, allow_growth: bool = False, tol: float | None = None,
                 progress: Callable[[str], None] | None = None, adapter: Path | None = None) -> list[Record]:
    """Apply `passes` to `model` in order; UserError when a pass changes the outputs (unless allow_mismatch)."""
    check_passes(passes)
    records = []
    for name in passes:
        rec = PASSES[name](model, sample_inputs, untie=untie, allow_growth=allow_growth, tol=tol, adapter=adapter)
        records.append(rec)
        if progress:
            progress(f"{name}: {rec.count} change(s) in {rec.seconds:.2f} s")
        eq = rec.equivalence or {}
        if not rec.passed and not allow_mismatch:
            raise UserError(f"{name}: outputs changed beyond tolerance (max abs diff {eq.get('max_abs_diff', '?'):.3g} "
                            f"> {eq.get('tolerance', float('nan')):.3g}, cosine {eq.get('cosine', float('nan')):.6f}); "
                            "the model was not saved")
    return records


def check_passes(passes: list[str]) -> None:
    """UserError for an empty list or an unknown pass name."""
    if not passes:
        raise UserError(f"no passes given: choose from {', '.join(PASSES)}")
    unknown = [p for p in passes if p not in PASSES]
    if unknown:
        raise UserError(f"unknown pass '{unknown[0]}': choose from {', '.join(PASSES)}")


def module_counts(module: nn.Module) -> dict[str, int]:
    """How many BatchNorm, norm, Conv and Linear modules the model has (the structure passes remove/merge)."""
    from torch.nn.modules.batchnorm import _BatchNorm

    from compress.reparam.norm_fold import is_norm

    mods = list(module.modules())
    return {"batchnorm": sum(isinstance(m, _BatchNorm) for m in mods),
            "conv": sum(isinstance(m, nn.modules.conv._ConvNd) for m in mods),
            "linear": sum(isinstance(m, nn.Linear) for m in mods),
            "norm": sum(is_norm(m) for m in mods)}
