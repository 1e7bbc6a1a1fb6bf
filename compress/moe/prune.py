"""Expert pruning for MoE decoders: score routed experts on calibration windows, drop (or merge) the least useful.

Usefulness of expert e in a layer = routed mass (Σ routing weights of the tokens routed to e) × mean norm of e's output
on those tokens. `kl` importance instead measures the divergence of the final logits when e alone is masked out of
routing. Masking (`masked_experts`) restricts a router to the kept experts exactly as pruning does (softmax families:
−inf logits; deepseek_v3: selection recomputed without them), so measured costs are the costs of the real edit.

`prune_experts` edits in place: the experts ModuleList loses the dropped entries, the router loses their rows
(deepseek_v3: weight rows and `e_score_correction_bias`, every group keeping the same count so `n_group` still
divides), and the block's expert count follows. All five families' forwards then read the new count (mixtral, qwen2/3
and olmoe use `block.num_experts`, deepseek_v3 `len(experts)` and `gate.n_routed_experts`). When every layer keeps the
same count the config says so too; otherwise the config keeps an upper bound and the per-layer counts live in the
record (and the artifact manifest). The load-balancing aux loss (output_router_logits) needs one count for all layers.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compress.errors import UserError
from compress.moe.layout import MOE_FAMILIES, MoeLayer, moe_family, moe_layers
from compress.moe.schedule import SCHEDULES, removal_caps, schedule_counts

COUNT_ATTR = {"mixtral": "num_local_experts", "qwen2_moe": "num_experts", "qwen3_moe": "num_experts",
              "olmoe": "num_experts", "deepseek_v3": "n_routed_experts"}
IMPORTANCES = ("usefulness", "kl", "random")


@dataclass
class ExpertStats:
    """Per-expert routing facts of one layer on calibration tokens."""

    counts: torch.Tensor  # [E] top-k slots routed to the expert
    mass: torch.Tensor  # [E] Σ routing weights of those slots
    norm: torch.Tensor  # [E] mean ‖expert output‖ on its tokens (0 when it got none)
    inputs: torch.Tensor | None = None  # [T, H] sample of the block's inputs (for output similarity)

    @property
    def usefulness(self) -> torch.Tensor:
        """Routed mass × mean output norm."""
        return self.mass * self.norm


@dataclass
class MoePrunePlan:
    """What prune_moe decided and did: per layer kept/dropped ids and scores, the schedule's counts and costs."""

    percent: float
    schedule: str
    importance: str
    merge: bool
    removed: int
    total: int
    layers: dict[int, dict[str, Any]]
    costs: list[list[float]] | None = None
    experts_per_layer: dict[int, int] = field(default_factory=dict)
    config_updated: bool = False
    align: bool = True

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        costs = None if self.costs is None else [[None if math.isinf(c) else c for c in row] for row in self.costs]
        return {"percent": self.percent, "schedule": self.schedule, "importance": self.importance,
                "merge": self.merge, "align": self.align, "removed": self.removed, "total": self.total,
                "layers": self.layers,
                "costs": costs, "experts_per_layer": self.experts_per_layer, "config_updated": self.config_updated}


# ------------------------------------------------------------------------------------------------- routing


def _module(model: Any) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def _ids(windows: Any) -> torch.Tensor:
    ids = windows.input_ids if hasattr(windows, "input_ids") else windows
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or not len(ids):
        raise UserError("calibration windows: need token windows [n, seq_len] (compress.data.load_windows)")
    return ids


