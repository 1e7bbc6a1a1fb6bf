"""Weight sparsity: zero individual weights of the block Linears, scored by activation-aware magnitude (Wanda).

Score. For a Linear with weight W [out, in] and calibration inputs X [tokens, in], weight W[i, j] scores
|W[i, j]| · ‖X[:, j]‖₂ ("A Simple and Effective Pruning Approach for Large Language Models", Wanda). Weights are
compared within their output row: `unstructured` drops the round-half-up(ratio × in) lowest of every row; `N:M`
(e.g. 2:4) keeps the N highest of every group of M consecutive weights of a row, so the ratio is fixed at 1 − N/M.
Input norms come from the dense model: every block is replayed once from the BlockRunner's cached inputs with hooks
on its Linears (padding excluded), so all Linears are scored one-shot against the original activations.

Storage. Pruned weights become zeros of the dense tensors: the model stays a plain transformers model that
save_pretrained / from_pretrained handle, and the zeros survive a reload. Biases are never pruned.

Layer-adaptive ratios (`adaptive_sparsity`): for every unit (a block's Linears together, or one Linear) and
candidate ratio, the weights of that unit alone are zeroed, that block and the later ones are replayed from the
cached inputs, the mean divergence of the final output (KL for decoders) is measured, and the weights are restored
exactly. Distortions are assumed to add up across units ("Efficient Joint Optimization of Layer-Adaptive Weight
Pruning") and the exact multiple-choice knapsack (`compress.quantize.allocate.solve_dp`) picks one ratio per unit
minimising the summed distortion with at least target × (all block Linear weights) weights zeroed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compress.errors import UserError
from compress.importance.context import ScoringContext
from compress.models.layers import LayerMap
from compress.prune.choices import SPARSITY_GRANULARITY, parse_pattern  # noqa: F401  (re-exported)
from compress.quantize.apply import weight_matrix

PATTERNS = ("unstructured", "2:4")
GRANULARITIES = tuple(SPARSITY_GRANULARITY)
CHOICES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
_ROW_CHUNK = 1024  # rows scored at a time, so the sort indices of a large matrix never exist all at once


@dataclass
class SparsityTable:
    """What `adaptive_sparsity` chooses from: per unit (its Linears) and candidate ratio the measured divergence
    with only that unit sparsified, and how many of the unit's weights stay (are not pruned)."""

    granularity: str
    choices: list[float]
    units: list[tuple[str, list[str]]]  # (unit name, its Linear paths)
    distortion: list[list[float]]
    kept: list[list[int]]
    weights: list[int]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready table."""
        return {"granularity": self.granularity, "choices": self.choices,
                "units": [{"name": n, "linears": ls} for n, ls in self.units], "distortion": self.distortion,
                "kept": self.kept, "weights": self.weights}


# ----------------------------------------------------------------------------------------------------- checks


def _round(x: float) -> int:
    return math.floor(x + 0.5 + 1e-9)


def _check_ratio(what: str, r: Any) -> float:
    if isinstance(r, bool) or not isinstance(r, int | float) or not 0 <= r < 1:
        raise UserError(f"{what} {r!r} is outside [0, 1); give the fraction of weights to zero, e.g. 0.5")
    return float(r)


def check_target(target: Any, what: str = "--sparsity") -> float:
    """A user's overall sparsity target as a fraction strictly between 0 and 1; UserError otherwise."""
    if isinstance(target, bool) or not isinstance(target, int | float) or not 0 < target < 1:
        raise UserError(f"{what} {target!r} is outside (0, 1); give the fraction of weights to zero, e.g. 0.5 "
                        "(50%)")
    return float(target)


def _check_nm(name: str, ratio: float, cols: int, nm: tuple[int, int]) -> None:
    n, m = nm
    fixed = 1 - n / m
    if ratio != 0 and abs(ratio - fixed) > 1e-6:
        raise UserError(f"--pattern {n}:{m} zeroes exactly {fixed:.0%} of the weights ({m - n} of every {m}), but "
                        f"{name} was given ratio {ratio:g}: use --sparsity {fixed:.0%} with it, or --pattern "
                        "unstructured")
    if ratio != 0 and cols % m:
        raise UserError(f"--pattern {n}:{m}: {name} has {cols} input columns, not a multiple of {m}; use --pattern "
                        "unstructured")


