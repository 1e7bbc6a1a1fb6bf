"""LIM — Layer Input Modification ("Layer-Wise Quantization", Dumitru et al. 2024); ShortGPT's Block Influence.

LIM(block) = mean over tokens of 1 − cos(h_in, h_out): how much the block changes the residual stream it reads.
Higher = more important. Sublayers: attention is scored on (h_in, h_mid) and the FFN on (h_mid, h_out), where h_mid
is the block's output with its FFN skipped.
"""

from __future__ import annotations

import torch

from compress.importance.context import ScoringContext
from compress.importance.report import Scores
from compress.metrics import cosine_distance
from compress.models.runner import skipped

DIRECTION = "higher = more important"


def score(ctx: ScoringContext) -> Scores:
    """LIM for every block, and for attention/FFN sublayers where the block has both."""
    r = ctx.runner
    out = Scores()
    task = ctx.task("lim", len(ctx.lmap.blocks))
    with torch.inference_mode():
        for blk in ctx.lmap.blocks:
            i = blk.index
            block_vals, attn_vals, mlp_vals = [], [], []
            for batch in r.batches:
                h_in, h_out = batch.inputs[i], batch.inputs[i + 1]
                block_vals.append(cosine_distance(h_in, h_out).reshape(-1))
                if "attn" in blk.sublayers and "mlp" in blk.sublayers:
                    with skipped(r.model, blk.sublayers["mlp"]):
                        h_mid = r.run_block(batch, i, h_in)
                    attn_vals.append(cosine_distance(h_in, h_mid).reshape(-1))
                    mlp_vals.append(cosine_distance(h_mid, h_out).reshape(-1))
            out.blocks[i] = float(torch.cat(block_vals).mean())
            if attn_vals:
                out.sublayers[(i, "attn")] = float(torch.cat(attn_vals).mean())
                out.sublayers[(i, "mlp")] = float(torch.cat(mlp_vals).mean())
            ctx.advance(task)
    return out
