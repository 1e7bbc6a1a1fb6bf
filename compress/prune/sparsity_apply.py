"""`compress prune --sparsity`: Wanda-scored weight sparsity, uniform or layer-adaptive (DP), reported like the
other modes (per block: the sparsity reached)."""

from __future__ import annotations

import time

from compress.importance.context import ScoringContext
from compress.prune.selection import Selection
from compress.prune.sparsity import adaptive_sparsity, apply_sparsity, input_norms, parse_pattern
from compress.prune.width_apply import stack_divergence


def prune_sparsity_request(ctx: ScoringContext, fraction: float, pattern: str = "unstructured",
                           adaptive: bool = False, granularity: str = "block") -> tuple[Selection, dict, dict]:
    """Sparsify ctx's model in place; returns the Selection (per block: sparsity reached), the record, plan rules."""
    t0 = time.perf_counter()
    model, lmap = ctx.loaded.module, ctx.lmap
    parse_pattern(pattern)
    norms = input_norms(ctx)
    ratios = adaptive_sparsity(ctx, norms, fraction, granularity=granularity, pattern=pattern) if adaptive \
        else fraction
    record = apply_sparsity(model, lmap, ratios, norms, pattern)
    blocks = record["blocks"]
    sel = Selection(f"sparsity-{'adaptive' if adaptive else 'uniform'}",
                    [(int(i), f"{b['sparsity']:.0%}") for i, b in sorted(blocks.items(), key=lambda kv: int(kv[0]))],
                    [], [None] * (len(blocks) - 1) + [stack_divergence(ctx)])
    sel.seconds = time.perf_counter() - t0
    rules = {p: {"action": "sparsify", "ratio": v["ratio"], "pattern": pattern} for p, v in record["linears"].items()}
    return sel, record, rules
