"""`run_reparam`: load a model, apply reparameterization passes in order (each checked for equivalence), save."""

from __future__ import annotations

import time
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


def run_reparam(model: Any, passes: list[str], out: Path | None = None, *, sample_inputs: Any = None,
                untie: bool = False, allow_mismatch: bool = False, allow_growth: bool = False,
                tol: float | None = None, arch: str | None = None, trust_pickle: bool = False,
                progress: Callable[[str], None] | None = None, adapter: Path | None = None) -> dict[str, Any]:
    """Apply `passes` (fold-bn, merge-branches, fold-norm, merge-linear) in order to `model` (a spec for
    compress.models.load_model, a LoadedModel or an nn.Module, changed in place) and save to `out` when given.

    Returns a JSON-ready dict: the records ({pass, changes, count, equivalence, notes, seconds}), the end-to-end
    equivalence against the model as loaded, parameter and module counts before/after, and `out`."""
    from compress.models.load import LoadedModel, load_model
    from compress.reparam.check import compare, outputs

    check_passes(passes)
    t0 = time.perf_counter()
    if isinstance(model, LoadedModel):
        loaded = model
    elif isinstance(model, nn.Module):
        loaded = LoadedModel(model, None, "cnn" if _has_conv(model) else "module", type(model).__name__,
                             type(model).__name__)
    else:
        loaded = load_model(str(model), arch=arch, trust_pickle=trust_pickle)
    manifest = loaded.extra.get("manifest")
    if manifest is not None and manifest.get("format") != "compress-reparam-v1":
        raise UserError(f"{loaded.spec} is a compress artifact ({manifest.get('format')}): reparameterize the float "
                        "model, then compress the result")
    module = loaded.module
    inputs = sample_inputs if sample_inputs is not None else sample_inputs_for(loaded)
    before = {"params": _params(module), "modules": module_counts(module)}
    reference = outputs(module, inputs)
    records = apply_passes(module, passes, inputs, untie=untie, allow_mismatch=allow_mismatch,
                           allow_growth=allow_growth, tol=tol, progress=progress, adapter=adapter)
    overall = compare(reference, outputs(module, inputs), *(() if tol is None else (tol,)))
    if "merge-lora" in passes:  # the merge changes the outputs on purpose: each pass was checked against its own
        overall = {**overall, "pass": all(r.passed for r in records),  # reference (the adapter unmerged)
                   "note": "end to end vs the base model without the adapter: differs by the adapter's effect"}
    result: dict[str, Any] = {
        "model": loaded.spec, "kind": loaded.kind, "family": loaded.family, "passes": list(passes),
        "records": [r.to_dict() for r in records], "changes": sum(r.count for r in records),
        "equivalence": overall, "params_before": before["params"], "params_after": _params(module),
        "modules_before": before["modules"], "modules_after": module_counts(module),
        "inputs": _describe(inputs),
    }
    if manifest is not None:
        result["previous"] = manifest.get("reparam")
    result["seconds"] = round(time.perf_counter() - t0, 3)
    if out is not None:
        from compress.reparam.artifact import save_reparam

        prev = (manifest or {}).get("edits", [])
        save_reparam(loaded, [{"edits": prev}, *result["records"]], Path(out), result)
        result["out"] = str(out)
    return result


def module_counts(module: nn.Module) -> dict[str, int]:
    """How many BatchNorm, norm, Conv and Linear modules the model has (the structure passes remove/merge)."""
    from torch.nn.modules.batchnorm import _BatchNorm

    from compress.reparam.norm_fold import is_norm

    mods = list(module.modules())
    return {"batchnorm": sum(isinstance(m, _BatchNorm) for m in mods),
            "conv": sum(isinstance(m, nn.modules.conv._ConvNd) for m in mods),
            "linear": sum(isinstance(m, nn.Linear) for m in mods),
            "norm": sum(is_norm(m) for m in mods)}


def _has_conv(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.conv._ConvNd) for m in module.modules())


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _describe(inputs: Any) -> Any:
    if isinstance(inputs, torch.Tensor):
        return {"shape": list(inputs.shape), "dtype": str(inputs.dtype).replace("torch.", "")}
    if isinstance(inputs, dict):
        return {k: _describe(v) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    if isinstance(inputs, (tuple, list)):
        return [_describe(v) for v in inputs]
    return type(inputs).__name__
