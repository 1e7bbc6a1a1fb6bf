"""`compress prune --width`: per-block ratios (uniform, or adaptive by DP), slicing, a report like the other modes."""

from __future__ import annotations

import time

import torch

from compress.errors import UserError
from compress.importance.context import ScoringContext
from compress.prune.selection import Selection
from compress.prune.width import (
    adaptive_ratios,
    block_shape,
    distortion_table,
    layout_of,
    prune_width,
    snap_ratio,
    width_importance,
)


def prune_width_request(ctx: ScoringContext, fraction: float, adaptive: bool,
                        method: str = "activation") -> tuple[Selection, dict, dict]:
    """Width-prune ctx's model in place: ratios uniform (attention rounded to whole KV groups) or adaptive at the
    same parameter count; returns the Selection (per block: ratios, single-block distortion), the record, plan rules."""
    t0 = time.perf_counter()
    model, lmap = ctx.loaded.module, ctx.lmap
    layout = layout_of(model, lmap)
    importance = width_importance(ctx, method)
    if adaptive:
        ratios = adaptive_ratios(ctx, importance, fraction)
        table = distortion_table(ctx, importance)
        single = {i: table.distortion[i][table.ratios[i].index(ratios[i])] if ratios[i] in table.ratios[i] else None
                  for i in ratios}
    else:
        ratios, single = {}, {}
        for b in lmap.blocks:
            pair = snap_ratio(block_shape(model.get_submodule(b.path), layout), fraction)
            if pair is None:
                raise UserError(f"--width {fraction:.0%} would remove every KV group or FFN channel of block "
                                f"{b.index}; ask for less")
            ratios[b.index], single[b.index] = pair, None
    record = prune_width(model, lmap, ratios, importance)
    sel = Selection(f"width-{'adaptive' if adaptive else 'uniform'}",
                    [(i, f"attn {a:.0%} ffn {f:.0%}") for i, (a, f) in sorted(ratios.items())],
                    [{(i, "distortion"): d for i, d in single.items() if d is not None}],
                    [None] * (len(ratios) - 1) + [stack_divergence(ctx)])
    sel.seconds = time.perf_counter() - t0
    rules = {lmap.blocks[i].path: {"action": "width", "attention_ratio": a, "ffn_ratio": f}
             for i, (a, f) in ratios.items()}
    return sel, record, rules


def stack_divergence(ctx: ScoringContext) -> float:
    """Mean calibration divergence of the (sliced in place) model from the reference, whole stack replayed."""
    r = ctx.runner
    with torch.inference_mode():
        vals = [ctx.divergence(b, r.run_from(batch, 0, batch.inputs[0])) for b, batch in enumerate(r.batches)]
    return float(torch.cat(vals).mean())
