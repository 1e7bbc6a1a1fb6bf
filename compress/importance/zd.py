"""ZD — Z-score Distribution ("Layer-Wise Quantization", Dumitru et al. 2024): data-free, weights only.

For a weight matrix W, ZD = fraction of entries with |z| > 1, z = (w − mean(W)) / std(W). Heavy-tailed matrices
(few large outliers) have a smaller fraction; the paper reads smaller ZD as more important. A block's (sublayer's)
ZD is the parameter-weighted mean over its Linear weights, each z-scored within its own matrix.
"""

from __future__ import annotations

import torch

from compress.importance.context import ScoringContext
from compress.importance.report import Scores

DIRECTION = "lower = more important"


def zscore_fraction(weight: torch.Tensor, threshold: float = 1.0) -> float:
    """Fraction of entries of `weight` whose z-score magnitude exceeds `threshold`."""
    w = weight.detach().double().reshape(-1)
    std = w.std()
    if std == 0:
        return 0.0
    return float((((w - w.mean()) / std).abs() > threshold).double().mean())


def score(ctx: ScoringContext) -> Scores:
    """ZD for every Linear, and parameter-weighted per block and per sublayer."""
    model = ctx.loaded.module
    out = Scores()
    task = ctx.task("zd", len(ctx.lmap.blocks))
    for blk in ctx.lmap.blocks:
        sizes: dict[str, int] = {}
        for path in blk.linears:
            w = model.get_submodule(path).weight
            out.linears[path] = zscore_fraction(w)
            sizes[path] = w.numel()
        out.blocks[blk.index] = _weighted(out.linears, sizes, blk.linears)
        for name in blk.sublayers:
            members = blk.linears_of(name)
            if members:
                out.sublayers[(blk.index, name)] = _weighted(out.linears, sizes, members)
        ctx.advance(task)
    return out


def _weighted(values: dict[str, float], sizes: dict[str, int], paths: list[str]) -> float:
    total = sum(sizes[p] for p in paths)
    return sum(values[p] * sizes[p] for p in paths) / total if total else float("nan")
