"""Block pruning: choose whole blocks to remove and remove them, leaving a plain smaller model.

bi        one-shot by Block Influence (the foundation's LIM: 1 − cos(h_in, h_out)), lowest first (ShortGPT).
ablation  one-shot by each block's own skip divergence (KL of the final distribution), lowest first.
greedy    one block at a time; after each removal the divergence of every remaining candidate is re-measured with
          the removed blocks already gone. Replays only the blocks after each candidate from cached hidden states.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from compress.importance.context import ScoringContext
from compress.models.layers import LayerMap
from compress.models.runner import BlockRunner, CachedBatch
from compress.prune.choices import BLOCK_METHOD
from compress.prune.selection import Selection

METHODS = tuple(BLOCK_METHOD)


def select_blocks(ctx: ScoringContext, count: int, method: str) -> Selection:
    """The `count` blocks `method` removes, in removal order, with the scores that chose them."""
    t0 = time.perf_counter()
    n = len(ctx.lmap.blocks)
    if method == "bi":
        from compress.importance import lim

        scores = lim.score(ctx).blocks
        sel = Selection("bi", _lowest(scores, count), [scores])
    elif method == "ablation":
        scores = removal_divergence(ctx, [], list(range(n)), ctx.task("ablation", n * len(ctx.runner.batches)))
        sel = Selection("ablation", _lowest(scores, count), [scores])
    elif method == "greedy":
        sel = _greedy(ctx, count)
    else:
        raise ValueError(method)
    if method != "greedy":
        sel.divergence = [None] * (count - 1) + [stack_divergence(ctx, sel.removed)]
    sel.seconds = time.perf_counter() - t0
    return sel


def _greedy(ctx: ScoringContext, count: int) -> Selection:
    n, batches = len(ctx.lmap.blocks), len(ctx.runner.batches)
    task = ctx.task("greedy", sum(n - s for s in range(count)) * batches)
    sel = Selection("greedy", [])
    for _ in range(count):
        candidates = [j for j in range(n) if j not in sel.removed]
        scores = removal_divergence(ctx, sel.removed, candidates, task)
        best = _lowest(scores, 1)[0]
        sel.removed.append(best)
        sel.scores.append(scores)
        sel.divergence.append(scores[best])
    return sel


def removal_divergence(ctx: ScoringContext, removed: list[int], candidates: list[int], task=None) -> dict[int, float]:
    """Mean divergence from the reference of the stack without `removed` + {j}, for every candidate j."""
    r = ctx.runner
    gone = set(removed)
    vals: dict[int, list[torch.Tensor]] = {j: [] for j in candidates}
    with torch.inference_mode():
        for b, batch in enumerate(r.batches):
            hs = stack_inputs(r, batch, gone)
            for j in candidates:
                vals[j].append(ctx.divergence(b, run_kept(r, batch, j + 1, hs[j], gone)))
                ctx.advance(task)
    return {j: float(torch.cat(v).mean()) for j, v in vals.items()}


def stack_divergence(ctx: ScoringContext, removed: list[int]) -> float:
    """Mean divergence from the reference of the stack with all of `removed` gone."""
    return removal_divergence(ctx, list(removed[:-1]), [removed[-1]])[removed[-1]]


def stack_inputs(r: BlockRunner, batch: CachedBatch, removed: set[int]) -> list[torch.Tensor]:
    """hs[k] = the hidden state entering block k of the stack without `removed`; hs[-1] leaves the stack.
    Blocks before the first removed one are unchanged, so their cached inputs are reused."""
    n = len(r.blocks)
    first = min(removed, default=n)
    hs = list(batch.inputs[:first + 1])
    h = hs[-1]
    for k in range(first, n):
        if k not in removed:
            h = r.run_block(batch, k, h)
        hs.append(h)
    return hs


def run_kept(r: BlockRunner, batch: CachedBatch, start: int, h: torch.Tensor, removed: set[int]) -> torch.Tensor:
    """Blocks start..N-1 that are not in `removed`, applied to `h`."""
    for k in range(start, len(r.blocks)):
        if k not in removed:
            h = r.run_block(batch, k, h)
    return h


def remove_blocks(model: nn.Module, lmap: LayerMap, removed: list[int]) -> dict:
    """Drop `removed` from the block stack in place: blocks renumbered (layer_idx), config's layer count and
    per-layer lists (e.g. layer_types) trimmed, so save_pretrained writes a model transformers loads as is."""
    n = lmap.num_blocks
    gone = set(removed)
    kept = [i for i in range(n) if i not in gone]
    stack = model.get_submodule(lmap.blocks_path)
    parent_path, _, attr = lmap.blocks_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, nn.ModuleList([stack[i] for i in kept]))
    for new, old in enumerate(kept):
        for m in stack[old].modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                m.layer_idx = new
    trimmed = []
    config = getattr(model, "config", None)
    if config is not None:
        for key, value in list(vars(config).items()):
            if isinstance(value, list) and len(value) == n and "layer" in key:
                setattr(config, key, [value[i] for i in kept])
                trimmed.append(key)
        config.num_hidden_layers = len(kept)
    return {"removed": sorted(gone), "kept": kept, "num_blocks": len(kept), "config_lists_trimmed": trimmed}


def _lowest(scores: dict[int, float], count: int) -> list[int]:
    return sorted(scores, key=lambda j: (scores[j], j))[:count]
