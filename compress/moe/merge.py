"""Fold dropped experts into their most similar kept expert (frequency-weighted averaging of gate/up/down).

Similarity: `weight` = cosine of the flattened gate/up/down weights; `output` = cosine of the experts' outputs on
sample block inputs (flattened over tokens). The merged expert k absorbing dropped experts D is
W_k + Σ_d c_d / (c_k + Σ c_D) · (W_d − W_k) with c = routed token counts, so merging an identical copy is exact.
With `align` (default) each dropped expert's intermediate channels are first permuted to best match the kept
expert's (assignment on the cosine of [gate row, up row, down column]): the permutation leaves the dropped expert's
function unchanged, but independently trained experts do not number their channels alike, and averaging unaligned
channels mostly destroys both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from compress.errors import UserError

SIMILARITIES = ("weight", "output")


def _flat_weights(expert: nn.Module, linears: tuple[str, ...]) -> torch.Tensor:
    return torch.cat([expert.get_submodule(n).weight.detach().reshape(-1).double() for n in linears])


@torch.no_grad()
def similarity_matrix(experts: nn.ModuleList, linears: tuple[str, ...], kept: list[int], dropped: list[int],
                      how: str = "weight", inputs: torch.Tensor | None = None) -> torch.Tensor:
    """Cosine similarity [len(dropped), len(kept)] of dropped vs kept experts, by weights or by outputs."""
    if how not in SIMILARITIES:
        raise UserError(f"unknown merge similarity '{how}': use {', '.join(SIMILARITIES)}")
    if how == "output":
        if inputs is None or not len(inputs):
            raise UserError("merge similarity 'output' needs sample block inputs from calibration windows; use "
                            "prune_moe (which collects them) or similarity 'weight'")
        dtype = next(experts[0].parameters()).dtype
        feats = {e: experts[e](inputs.to(dtype)).reshape(-1).double() for e in set(kept) | set(dropped)}
    else:
        feats = {e: _flat_weights(experts[e], linears) for e in set(kept) | set(dropped)}
    d = torch.stack([feats[e] for e in dropped])
    k = torch.stack([feats[e] for e in kept])
    return F.normalize(d, dim=1) @ F.normalize(k, dim=1).T


def _channels(expert: nn.Module, linears: tuple[str, ...]) -> torch.Tensor:
    gate, up, down = (expert.get_submodule(n).weight.detach().double() for n in linears)
    return torch.cat([gate, up, down.T], dim=1)


def channel_permutation(kept: nn.Module, dropped: nn.Module, linears: tuple[str, ...]) -> torch.Tensor:
    """perm such that channel perm[j] of `dropped` best matches channel j of `kept` (maximum total cosine)."""
    from scipy.optimize import linear_sum_assignment

    sim = F.normalize(_channels(kept, linears), dim=1) @ F.normalize(_channels(dropped, linears), dim=1).T
    rows, cols = linear_sum_assignment(sim.cpu().numpy(), maximize=True)
    return torch.as_tensor(cols[rows.argsort()], dtype=torch.long)


def _source(expert: nn.Module, name: str, attr: str, perm: torch.Tensor | None, is_down: bool) -> torch.Tensor:
    t = getattr(expert.get_submodule(name), attr).detach()
    if perm is None or (is_down and attr == "bias"):
        return t
    return t.index_select(1 if is_down else 0, perm.to(t.device))


@torch.no_grad()
def merge_experts(experts: nn.ModuleList, linears: tuple[str, ...], kept: list[int], dropped: list[int],
                  counts: list[float] | torch.Tensor | None = None, how: str = "weight",
                  inputs: torch.Tensor | None = None, align: bool = True) -> dict[int, int]:
    """Average every dropped expert into its most similar kept one, in place; return {dropped id: kept id}."""
    if not dropped:
        return {}
    sim = similarity_matrix(experts, linears, kept, dropped, how, inputs)
    target = {d: kept[int(sim[i].argmax())] for i, d in enumerate(dropped)}
    c = [1.0] * len(experts) if counts is None else [float(x) for x in counts]
    for k in kept:
        group = [d for d in dropped if target[d] == k]
        if not group:
            continue
        total = c[k] + sum(c[d] for d in group)
        shares = {d: (c[d] / total if total > 0 else 1.0 / (len(group) + 1)) for d in group}
        perms = {d: channel_permutation(experts[k], experts[d], linears) if align else None for d in group}
        for name in linears:
            dst = experts[k].get_submodule(name)
            for attr in ("weight", "bias"):
                p = getattr(dst, attr, None)
                if p is None:
                    continue
                base = p.detach().clone()
                delta = sum(shares[d] * (_source(experts[d], name, attr, perms[d], name == linears[2]) - base)
                            for d in group)
                p.copy_(base + delta)
    return target
