"""`compress reparam` as a function: load a model, apply reparameterization passes in order (each checked for
equivalence), save."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.errors import UserError
from compress.reparam.passes import apply_passes, check_passes, module_counts, sample_inputs_for


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