# ------------------------------------------------------------------------------------------------------ norms


def _block_linears(model: nn.Module, lmap: LayerMap) -> dict[str, nn.Module]:
    return {p: model.get_submodule(p) for b in lmap.blocks for p in b.linears}


def input_norms(ctx: ScoringContext) -> dict[str, torch.Tensor]:
    """‖X[:, j]‖₂ over the calibration tokens (padding excluded) per input column of every block Linear, float32 [in];
    one replay of every block from the runner's cached inputs."""
    r, lmap = ctx.runner, ctx.lmap
    linears = _block_linears(r.model, lmap)
    sums = {p: torch.zeros(weight_matrix(m).shape[1], dtype=torch.float64) for p, m in linears.items()}
    task = ctx.task("input norms", len(lmap.blocks) * len(r.batches))

    def hook(path: str, mask: torch.Tensor):
        def accumulate(module, args):
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1]).float().square()
            if x.shape[0] == mask.numel():  # one row per token: padding rows weigh 0
                x = x * mask.to(x.device)[:, None]
            sums[path] += x.sum(0, dtype=torch.float64).cpu()
        return accumulate

    with torch.inference_mode():
        for batch in r.batches:
            mask = batch.attention_mask.reshape(-1).float()
            for b in lmap.blocks:
                handles = [linears[p].register_forward_pre_hook(hook(p, mask)) for p in b.linears]
                try:
                    r.run_block(batch, b.index, batch.inputs[b.index])
                finally:
                    for h in handles:
                        h.remove()
                ctx.advance(task)
    return {p: s.sqrt().float() for p, s in sums.items()}


# ------------------------------------------------------------------------------------------------------ masks


def masks(weight: torch.Tensor, norms: torch.Tensor | None, ratio: float, pattern: str = "unstructured",
          name: str = "weight") -> torch.Tensor:
    """Keep-mask (True = keep) of an [out, in] weight scored by |W| · norms (norms None: plain magnitude);
    unstructured drops round(ratio · in) lowest per row; N:M (ratio 1 − N/M, or 0 = dense) keeps the N highest of
    every M consecutive weights of a row."""
    nm = parse_pattern(pattern)
    ratio = _check_ratio(f"{name}: ratio", ratio)
    if weight.dim() != 2:
        raise UserError(f"{name}: weight has shape {tuple(weight.shape)}; sparsity needs an [out, in] matrix")
    rows, cols = weight.shape
    if nm is not None:
        _check_nm(name, ratio, cols, nm)
    if norms is not None and tuple(norms.shape) != (cols,):
        raise UserError(f"{name}: input norms have shape {tuple(norms.shape)} but the weight has {cols} input "
                        "columns; recompute input_norms on this model")
    keep = torch.ones(rows, cols, dtype=torch.bool, device=weight.device)
    drop = _round(ratio * cols)  # per row (unstructured); for N:M only whether anything goes (ratio 0: dense)
    if drop == 0:
        return keep
    scale = None if norms is None else norms.detach().to(weight.device, torch.float32)
    for s in range(0, rows, _ROW_CHUNK):
        score = weight[s:s + _ROW_CHUNK].detach().float().abs()
        if scale is not None:
            score = score * scale
        if nm is None:
            # ties: the lower column goes first, so the result never depends on the sort's internals
            order = torch.argsort(score, dim=1, stable=True)[:, :drop]
            keep[s:s + _ROW_CHUNK].scatter_(1, order, False)
        else:
            n, m = nm
            groups = score.reshape(score.shape[0], cols // m, m)
            top = torch.argsort(groups, dim=2, descending=True, stable=True)[..., :n]
            part = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, top, True)
            keep[s:s + _ROW_CHUNK] = part.reshape(score.shape[0], cols)
    return keep


def _pruned_count(rows: int, cols: int, ratio: float, nm: tuple[int, int] | None) -> int:
    """Weights `masks` prunes from an [rows, cols] matrix at `ratio` (counted, not built)."""
    if nm is None:
        return rows * _round(ratio * cols)
    return rows * cols // nm[1] * (nm[1] - nm[0]) if ratio else 0


# ------------------------------------------------------------------------------------------------------ apply


