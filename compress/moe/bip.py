"""Selection-bias fitting for expert load balancing: route by the top-k of (s − q) with a per-layer vector q.

`fit_bias_bip` is the LP-dual iteration of the assignment BIP (max Σ s·x, each token k experts, each expert at most
`cap` tokens): q is the expert price of the dual. Expert j is chosen by token i iff its margin
m_ij = s_ij − (k-th largest of s_il − q_l over l ≠ j) exceeds q_j, so setting q_j to the (cap+1)-th largest margin
(plus a small ε, as in auction algorithms, so it terminates) sends exactly the excess tokens to their next choice.
All experts are updated at once per sweep (vectorised): over-capacity experts are raised to the price of a target
a little inside the capacity (`slack`, widened every 10 sweeps, so the sweeps do not creep up on the capacity from
below or cycle around it), under-used experts with q_j above their price are lowered halfway towards it (never below
0), which keeps q close to the dual optimum (the least change of routing that meets the capacity).
`fit_bias_greedy` is DeepSeek-V3's auxiliary-loss-free update q += lr · sign(load − mean), as a baseline with the
same iteration budget.

`allowed(q) -> bool [tokens, E]` restricts each token's candidates under the current q (deepseek_v3's group-limited
routing); the margins are then taken over the allowed experts, re-evaluated every sweep.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from compress.errors import UserError

Allowed = Callable[[torch.Tensor], torch.Tensor]  # q -> bool [tokens, E]: experts each token may choose


def biased_loads(scores: torch.Tensor, q: torch.Tensor, top_k: int, allowed: Allowed | None = None) -> torch.Tensor:
    """Tokens per expert when each token takes the top-k of (s − q) among its allowed experts (int64 [E])."""
    idx = torch.topk(_candidates(scores, q, allowed), top_k, dim=-1).indices
    return torch.bincount(idx.reshape(-1), minlength=scores.shape[1])


def capacity_limit(tokens: int, top_k: int, num_experts: int, capacity: float) -> int:
    """Most tokens one expert may take: floor(capacity × mean load), mean = tokens·k/E (unchecked)."""
    return math.floor(capacity * tokens * top_k / num_experts + 1e-9)


def capacity_tokens(tokens: int, top_k: int, num_experts: int, capacity: float) -> int:
    """Most tokens one expert may take: floor(capacity × mean load), mean = tokens·k/E; UserError when infeasible."""
    if not math.isfinite(capacity) or capacity < 1.0:
        raise UserError(f"--capacity {capacity}: must be ≥ 1.0 (a multiple of the mean expert load); try 1.1")
    if not 0 < top_k <= num_experts:
        raise UserError(f"top_k {top_k}: must be between 1 and the number of experts ({num_experts})")
    cap = capacity_limit(tokens, top_k, num_experts, capacity)
    if cap * num_experts < tokens * top_k:
        raise UserError(f"--capacity {capacity}: {num_experts} experts × {cap} tokens cannot hold {tokens} tokens × "
                        f"top-{top_k}; raise the capacity or calibrate on more tokens")
    return cap


def fit_bias_bip(scores: torch.Tensor, top_k: int, capacity: float = 1.1, max_iter: int = 100, slack: float = 0.02,
                 history: list[float] | None = None, allowed: Allowed | None = None) -> torch.Tensor:
    """Selection bias q [E] (≥ 0) such that the top-k of (s − q) loads no expert above capacity × mean, by the
    BIP's LP-dual iteration; stops when feasible or after `max_iter` sweeps (`history` gets max/mean per sweep)."""
    s = _check(scores)
    tokens, n_exp = s.shape
    cap = capacity_tokens(tokens, top_k, n_exp, capacity)
    mean = tokens * top_k / n_exp
    span = max(float(s.max() - s.min()), 1e-6)
    eps = 1e-6 * span
    q = torch.zeros(n_exp, dtype=torch.float32)
    if top_k == n_exp or cap >= tokens:
        return q  # every expert can take every token it is offered
    for sweep in range(max_iter + 1):
        load, margins = _loads_and_margins(s, q, top_k, allowed)
        if history is not None:
            history.append(float(load.max()) / mean)
        if int(load.max()) <= cap or sweep == max_iter:
            break
        # aim a little inside the capacity, a little further every 10 sweeps (cycling near it when `allowed` varies)
        target = max(math.floor(cap * (1.0 - slack * (1 + sweep // 10))), math.ceil(mean))
        price = (torch.kthvalue(margins, tokens - target, dim=-1).values + eps).clamp(0.0, float(q.max()) + span)
        over = load > target
        under = (load < target) & (q > price)
        q = torch.where(over, torch.maximum(q, price), torch.where(under, 0.5 * (q + price), q))
    return q - q.min()


def fit_bias_greedy(scores: torch.Tensor, top_k: int, capacity: float = 1.1, lr: float = 1e-3,
                    max_iter: int = 100, history: list[float] | None = None,
                    allowed: Allowed | None = None) -> torch.Tensor:
    """Selection bias q [E] by q += lr · sign(load − mean) per step (DeepSeek-V3's aux-free update), until no
    expert is above capacity × mean or after `max_iter` steps (`history` gets max/mean per step)."""
    s = _check(scores)
    tokens, n_exp = s.shape
    cap = capacity_tokens(tokens, top_k, n_exp, capacity)
    mean = tokens * top_k / n_exp
    q = torch.zeros(n_exp, dtype=torch.float32)
    for step in range(max_iter + 1):
        load = biased_loads(s, q, top_k, allowed)
        if history is not None:
            history.append(float(load.max()) / mean)
        if int(load.max()) <= cap or step == max_iter:
            break
        q += lr * torch.sign(load.float() - mean)
    return q - q.min()


def _loads_and_margins(s: torch.Tensor, q: torch.Tensor, top_k: int,
                       allowed: Allowed | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Loads [E] under top-k of (s − q) and margins [E, tokens]: m_ij = s_ij − (k-th largest of s_il − q_l over
    allowed l ≠ j), so token i takes expert j iff m_ij > q_j (−inf where j is not allowed)."""
    cand = _candidates(s, q, allowed)
    values, chosen = torch.topk(cand, top_k + 1, dim=-1)
    load = torch.bincount(chosen[:, :top_k].reshape(-1), minlength=s.shape[1])
    picked = torch.zeros_like(s, dtype=torch.bool).scatter_(1, chosen[:, :top_k], True)
    rival = torch.where(picked, values[:, top_k:], values[:, top_k - 1:top_k])
    rival = rival.clamp_min(float(s.min()) - float(q.max()) - 1.0)  # fewer than k+1 allowed: no real rival
    margins = torch.where(torch.isfinite(cand), s - rival, -math.inf)
    return load, margins.T.contiguous()


def _candidates(s: torch.Tensor, q: torch.Tensor, allowed: Allowed | None) -> torch.Tensor:
    """s − q, −inf where an expert is not allowed for the token."""
    return s - q if allowed is None else (s - q).masked_fill(~allowed(q), -math.inf)


def _check(scores: torch.Tensor) -> torch.Tensor:
    if scores.ndim != 2 or scores.shape[0] == 0:
        raise UserError(f"router scores of shape {tuple(scores.shape)}: expected [tokens, experts] with tokens > 0; "
                        "calibrate on at least one window")
    return scores.float()
