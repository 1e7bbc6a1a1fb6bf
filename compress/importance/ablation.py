"""Ablation: how far the model's output moves when one block, or one sublayer (FinerCut), is skipped.

Decoders: mean per-token KL(reference ‖ skipped) of the next-token distribution. Encoders: mean over windows of
1 − cosine of the mean-pooled embedding. Skipping block i replays only blocks i+1.. from cached inputs.
"""

from __future__ import annotations

import torch

from compress.importance.context import ScoringContext
from compress.importance.report import Scores
from compress.models.runner import skipped

DIRECTION = "higher = more important"


def score(ctx: ScoringContext) -> Scores:
    """Divergence with each block skipped, and with each of its sublayers skipped."""
    r = ctx.runner
    _ = ctx.reference  # computed once, before the loop
    out = Scores()
    total = len(ctx.lmap.blocks) + ctx.lmap.num_sublayers
    task = ctx.task("ablation", total)
    with torch.inference_mode():
        for blk in ctx.lmap.blocks:
            i = blk.index
            vals = [ctx.divergence(b, r.run_from(batch, i + 1, batch.inputs[i]))
                    for b, batch in enumerate(r.batches)]
            out.blocks[i] = float(torch.cat(vals).mean())
            ctx.advance(task)
            for name, sub in blk.sublayers.items():
                vals = []
                for b, batch in enumerate(r.batches):
                    with skipped(r.model, sub):
                        h = r.run_block(batch, i, batch.inputs[i])
                    vals.append(ctx.divergence(b, r.run_from(batch, i + 1, h)))
                out.sublayers[(i, name)] = float(torch.cat(vals).mean())
                ctx.advance(task)
    return out
