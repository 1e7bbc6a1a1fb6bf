"""How many routed experts each MoE layer keeps when P% of all routed experts go (DynaMoE-style schedules).

Shapes (removal weights per layer l of L, times the layer's expert count; layers are filled proportionally, capped
at what each layer may lose, and rounded by largest remainder so the counts sum exactly to the budget):
  uniform     every layer loses the same share
  descending  more experts kept early, fewer late (removal weight l + 1)
  ascending   fewer kept early, more late (removal weight L − l)
  pyramid     most kept in the middle (removal weight 1 + |l − (L − 1) / 2|)
  adaptive    exact DP over measured per-layer ΔKL curves (costs[l][u] = divergence when layer l alone drops its u
              least useful removal units), minimising the summed ΔKL at exactly the budget

Counts move in units of `multiple` experts (deepseek_v3 groups: every group loses the same number). solve_dp in
compress.quantize.allocate only bounds the budget from above; here the removed count must be met exactly, so the DP
is a small one of its own.
"""

from __future__ import annotations

import math

from compress.errors import UserError

SCHEDULES = ("uniform", "descending", "ascending", "pyramid", "adaptive")


def removal_budget(num_experts: list[int], percent: float, multiple: int = 1) -> int:
    """Experts to remove in all: P% of the routed experts, rounded half up to a whole number of `multiple`s."""
    if isinstance(percent, bool) or not isinstance(percent, int | float) or not 0 <= percent < 100:
        raise UserError(f"percent {percent!r}: give the share of routed experts to remove in [0, 100), e.g. 25")
    units = math.floor(percent / 100 * sum(num_experts) / multiple + 0.5 + 1e-9)
    return units * multiple


def min_kept(top_k: int | list[int], n_layers: int) -> list[int]:
    """The fewest experts each layer may keep: max(top_k, 1)."""
    ks = [top_k] * n_layers if isinstance(top_k, int) else list(top_k)
    return [max(int(k), 1) for k in ks]


def removal_caps(num_experts: list[int], min_keep: list[int], multiple: int = 1) -> list[int]:
    """Removal units (of `multiple` experts) each layer may lose and still keep at least min_keep experts."""
    return [max((n - -(-f // multiple) * multiple) // multiple, 0)
            for n, f in zip(num_experts, min_keep, strict=True)]


def schedule_counts(num_experts: list[int], top_k: int | list[int], percent: float, schedule: str = "uniform",
                    costs: list[list[float]] | None = None, multiple: int = 1,
                    min_keep: list[int] | None = None) -> list[int]:
    """Kept experts per layer (same order as `num_experts`) after removing `percent`% of all routed experts."""
    if schedule not in SCHEDULES:
        raise UserError(f"unknown expert schedule '{schedule}': use one of {', '.join(SCHEDULES)}")
    if not num_experts:
        raise UserError("num_experts: no MoE layers to schedule")
    floor = min_keep if min_keep is not None else min_kept(top_k, len(num_experts))
    caps = removal_caps(num_experts, floor, multiple)
    floor = [-(-f // multiple) * multiple for f in floor]
    removed = removal_budget(num_experts, percent, multiple)
    total = sum(num_experts)
    if removed >= total:
        raise UserError(f"percent {percent:g}: removes all {total} routed experts; use a smaller share")
    units = removed // multiple
    if units > sum(caps):
        most = 100 * sum(caps) * multiple / total
        raise UserError(f"percent {percent:g}: would remove {removed} of {total} routed experts, but every layer "
                        f"must keep at least {min(floor)} (top_k, or the routing groups); use at most {most:.4g}%")
    if schedule == "adaptive":
        if costs is None or len(costs) != len(num_experts):
            raise UserError("schedule 'adaptive' needs measured per-layer ΔKL costs (one curve per layer); use "
                            "prune_moe, which measures them, or pick a fixed schedule")
        take = exact_dp(costs, caps, units)
    else:
        take = proportional(_weights(schedule, num_experts), caps, units)
    return [n - t * multiple for n, t in zip(num_experts, take, strict=True)]


def _weights(schedule: str, num_experts: list[int]) -> list[float]:
    n = len(num_experts)
    shape = {"uniform": lambda i: 1.0, "descending": lambda i: i + 1.0, "ascending": lambda i: float(n - i),
             "pyramid": lambda i: 1.0 + abs(i - (n - 1) / 2)}[schedule]
    return [shape(i) * e for i, e in enumerate(num_experts)]


def proportional(weights: list[float], caps: list[int], total: int) -> list[int]:
    """Integers ≤ caps summing to `total`, proportional to `weights` (water-filling, then largest remainder)."""
    n = len(weights)
    share = [0.0] * n
    free = [i for i in range(n) if caps[i] > 0]
    left = float(total)
    while free and left > 1e-12:
        w = sum(weights[i] for i in free)
        over = [i for i in free if left * weights[i] / w >= caps[i]]
        if not over:
            for i in free:
                share[i] = left * weights[i] / w
            break
        for i in over:
            share[i] = float(caps[i])
            left -= caps[i]
        free = [i for i in free if i not in over]
    out = [min(math.floor(s + 1e-9), c) for s, c in zip(share, caps, strict=True)]
    order = sorted(range(n), key=lambda i: (-(share[i] - out[i]), i))
    while sum(out) < total:
        for i in order:
            if out[i] < caps[i] and sum(out) < total:
                out[i] += 1
    return out


def exact_dp(costs: list[list[float]], caps: list[int], total: int) -> list[int]:
    """Units u_l ≤ caps[l] with Σ u_l = total minimising Σ costs[l][u_l] (costs[l][0] is the untouched layer)."""
    inf = math.inf
    best = [0.0] + [inf] * total
    picks: list[list[int]] = []
    for costs_l, cap in zip(costs, caps, strict=True):
        nxt, pick = [inf] * (total + 1), [0] * (total + 1)
        for t in range(total + 1):
            for u in range(min(cap, t, len(costs_l) - 1) + 1):
                c = best[t - u] + float(costs_l[u])
                if c < nxt[t]:
                    nxt[t], pick[t] = c, u
        best = nxt
        picks.append(pick)
    if best[total] == inf:
        raise UserError(f"adaptive schedule: no allowed plan removes {total} units (every candidate is infinite)")
    out, t = [0] * len(costs), total
    for layer in range(len(costs) - 1, -1, -1):
        out[layer] = picks[layer][t]
        t -= out[layer]
    return out