def _resolve(model: nn.Module, lmap: LayerMap, ratios: dict[str, float] | float, norms: dict[str, torch.Tensor] |
             None, pattern: str) -> tuple[dict[str, nn.Module], dict[str, float]]:
    """Validate everything `apply_sparsity` needs before anything changes; per-Linear ratios (missing ones: 0)."""
    nm = parse_pattern(pattern)
    linears = _block_linears(model, lmap)
    if isinstance(ratios, int | float) and not isinstance(ratios, bool):
        r = _check_ratio("ratios: uniform ratio", ratios)
        per = dict.fromkeys(linears, r)
    elif isinstance(ratios, dict):
        unknown = [k for k in ratios if k not in linears]
        if unknown:
            raise UserError(f"ratios: {unknown[0]!r} is not a Linear of the block stack (e.g. "
                            f"{next(iter(linears))!r}); key ratios by Linear module path")
        per = {p: _check_ratio(f"ratios: {p}", ratios.get(p, 0.0)) for p in linears}
    else:
        raise UserError(f"ratios: {ratios!r} is neither a ratio in [0, 1) nor a {{Linear path: ratio}} dict")
    for p, r in per.items():
        rows, cols = weight_matrix(linears[p]).shape
        if nm is not None:
            _check_nm(p, r, cols, nm)
        if r and norms is not None:
            got = norms.get(p)
            if got is None or tuple(got.shape) != (cols,):
                have = "none" if got is None else f"shape {tuple(got.shape)}"
                raise UserError(f"norms: {p} has {cols} input columns but the input norms have {have}; recompute "
                                "input_norms on this model")
    return linears, per


def apply_sparsity(model: nn.Module, lmap: LayerMap, ratios: dict[str, float] | float,
                   norms: dict[str, torch.Tensor] | None, pattern: str = "unstructured") -> dict:
    """Zero the lowest-scored weights of every block Linear in place (dense zeros; validated before any change);
    return per Linear the ratio and achieved zeros, and the totals over the block Linears."""
    linears, per = _resolve(model, lmap, ratios, norms, pattern)
    layers: dict[str, dict[str, Any]] = {}
    blocks: dict[int, dict[str, int]] = {}
    owner = {p: b.index for b in lmap.blocks for p in b.linears}
    with torch.no_grad():
        for p, mod in linears.items():
            w = weight_matrix(mod)
            if per[p]:
                keep = masks(w, None if norms is None else norms[p], per[p], pattern, name=p)
                w.masked_fill_(~keep, 0)
            zeros, n = int((w == 0).sum()), w.numel()
            layers[p] = {"ratio": per[p], "zeros": zeros, "weights": n, "sparsity": zeros / n}
            tot = blocks.setdefault(owner[p], {"zeros": 0, "weights": 0})
            tot["zeros"] += zeros
            tot["weights"] += n
    zeros, total = sum(v["zeros"] for v in layers.values()), sum(v["weights"] for v in layers.values())
    return {"pattern": pattern, "scored_by": "|W|·‖X‖" if norms is not None else "|W|", "linears": layers,
            "blocks": {i: {**v, "sparsity": v["zeros"] / v["weights"]} for i, v in blocks.items()},
            "zeros": zeros, "weights": total, "sparsity": zeros / total if total else 0.0}


# --------------------------------------------------------------------------------------------------- adaptive


def _units(lmap: LayerMap, granularity: str) -> list[tuple[str, int, list[str]]]:
    """(name, block index, Linear paths) of every unit that shares one ratio."""
    if granularity == "block":
        return [(b.path, b.index, list(b.linears)) for b in lmap.blocks if b.linears]
    return [(p, b.index, [p]) for b in lmap.blocks for p in b.linears]


