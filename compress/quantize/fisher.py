"""The diagonal Fisher of the calibration loss, and the distortion table it predicts (`--measure fisher`): every
unit × candidate as ½ Σ F ΔW², with no replay of the model."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from compress.quantize.distortion import DistortionTable, Unit
    from compress.quantize.spec import QuantSpec


def fisher_squares(model: torch.nn.Module, names: list[str], windows, advance=None) -> dict[str, torch.Tensor]:
    """The per-token diagonal empirical Fisher of each named module's weight: Σ over calibration windows of the
    squared gradient of the window's summed next-token NLL, over the number of predicted tokens, in weight_matrix
    orientation ([out, in]; tied weights once)."""
    raw = {p: model.get_submodule(p).weight for p in names}
    flags = {p: w.requires_grad for p, w in raw.items()}
    sq = {p: torch.zeros_like(raw[p], dtype=torch.float32) for p in names}
    tokens = 0
    try:
        for p in names:
            raw[p].requires_grad_(True)
        with torch.enable_grad():
            for ids, mask in zip(windows.input_ids, windows.attention_mask, strict=True):
                model.zero_grad(set_to_none=True)
                labels = ids.masked_fill(mask == 0, -100)
                count = int((mask[:-1].bool() & mask[1:].bool()).sum())
                loss = model(input_ids=ids[None], attention_mask=mask[None], labels=labels[None], use_cache=False).loss
                (loss * count).backward()  # the window's summed NLL
                tokens += count
                done: set[int] = set()
                for p in names:
                    if id(raw[p]) not in done:  # a tied weight's gradient holds both uses: count it once
                        sq[p] += raw[p].grad.detach().float() ** 2
                        done.add(id(raw[p]))
                if advance is not None:
                    advance()
    finally:
        model.zero_grad(set_to_none=True)
        for p, f in flags.items():
            raw[p].requires_grad_(f)
    n = max(tokens, 1)
    return {p: (sq[p] / n).t() if type(model.get_submodule(p)).__name__ == "Conv1D" else sq[p] / n for p in names}


def predict_fisher(loaded, lmap, windows, units: list[Unit], candidates: list[QuantSpec],
                   allowed: list[list[bool]] | None = None, progress=None, lazy=None,
                   offload_dir=None, imatrix=None) -> DistortionTable:
    """Predicted divergence of every unit × candidate with no replay: ½ Σ F ΔW² over the unit's weights, F the
    per-token diagonal Fisher of the calibration NLL, ΔW the candidate's RTN error (KL(p ‖ p + δ) ≈ ½ δᵀ F δ to
    second order; the diagonal drops the cross terms). Computed block by block (compress.stream.fisher) on `lazy`,
    or on the model in memory. With `imatrix`, ΔW is importance-weighted RTN's error."""
    from compress.stream.fisher import predict_blockwise
    from compress.stream.lazy import LazyModel

    lazy = lazy or LazyModel.resident(loaded, lmap)
    return predict_blockwise(lazy, windows, units, candidates, allowed, progress, offload_dir, imatrix)