def _batches(ids: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [ids[s:s + batch_size] for s in range(0, len(ids), batch_size)]


def _route(layer: MoeLayer, output: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(selected experts [T, k], their weights [T, k]) from the router's output."""
    if layer.scoring == "sigmoid":
        return output[0], output[1].float()
    probs = F.softmax(output.float(), dim=-1)
    w, idx = torch.topk(probs, layer.top_k, dim=-1)
    if layer.normalize:
        w = w / w.sum(dim=-1, keepdim=True)
    return idx, w


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


@torch.inference_mode()
def expert_stats(model: Any, windows: Any, keep_inputs: int = 0, batch_size: int = 4) -> dict[int, ExpertStats]:
    """Routed counts, mass and mean output norm of every expert of every MoE layer on `windows`."""
    module = _module(model)
    layers = moe_layers(module)
    acc = {ly.index: {"counts": torch.zeros(ly.num_experts), "mass": torch.zeros(ly.num_experts),
                      "norm": torch.zeros(ly.num_experts), "rows": torch.zeros(ly.num_experts), "inputs": []}
           for ly in layers}
    handles = []

    def on_router(ly: MoeLayer):
        def hook(mod, args, output):
            idx, w = _route(ly, output)
            a = acc[ly.index]
            a["counts"] += torch.bincount(idx.reshape(-1), minlength=ly.num_experts).float()
            a["mass"] += torch.zeros(ly.num_experts).index_add_(0, idx.reshape(-1), w.reshape(-1).float())
        return hook

    def on_expert(ly: MoeLayer, e: int):
        def hook(mod, args, output):
            acc[ly.index]["norm"][e] += float(output.float().norm(dim=-1).sum())
            acc[ly.index]["rows"][e] += output.reshape(-1, output.shape[-1]).shape[0]
        return hook

    def on_block(ly: MoeLayer):
        def hook(mod, args, kwargs):
            a = acc[ly.index]
            have = sum(len(x) for x in a["inputs"])
            if have < keep_inputs:
                h = _hidden(args, kwargs)
                a["inputs"].append(h.reshape(-1, h.shape[-1])[: keep_inputs - have].detach().float().clone())
        return hook

    try:
        for ly in layers:
            handles.append(module.get_submodule(ly.router).register_forward_hook(on_router(ly)))
            for e, path in enumerate(ly.experts):
                handles.append(module.get_submodule(path).register_forward_hook(on_expert(ly, e)))
            if keep_inputs:
                handles.append(module.get_submodule(ly.path).register_forward_pre_hook(on_block(ly),
                                                                                       with_kwargs=True))
        for ids in _batches(_ids(windows), batch_size):
            module(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for i, a in acc.items():
        norm = torch.where(a["rows"] > 0, a["norm"] / a["rows"].clamp_min(1), torch.zeros_like(a["norm"]))
        out[i] = ExpertStats(a["counts"], a["mass"], norm, torch.cat(a["inputs"]) if a["inputs"] else None)
    return out


def _deepseek_select(gate: nn.Module, hidden: torch.Tensor, drop: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """deepseek_v3's router with the `drop` experts ([E] bool) taken out of selection, as pruning them would."""
    h = hidden.reshape(-1, gate.weight.shape[1])
    scores = F.linear(h.float(), gate.weight.float()).sigmoid()
    choice = (scores + gate.e_score_correction_bias.unsqueeze(0)).masked_fill(drop.unsqueeze(0), -math.inf)
    n, g = scores.shape[1], gate.n_group
    group_scores = choice.view(-1, g, n // g).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=gate.topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(-1, g, n // g).reshape(-1, n)
    idx = torch.topk(choice.masked_fill(~score_mask.bool(), 0.0), k=gate.top_k, dim=-1, sorted=False)[1]
    w = scores.gather(1, idx)
    if gate.norm_topk_prob:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return idx, w * gate.routed_scaling_factor


@contextlib.contextmanager
def masked_experts(model: Any, dropped: dict[int, list[int]]) -> Iterator[None]:
    """Route as if the `dropped` experts (per decoder-layer index) were pruned, without touching weights."""
    module = _module(model)
    by_index = {ly.index: ly for ly in moe_layers(module)}
    handles = []

    def hook_for(ly: MoeLayer, drop: torch.Tensor):
        def hook(mod, args, output):
            if ly.scoring == "sigmoid":
                return _deepseek_select(mod, args[0], drop.to(args[0].device))
            return output.masked_fill(drop.to(output.device), -math.inf)
        return hook

    try:
        for i, ids in dropped.items():
            if not ids:
                continue
            ly = by_index[i]
            drop = torch.zeros(ly.num_experts, dtype=torch.bool)
            drop[list(ids)] = True
            handles.append(module.get_submodule(ly.router).register_forward_hook(hook_for(ly, drop)))
        yield
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------------------------------------- measuring


@torch.inference_mode()
def reference(model: Any, windows: Any, batch_size: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input ids, reference log-probs) per batch: what `mean_kl` compares against."""
    module = _module(model)
    return [(ids, F.log_softmax(module(input_ids=ids, use_cache=False).logits.float(), dim=-1))
            for ids in _batches(_ids(windows), batch_size)]


@torch.inference_mode()
def mean_kl(model: Any, ref: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean per-token KL(reference ‖ model) over the reference batches."""
    from compress.metrics import kl_per_token

    module = _module(model)
    total, n = 0.0, 0
    for ids, lp in ref:
        kl = kl_per_token(lp, module(input_ids=ids, use_cache=False).logits)
        total, n = total + float(kl.sum()), n + kl.numel()
    return total / max(n, 1)


def expert_kl(model: Any, ref: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[int, torch.Tensor]:
    """Per layer [E]: ΔKL of the final logits when that expert alone is masked out of routing."""
    return {ly.index: torch.tensor([_masked_kl(model, ref, {ly.index: [e]}) for e in range(ly.num_experts)])
            for ly in moe_layers(_module(model))}


def _masked_kl(model: Any, ref: list, dropped: dict[int, list[int]]) -> float:
    with masked_experts(model, dropped):
        return mean_kl(model, ref)


def drop_order(scores: torch.Tensor | list[float], n: int, n_group: int = 1) -> list[int]:
    """The `n` least useful experts (ties: higher index first); with groups, n / n_group from every group."""
    s = [float(x) for x in scores]
    rank = sorted(range(len(s)), key=lambda e: (s[e], -e))
    if n_group <= 1:
        return sorted(rank[:n])
    per, size = n // n_group, len(s) // n_group
    return sorted(e for g in range(n_group) for e in [r for r in rank if r // size == g][:per])


def cost_curves(model: Any, ref: list, scores: dict[int, torch.Tensor], caps: list[int],
                multiple: int = 1) -> list[list[float]]:
    """Per layer: ΔKL when that layer alone drops its u·multiple least useful experts, u = 0..caps[l]."""
    layers = moe_layers(_module(model))
    out = []
    for ly, cap in zip(layers, caps, strict=True):
        group = _n_group(_module(model), ly)
        out.append([0.0] + [_masked_kl(model, ref, {ly.index: drop_order(scores[ly.index], u * multiple, group)})
                            for u in range(1, cap + 1)])
    return out


# ------------------------------------------------------------------------------------------------ editing


def _n_group(module: nn.Module, ly: MoeLayer) -> int:
    return int(getattr(module.get_submodule(ly.router), "n_group", 1) or 1) if ly.scoring == "sigmoid" else 1


def min_keep(module: nn.Module, ly: MoeLayer) -> int:
    """Fewest experts layer `ly` may keep: max(top_k, 1); deepseek_v3: ≥ 2 per group (its group score is a top-2)
    and enough per selected group to fill top_k."""
    if ly.scoring != "sigmoid":
        return max(ly.top_k, 1)
    gate = module.get_submodule(ly.router)
    g, tg = _n_group(module, ly), int(getattr(gate, "topk_group", 1) or 1)
    return max(ly.top_k, g * max(2, -(-ly.top_k // tg)))


def _check_keep(module: nn.Module, layers: dict[int, MoeLayer], keep: dict[int, list[int]]) -> dict[int, list[int]]:
    out = {}
    for i, ids in keep.items():
        if i not in layers:
            raise UserError(f"keep: layer {i!r} has no routed experts (MoE layers: {sorted(layers)})")
        ly = layers[i]
        n = ly.num_experts
        bad = any(isinstance(e, bool) or not isinstance(e, int) or not 0 <= e < n for e in ids)
        if bad or len(set(ids)) != len(ids):
            raise UserError(f"keep: layer {i} needs distinct expert ids in 0..{n - 1}, got {list(ids)}")
        kept = sorted(ids)
        floor = min_keep(module, ly)
        if len(kept) < floor:
            raise UserError(f"keep: layer {i} keeps {len(kept)} experts but needs at least {floor} "
                            f"(top_k={ly.top_k}); keep more experts in that layer")
        g = _n_group(module, ly)
        if g > 1 and len(kept) != n:
            per = Counter(e // (n // g) for e in kept)
            counts = [per.get(x, 0) for x in range(g)]
            if len(set(counts)) != 1:
                raise UserError(f"keep: deepseek_v3 layer {i} routes within n_group={g} groups of {n // g}; every "
                                f"group must keep the same number of experts (kept per group {counts}) so the "
                                "groups stay intact")
        out[i] = kept
    return out


def _slice_rows(lin: nn.Linear, idx: torch.Tensor) -> None:
    with torch.no_grad():
        lin.weight = nn.Parameter(lin.weight.index_select(0, idx).clone(), requires_grad=lin.weight.requires_grad)
        if lin.bias is not None:
            lin.bias = nn.Parameter(lin.bias.index_select(0, idx).clone(), requires_grad=lin.bias.requires_grad)
    lin.out_features = len(idx)


def slice_block(block: nn.Module, family: str, kept: list[int]) -> None:
    """Keep only experts `kept` (in that order) of one sparse block: ModuleList, router rows, expert count."""
    fam = MOE_FAMILIES[family]
    experts = getattr(block, fam.experts)
    setattr(block, fam.experts, nn.ModuleList([experts[e] for e in kept]))
    gate = getattr(block, fam.router)
    idx = torch.tensor(kept, dtype=torch.long)
    if fam.native_bias:
        with torch.no_grad():
            gate.weight = nn.Parameter(gate.weight.index_select(0, idx).clone(),
                                       requires_grad=gate.weight.requires_grad)
            setattr(gate, fam.native_bias, getattr(gate, fam.native_bias).index_select(0, idx).clone())
        gate.n_routed_experts = len(kept)
    else:
        _slice_rows(gate, idx)
    if isinstance(getattr(block, "num_experts", None), int):
        block.num_experts = len(kept)


def sync_config(module: nn.Module) -> bool:
    """Write the per-layer expert count into the config when all layers agree; True when written."""
    family, _ = moe_family(module)
    counts = {ly.num_experts for ly in moe_layers(module)}
    if len(counts) != 1:
        return False
    n = counts.pop()
    setattr(module.config, COUNT_ATTR[family], n)
    if isinstance(getattr(module, "num_experts", None), int):
        module.num_experts = n
    return True


def prune_experts(model: Any, keep: dict[int, list[int]], merge: bool = False,
                  counts: dict[int, Any] | None = None, similarity: str = "weight",
                  inputs: dict[int, torch.Tensor] | None = None, align: bool = True) -> dict[str, Any]:
    """Keep only `keep[layer]` experts in place (unlisted layers keep all); `merge` first folds each dropped expert
    into its most similar kept one (weights: routed `counts`). Returns {layers, experts_per_layer, config_updated}."""
    from compress.moe.merge import merge_experts

    module = _module(model)
    family, fam = moe_family(module)
    layers = {ly.index: ly for ly in moe_layers(module)}
    keep = _check_keep(module, layers, keep)
    record: dict[int, dict[str, Any]] = {}
    for i, kept in keep.items():
        ly = layers[i]
        block = module.get_submodule(ly.path)
        dropped = [e for e in range(ly.num_experts) if e not in set(kept)]
        merged = {}
        if merge and dropped:
            merged = merge_experts(getattr(block, fam.experts), fam.expert_linears, kept, dropped,
                                   None if counts is None else counts.get(i), similarity,
                                   None if inputs is None else inputs.get(i), align)
        if dropped:
            slice_block(block, family, kept)
        record[i] = {"kept": kept, "dropped": dropped, "merged_into": merged}
    per_layer = {ly.index: ly.num_experts for ly in moe_layers(module)}
    return {"layers": record, "experts_per_layer": per_layer, "config_updated": sync_config(module)}


# ---------------------------------------------------------------------------------------------- entry point


def prune_moe(model: Any, calib_windows: Any, percent: float, schedule: str = "uniform", merge: bool = False,
              importance: str = "usefulness", seed: int = 0, similarity: str = "output",
              batch_size: int = 4, align: bool = True) -> tuple[MoePrunePlan, Any]:
    """Score experts on `calib_windows`, pick per-layer counts by `schedule`, drop (or merge) the least useful
    `percent`% of all routed experts in place; return (plan, model)."""
    if schedule not in SCHEDULES:
        raise UserError(f"unknown expert schedule '{schedule}': use one of {', '.join(SCHEDULES)}")
    if importance not in IMPORTANCES:
        raise UserError(f"unknown expert importance '{importance}': use one of {', '.join(IMPORTANCES)}")
    module = _module(model)
    layers = moe_layers(module)
    groups = [_n_group(module, ly) for ly in layers]
    multiple = max(groups)
    sizes = [ly.num_experts for ly in layers]
    floors = [min_keep(module, ly) for ly in layers]
    top_k = [ly.top_k for ly in layers]
    schedule_counts(sizes, top_k, percent, "uniform", multiple=multiple, min_keep=floors)  # bad percent: fail now
    stats = expert_stats(module, calib_windows, keep_inputs=512 if merge and similarity == "output" else 0,
                         batch_size=batch_size)
    ref = reference(module, calib_windows, batch_size) if importance == "kl" or schedule == "adaptive" else None
    if importance == "usefulness":
        scores = {i: s.usefulness for i, s in stats.items()}
    elif importance == "kl":
        scores = expert_kl(module, ref)
    else:
        gen = torch.Generator().manual_seed(seed)
        scores = {ly.index: torch.rand(ly.num_experts, generator=gen) for ly in layers}
    costs = None
    if schedule == "adaptive":
        costs = cost_curves(module, ref, scores, removal_caps(sizes, floors, multiple), multiple)
    kept_counts = schedule_counts(sizes, top_k, percent, schedule, costs=costs, multiple=multiple, min_keep=floors)
    keep = {}
    for ly, k, g in zip(layers, kept_counts, groups, strict=True):
        gone = set(drop_order(scores[ly.index], ly.num_experts - k, g))
        keep[ly.index] = [e for e in range(ly.num_experts) if e not in gone]
    rec = prune_experts(module, keep, merge=merge, counts={i: s.counts for i, s in stats.items()},
                        similarity=similarity, inputs={i: s.inputs for i, s in stats.items()}, align=align)
    per_layer = {}
    for ly in layers:
        r = rec["layers"][ly.index]
        per_layer[ly.index] = {"kept": r["kept"], "dropped": r["dropped"],
                               "merged_into": {str(d): k for d, k in r["merged_into"].items()},
                               "scores": [float(x) for x in scores[ly.index]],
                               "routed_tokens": [int(x) for x in stats[ly.index].counts]}
    plan = MoePrunePlan(percent=percent, schedule=schedule, importance=importance, merge=merge,
                        removed=sum(sizes) - sum(kept_counts), total=sum(sizes), layers=per_layer, costs=costs,
                        experts_per_layer=rec["experts_per_layer"], config_updated=rec["config_updated"],
                        align=align)
    return plan, model