def sparsity_table(ctx: ScoringContext, norms: dict[str, torch.Tensor] | None, choices: tuple[float, ...] = CHOICES,
                   granularity: str = "block", pattern: str = "unstructured") -> SparsityTable:
    """Per unit and candidate ratio: mean divergence of the final output with only that unit sparsified (weights
    zeroed, its block and later ones replayed from cached inputs, weights restored exactly) and its kept weights.
    Cached in ctx.cache per (choices, granularity, pattern, norms)."""
    if granularity not in GRANULARITIES:
        raise UserError(f"granularity {granularity!r} is unknown: use {' or '.join(GRANULARITIES)}")
    if parse_pattern(pattern) is not None:
        raise UserError(f"--pattern {pattern} fixes every Linear at one ratio, so there are no per-layer ratios to "
                        "choose: drop --adaptive or use --pattern unstructured")
    choices = tuple(_check_ratio("choices: candidate ratio", c) for c in choices)
    if not choices:
        raise UserError("choices: give at least one candidate ratio, e.g. 0, 0.25, 0.5")
    key = ("sparsity-table", choices, granularity, pattern)
    hit = ctx.cache.get(key)
    if hit is not None and hit[0] is norms:
        return hit[1]
    model = ctx.loaded.module
    linears, _ = _resolve(model, ctx.lmap, dict.fromkeys(_block_linears(model, ctx.lmap), max(choices)), norms,
                          pattern)
    _ = ctx.reference_probs  # the reference comes from the unchanged model
    units = _units(ctx.lmap, granularity)
    table = SparsityTable(granularity, list(choices), [(n, ps) for n, _, ps in units], [], [], [])
    task = ctx.task("sparsity distortion", len(units) * sum(1 for c in choices if c))
    with torch.inference_mode():
        for _name, block, paths in units:
            shapes = [tuple(weight_matrix(linears[p]).shape) for p in paths]
            size = sum(a * b for a, b in shapes)
            dists, kept = [], []
            for c in choices:
                pruned = sum(_pruned_count(a, b, c, None) for a, b in shapes)
                dists.append(_measure(ctx, block, {p: linears[p] for p in paths}, c, norms, pattern) if pruned
                             else 0.0)
                kept.append(size - pruned)
                if c:
                    ctx.advance(task)
            table.distortion.append(dists)
            table.kept.append(kept)
            table.weights.append(size)
    ctx.cache[key] = (norms, table)
    return table


def _measure(ctx: ScoringContext, block: int, mods: dict[str, nn.Module], ratio: float,
             norms: dict[str, torch.Tensor] | None, pattern: str) -> float:
    """Mean divergence with only `mods` sparsified at `ratio`; their weights are restored exactly afterwards."""
    r = ctx.runner
    originals = {p: weight_matrix(m).detach().clone() for p, m in mods.items()}
    try:
        for p, m in mods.items():
            w = weight_matrix(m)
            w.masked_fill_(~masks(originals[p], None if norms is None else norms[p], ratio, pattern, name=p), 0)
        vals = [ctx.divergence(b, r.run_from(batch, block, batch.inputs[block])) for b, batch in enumerate(r.batches)]
    finally:
        for p, m in mods.items():
            weight_matrix(m).copy_(originals[p])
    return float(torch.cat(vals).mean())


def adaptive_sparsity(ctx: ScoringContext, norms: dict[str, torch.Tensor] | None, target: float,
                      choices: tuple[float, ...] = CHOICES, granularity: str = "block",
                      pattern: str = "unstructured") -> dict[str, float]:
    """One ratio per unit (block or Linear), returned per Linear path for `apply_sparsity`, minimising the summed
    measured divergence with at least target × (all block Linear weights) weights zeroed (exact DP)."""
    from compress.quantize.allocate import solve_dp

    target = check_target(target)
    table = sparsity_table(ctx, norms, choices, granularity, pattern)
    total = sum(table.weights)
    budget = total - math.ceil(target * total - 1e-9)  # kept weights allowed
    if sum(min(row) for row in table.kept) > budget:
        raise UserError(f"--sparsity {target:.0%} needs more zeros than the largest candidate ratio in choices "
                        f"({max(table.choices):g}) gives; add larger choices or lower the target")
    picks = solve_dp(table.distortion, table.kept, budget, resolution=1 << 16)
    # The DP rounds sizes up to its resolution; if that ever hides the uniform solution and it is better, keep it.
    col = next((c for c, v in enumerate(table.choices) if abs(v - target) < 1e-9), None)
    if col is not None and sum(row[col] for row in table.kept) <= budget:
        uniform = sum(row[col] for row in table.distortion)
        if uniform < sum(table.distortion[u][c] for u, c in enumerate(picks)):
            picks = [col] * len(picks)
    return {p: table.choices[c] for (_, paths), c in zip(table.units, picks, strict=True) for p in paths}
