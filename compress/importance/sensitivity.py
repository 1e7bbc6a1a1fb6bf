"""Quantization-aware importance: measured damage when one block is quantized, and two cheap predictors of it.

- `sensitivity`: ΔKL (encoders: 1 − cos of pooled embeddings) when only that block's Linears are RTN-quantized to
  3 bits, group 32, symmetric — the quantity the cheap scores are checked against (`compress score --check`).
- `hessian`: Σ over the block's Linears of tr(ΔW H ΔWᵀ), H = XᵀX / n of the Linear's calibration inputs, ΔW the
  same 3-bit quantization error: the output error GPTQ minimises, from one calibration pass.
- `fisher`: Σ over the block's Linears of Σ g² ΔW², g the gradient of the calibration NLL (decoders) — the
  diagonal-Fisher estimate of the KL the same quantization causes (KL ≈ ½ ΔWᵀ F ΔW).
- `imatrix`: Σ over the block's Linears of Σ aⱼ ΔWᵢⱼ², a the importance matrix (mean squared input per channel):
  the diagonal of `hessian`'s H, from the statistics RTN is weighted by.
All three: higher = more important (more damage when quantized).
"""

from __future__ import annotations

import torch

from compress.importance.context import ScoringContext
from compress.importance.report import Scores
from compress.quantize.apply import weight_matrix
from compress.quantize.fisher import fisher_squares
from compress.quantize.rtn import quantize_rtn
from compress.quantize.spec import QuantSpec

DIRECTION = "higher = more important"
CHECK_SPEC = QuantSpec(3, 32, True)


def _check_spec(cols: int) -> QuantSpec:
    """3-bit symmetric RTN in groups of 32, or per channel where 32 does not divide the input width."""
    return CHECK_SPEC if cols % 32 == 0 else QuantSpec(3, 0, True)


def _error(w: torch.Tensor) -> torch.Tensor:
    return quantize_rtn(w, _check_spec(w.shape[1])).dequantize() - w.detach().float()


def score_sensitivity(ctx: ScoringContext) -> Scores:
    """Measured divergence with only block i quantized to 3 bits (RTN, group 32)."""
    from compress.quantize.distortion import measure_kl
    from compress.quantize.pipeline import units_for

    model = ctx.loaded.module
    units = units_for(model, ctx.lmap, "block", embeddings=False)
    specs = {_check_spec(weight_matrix(model.get_submodule(m)).shape[1]) for u in units for m in u.modules}
    spec = CHECK_SPEC if specs == {CHECK_SPEC} else QuantSpec(3, 0, True)  # one spec for all blocks
    table = measure_kl(ctx, units, [spec])
    return Scores(blocks={u.block: row[0] for u, row in zip(table.units, table.distortion, strict=True)})


@torch.inference_mode()
def score_hessian(ctx: ScoringContext) -> Scores:
    """tr(ΔW H ΔWᵀ) per Linear with H from the block's recorded inputs; summed per block and sublayer."""
    from compress.quantize.gptq import HessianCollector

    model, r = ctx.loaded.module, ctx.runner
    out = Scores()
    task = ctx.task("hessian", len(ctx.lmap.blocks))
    for blk in ctx.lmap.blocks:
        collectors = {p: HessianCollector(model.get_submodule(p), weight_matrix(model.get_submodule(p)).shape[1])
                      for p in blk.linears}
        for batch in r.batches:
            r.run_block(batch, blk.index, batch.inputs[blk.index])
        for p, c in collectors.items():
            H = c.result() / 2.0
            dw = _error(weight_matrix(model.get_submodule(p))).double()
            out.linears[p] = float(((dw @ H) * dw).sum())
        _roll_up(out, blk)
        ctx.advance(task)
    return out


def score_fisher(ctx: ScoringContext) -> Scores:
    """Σ g² ΔW² per Linear, g = gradient of the next-token NLL on the calibration windows."""
    model = ctx.loaded.module
    if ctx.loaded.kind != "decoder":
        raise ValueError("fisher needs a language-model loss: decoders only")
    names = [p for b in ctx.lmap.blocks for p in b.linears]
    task = ctx.task("fisher", len(ctx.windows.input_ids))
    g2 = fisher_squares(model, names, ctx.windows, lambda: ctx.advance(task))
    out = Scores()
    for p in names:
        out.linears[p] = float((g2[p] * _error(weight_matrix(model.get_submodule(p))) ** 2).sum())
    for blk in ctx.lmap.blocks:
        _roll_up(out, blk)
    return out


@torch.inference_mode()
def score_imatrix(ctx: ScoringContext) -> Scores:
    """Σ aⱼ ΔWᵢⱼ² per Linear, a the importance matrix of the calibration windows (compress.quantize.imatrix)."""
    from compress.quantize.imatrix import collect
    from compress.stream.lazy import LazyModel

    model = ctx.loaded.module
    names = [p for b in ctx.lmap.blocks for p in b.linears]
    imat = collect(LazyModel.resident(ctx.loaded, ctx.lmap), ctx.windows, names)
    out = Scores()
    for p in names:
        a = imat.mean(p)
        err = _error(weight_matrix(model.get_submodule(p))) ** 2
        out.linears[p] = float((err * a).sum()) if a is not None else 0.0
    for blk in ctx.lmap.blocks:
        _roll_up(out, blk)
    return out


def _roll_up(out: Scores, blk) -> None:
    out.blocks[blk.index] = sum(out.linears[p] for p in blk.linears)
    for name in blk.sublayers:
        members = blk.linears_of(name)
        if members:
            out.sublayers[(blk.index, name)] = sum(out.linears[p] for p in members)
