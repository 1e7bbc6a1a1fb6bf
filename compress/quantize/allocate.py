"""Allocators: choose one candidate per unit (block, embedding, Linear) under a byte budget.

`solve_dp` is the exact multiple-choice knapsack (distortion assumed additive across units, as measured in
"Efficient Joint Optimization of Layer-Adaptive Weight Pruning"); `allocate_by_rank` is the seed paper's method.
"""

from __future__ import annotations

import numpy as np

from compress.errors import UserError


def solve_dp(distortion: list[list[float]], sizes: list[list[int]], budget: int, resolution: int = 8192) -> list[int]:
    """Minimise Σ distortion[u][c_u] s.t. Σ sizes[u][c_u] ≤ budget; returns c_u per unit (an infinite
    distortion marks a candidate the unit may not take).

    The DP runs over the bytes each unit takes above its smallest allowed candidate, divided into units of
    ceil(spare / resolution) bytes, rounded up: the answer always fits the budget (also when the budget is exactly
    the smallest plan); with byte-sized units (small instances) it is the exact optimum.
    """
    n = len(distortion)
    floor = [min(s for s, d in zip(row, ds, strict=True) if d != np.inf) for row, ds in zip(sizes, distortion,
                                                                                             strict=True)]
    spare = budget - sum(floor)
    if spare < 0:
        raise UserError(f"budget {budget:,} bytes is below the smallest possible size "
                        f"({sum(floor):,} bytes with every unit at its smallest candidate)")
    unit = max(1, -(-spare // resolution))
    w = [[-(-(s - f) // unit) for s in row] for row, f in zip(sizes, floor, strict=True)]
    cap = spare // unit
    inf = np.inf
    best = np.full(cap + 1, inf)
    best[0] = 0.0
    choice = np.zeros((n, cap + 1), dtype=np.int16)
    for u in range(n):
        nxt = np.full(cap + 1, inf)
        for c, (d, s) in enumerate(zip(distortion[u], w[u], strict=True)):
            if s > cap or d == inf:
                continue
            cand = np.full(cap + 1, inf)
            cand[s:] = best[: cap + 1 - s] + d
            better = cand < nxt
            nxt[better] = cand[better]
            choice[u, better] = c
        best = nxt
    end = int(np.argmin(best))
    picks = [0] * n
    for u in range(n - 1, -1, -1):
        c = int(choice[u, end])
        picks[u] = c
        end -= w[u][c]
    return picks


def allocate_by_rank(order: list[int], sizes: list[list[int]], budget: int,
                     allowed: list[list[bool]] | None = None) -> list[int]:
    """The seed's ranking: start every unit at its largest candidate; lower the least important first.

    `order` lists units from least to most important; `sizes[u]` are in candidate order, largest first. Units
    move one (allowed) candidate down at a time, least important first, sweeping again at the next level if needed.
    """
    n = len(sizes)
    options = [[c for c in range(len(sizes[u])) if allowed is None or allowed[u][c]] for u in range(n)]
    level = [0] * n
    total = sum(sizes[u][options[u][0]] for u in range(n))
    levels = max(len(r) for r in options)
    for _ in range(levels - 1):
        for u in order:
            if total <= budget:
                return [options[v][level[v]] for v in range(n)]
            if level[u] + 1 < len(options[u]):
                total += sizes[u][options[u][level[u] + 1]] - sizes[u][options[u][level[u]]]
                level[u] += 1
    picks = [options[v][level[v]] for v in range(n)]
    if total > budget:
        raise UserError(f"budget {budget:,} bytes cannot be met even with every unit at its smallest candidate")
    return picks
