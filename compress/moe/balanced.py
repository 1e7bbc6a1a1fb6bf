"""Balanced MoE models: a selection-only bias q per sparse block (experts chosen by the top-k of (s − q), weighted by
the original scores s), fitted on calibration windows, applied, evaluated and saved as an artifact.

deepseek_v3 has the bias natively (`e_score_correction_bias`, added: s + b), so b = max(q) − q is written there and
plain from_pretrained works; b ≥ 0 keeps s + b > 0, which HF's group masking (masked scores set to 0) needs to select
exactly as top-k(s − q) does. Every other family gets its sparse block replaced by a `BalancedSparseMoe` holding the
same router / experts / shared-expert modules (state-dict names unchanged) and a `selection_bias` buffer.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from compress.errors import UserError
from compress.moe.layout import MoeLayer, moe_family, moe_layers
from compress.moe.routing import (
    RoutingCapture,
    as_module,
    block_bias,
    block_route,
    capture_routing,
    combine_weights,
    forward,
    group_mask,
    router_scores,
)

if TYPE_CHECKING:
    from compress.data import Windows
    from compress.models.hf import LoadedModel

FORMAT = "compress-moe-v1"
METHODS = ("bip", "greedy")


class BalancedSparseMoe(nn.Module):
    """A softmax-routed sparse block (mixtral, qwen2_moe, qwen3_moe, olmoe) choosing experts by top-k(s − q)."""

    def __init__(self, block: nn.Module, layer: MoeLayer, bias: torch.Tensor | None = None):
        nn.Module.__init__(self)  # not the family class's __init__: the modules are taken over from `block`
        for k, v in vars(block).items():
            if not k.startswith("_") and k != "training" and isinstance(v, int | float | bool | str):
                setattr(self, k, v)  # plain attributes readers of the family block expect (top_k, num_experts, ...)
        self.gate, self.experts = block.gate, block.experts
        self.has_shared = getattr(block, "shared_expert", None) is not None
        if self.has_shared:
            self.shared_expert, self.shared_expert_gate = block.shared_expert, block.shared_expert_gate
        self.top_k, self.normalize = layer.top_k, layer.normalize
        self.jitter_noise = float(getattr(block, "jitter_noise", 0.0) or 0.0)
        bias = block_bias(block) if bias is None else bias
        bias = torch.zeros(len(self.experts)) if bias is None else bias
        self.register_buffer("selection_bias", bias.detach().float().clone())
        self.runtime_capacity: float | None = None  # per-pass BIP on top of the bias (set by apply_bias)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden states, router logits), as the family's sparse block returns them."""
        batch, seq, dim = hidden_states.shape
        if self.training and self.jitter_noise > 0:
            hidden_states *= torch.empty_like(hidden_states).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        x = hidden_states.view(-1, dim)
        router_logits = self.gate(x)
        scores = router_scores(router_logits, "softmax")
        indices = block_route(self, scores, self.top_k)
        weights = combine_weights(scores, indices, self.normalize).to(x.dtype)
        out = self.routed(x, indices, weights)
        if self.has_shared:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out.reshape(batch, seq, dim), router_logits

    def routed(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Sum of the chosen experts' outputs, weighted, computed only on the tokens that chose each expert."""
        out = torch.zeros_like(x)
        mask = nn.functional.one_hot(indices, num_classes=len(self.experts)).permute(2, 1, 0)
        for e in torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero():
            slot, tok = torch.where(mask[e].squeeze(0))
            out.index_add_(0, tok, (self.experts[e](x[None, tok].reshape(-1, x.shape[-1]))
                                    * weights[tok, slot, None]).to(x.dtype))
        return out

    def extra_repr(self) -> str:
        return (f"top_k={self.top_k}, normalize={self.normalize}, shared={self.has_shared}, "
                f"runtime_capacity={self.runtime_capacity}")


_SUBCLASSES: dict[tuple[type, type], type] = {}


def family_subclass(base: type, block_cls: type) -> type:
    """`base` mixed over the family's block class, so isinstance checks on the original class (transformers records
    router logits by class) still hold; cached per pair, and a module global so it pickles."""
    block_cls = next(c for c in block_cls.__mro__ if not c.__module__.startswith("compress.moe"))
    key = (base, block_cls)
    if key not in _SUBCLASSES:
        name = f"{base.__name__}_{block_cls.__name__}"
        cls = type(name, (base, block_cls), {"__module__": __name__, "__qualname__": name})
        _SUBCLASSES[key] = globals()[name] = cls
    return _SUBCLASSES[key]


def apply_bias(model: nn.Module | LoadedModel, biases: dict[str, torch.Tensor],
               runtime_capacity: float | None = None) -> nn.Module:
    """Give each sparse block (path -> q [E]) its selection bias, in place: deepseek_v3's native bias, a
    BalancedSparseMoe elsewhere (a block that already is one gets the new q). `runtime_capacity`: every forward
    pass also re-solves the BIP on its own tokens (routing.route)."""
    module = as_module(model)
    family, fam = moe_family(module)
    if fam.native_bias and runtime_capacity is not None:
        raise UserError(f"{family} selects with its own router and bias: --runtime-capacity applies to "
                        "softmax-routed families (mixtral, qwen2_moe, qwen3_moe, olmoe)")
    if runtime_capacity is not None and not (math.isfinite(runtime_capacity) and runtime_capacity >= 1.0):
        raise UserError(f"--runtime-capacity {runtime_capacity}: must be ≥ 1.0 (a multiple of the mean load)")
    layers = {m.path: m for m in moe_layers(module)}
    for path, q in biases.items():
        if path not in layers:
            raise UserError(f"{path}: not a sparse MoE block of this {family} model ({len(layers)} blocks, e.g. "
                            f"{next(iter(layers))}); the bias does not fit the model")
        q = torch.as_tensor(q, dtype=torch.float32)
        block = module.get_submodule(path)
        if q.shape != (layers[path].num_experts,):
            raise UserError(f"{path}: selection bias has {tuple(q.shape)} values, the block has "
                            f"{layers[path].num_experts} experts")
        if fam.native_bias:
            getattr(block, fam.router).get_buffer(fam.native_bias).copy_(q.max() - q)
        elif block_bias(block) is not None:
            block.selection_bias.copy_(q)
            block.runtime_capacity = runtime_capacity
        else:
            new = family_subclass(BalancedSparseMoe, type(block))(block, layers[path], q)
            new.runtime_capacity = runtime_capacity
            _swap(module, path, new)
    return module


def current_bias(model: nn.Module | LoadedModel) -> dict[str, list[float]]:
    """The selection bias q of every sparse block (zeros for an original block), as q ≥ 0 lists."""
    module = as_module(model)
    _, fam = moe_family(module)
    out = {}
    for layer in moe_layers(module):
        block = module.get_submodule(layer.path)
        if fam.native_bias:
            q = -getattr(block, fam.router).get_buffer(fam.native_bias).float()
        else:
            q = block_bias(block)
            q = torch.zeros(layer.num_experts) if q is None else q.float()
        out[layer.path] = (q - q.min()).tolist()
    return out


@dataclass
class RebalanceResult:
    """What rebalancing fitted and what it did to the calibration load."""

    method: str
    capacity: float
    family: str
    bias: dict[str, list[float]]  # sparse block path -> q
    layers: list[dict[str, Any]]  # per layer: index, path, max_over_mean before / after on calibration, iterations
    tokens: int
    seconds: float
    notes: list[str] = field(default_factory=list)
    runtime_capacity: float | None = None  # per-pass BIP bound, None: the bias alone

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def rebalance(model: nn.Module | LoadedModel, calib_windows: Windows, method: str = "bip", capacity: float = 1.1,
              max_iter: int = 100, lr: float = 1e-3, sequential: bool = True, margin: float = 0.0,
              runtime_capacity: float | None = None) -> RebalanceResult:
    """Capture router scores on `calib_windows`, fit q per layer (`method` bip | greedy), apply it in place.

    `sequential`: layer l is fitted on the scores it sees once layers < l are balanced (a forward pass stopped after
    layer l per layer), so every layer meets the capacity on the calibration tokens of the balanced model.
    `margin`: fit to capacity − margin (≥ 1.0), so text other than the calibration's has room before it reaches the
    capacity. `runtime_capacity`: the balanced blocks also re-solve the BIP on every forward pass's own tokens
    (routing.route), a bound on any text."""
    from compress.moe.bip import fit_bias_bip, fit_bias_greedy
    from compress.moe.stats import load_of, max_over_mean

    if method not in METHODS:
        raise UserError(f"--method {method}: unknown rebalancing method; use one of {', '.join(METHODS)}")
    module = as_module(model)
    family, fam = moe_family(module)
    start = time.perf_counter()
    layers = moe_layers(module)
    first = capture_routing(module, calib_windows, keep_scores=True if not sequential else {layers[0].index})
    rows, notes = [], []
    groups = _groups(module) if fam.native_bias else None
    if groups:
        notes.append(f"group-limited routing ({groups[0]} groups, top {groups[1]}): fitted with the group mask")
    for layer in layers:
        rec = first[layer.index] if not sequential or layer is layers[0] else capture_routing(
            module, calib_windows, keep_scores=True, layers={layer.index}, stop_after=layer.index)[layer.index]
        history: list[float] = []
        fit = fit_bias_bip if method == "bip" else fit_bias_greedy
        kwargs = {"lr": lr} if method == "greedy" else {}
        scores = rec.scores
        allowed = (lambda q, s=scores: group_mask(s - q, *groups)) if groups else None
        q = fit(scores, layer.top_k, max(1.0, capacity - margin), max_iter=max_iter, history=history,
                allowed=allowed, **kwargs)
        apply_bias(module, {layer.path: q}, runtime_capacity)
        rows.append({"index": layer.index, "path": layer.path,
                     "before": max_over_mean(load_of(first[layer.index].indices, layer.num_experts)),
                     "iterations": len(history) - 1, "fit_max_over_mean": history[-1]})
    after = capture_routing(module, calib_windows)
    for row, layer in zip(rows, layers, strict=True):
        row["after"] = max_over_mean(load_of(after[layer.index].indices, layer.num_experts))
    return RebalanceResult(method, capacity, family, current_bias(module), rows, first[layers[0].index].tokens,
                           round(time.perf_counter() - start, 3), notes, runtime_capacity)


@dataclass
class BalanceEval:
    """Load before / after on held-out windows and how much the output distribution moved."""

    layers: list[dict[str, Any]]  # per layer: index, path, before / after max_over_mean and cv
    kl_mean: float
    kl_p99: float
    top1_agreement: float
    tokens: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


@torch.inference_mode()
def evaluate_balance(model_before: nn.Module | LoadedModel, model_after: nn.Module | LoadedModel,
                     heldout_windows: Windows) -> BalanceEval:
    """Per-layer max/mean load of both models on `heldout_windows`, KL(before ‖ after) mean / p99, top-1 agreement."""
    from compress.metrics import kl_per_token, log_softmax_chunked, summarize, top1_agreement
    from compress.moe.stats import layer_stats

    ref, cand = as_module(model_before), as_module(model_after)
    kl, top1 = [], []
    with RoutingCapture(ref) as cap_ref, RoutingCapture(cand) as cap_cand:
        for ids, mask in zip(heldout_windows.input_ids, heldout_windows.attention_mask, strict=True):
            ids, mask = ids.unsqueeze(0), mask.unsqueeze(0)
            with cap_cand.paused():  # the same model may be passed twice: each capture sees its own forward
                lr = forward(ref, cap_ref, ids, mask)
            with cap_ref.paused():
                lc = forward(cand, cap_cand, ids, mask)
            keep = mask.reshape(-1).bool()
            kl.append(kl_per_token(log_softmax_chunked(lr), lc).reshape(-1)[keep])
            top1.append(top1_agreement(lr, lc).reshape(-1)[keep])
    rows = []
    for i, rec in cap_ref.layers.items():
        b, a = layer_stats(rec), layer_stats(cap_cand.layers[i])
        rows.append({"index": i, "path": b.path, "before": b.max_over_mean, "after": a.max_over_mean,
                     "cv_before": b.cv, "cv_after": a.cv, "dead_before": len(b.dead), "dead_after": len(a.dead)})
    kls = summarize(torch.cat(kl))
    return BalanceEval(rows, kls["mean"], kls["p99"], float(torch.cat(top1).mean()), int(torch.cat(kl).numel()))


def save_balanced(loaded: LoadedModel, out: Path, result: RebalanceResult | None = None,
                  manifest: dict[str, Any] | None = None) -> Path:
    """Write the balanced model in `loaded` (a LoadedModel) to `out` as a compress-moe-v1 artifact."""
    from compress.artifact import save_dir

    family, fam = moe_family(loaded.module)
    balance = {"family": family, "native_bias": bool(fam.native_bias), "selection_bias": current_bias(loaded.module),
               "method": result.method if result else None, "capacity": result.capacity if result else None,
               "runtime_capacity": _runtime_capacity_of(loaded.module)}
    # deepseek_v3 keeps the bias in its own buffer: plain safetensors, so from_pretrained loads it as well
    return save_dir(loaded, out, FORMAT, {"moe_balance": balance, **(manifest or {})},
                    weights_format="pt" if fam.native_bias else None)


def load_balanced(path: Path, manifest: dict[str, Any]) -> LoadedModel:
    """Rebuild a model saved by `save_balanced`: skeleton from config, balanced blocks swapped in, weights loaded."""
    from compress.artifact import rebuild

    path = Path(path)
    return rebuild(path, manifest, lambda model: restructure_balanced(model, manifest, path))


def restructure_balanced(model, manifest: dict[str, Any], path: Path | str = "artifact") -> None:
    """Swap a freshly built model's sparse blocks for balanced ones with the manifest's selection biases."""
    from compress.artifact import MANIFEST

    try:
        balance = manifest["moe_balance"]
        biases = balance["selection_bias"]
        apply_bias(model, {p: torch.tensor(q) for p, q in biases.items()}, balance.get("runtime_capacity"))
    except (KeyError, TypeError) as exc:
        raise UserError(f"{path}/{MANIFEST}: moe_balance.selection_bias is missing or malformed ({exc}); "
                        "re-save the model with save_balanced") from exc


def _runtime_capacity_of(module: nn.Module) -> float | None:
    """The per-pass capacity of the model's balanced blocks (None: the bias alone)."""
    caps = {getattr(module.get_submodule(ly.path), "runtime_capacity", None) for ly in moe_layers(module)}
    if len(caps) > 1:
        raise ValueError(f"balanced blocks with several runtime capacities: {sorted(map(str, caps))}")
    return caps.pop() if caps else None


def _groups(module: nn.Module) -> tuple[int, int] | None:
    """(n_group, topk_group) when deepseek_v3 routing is group-limited, else None."""
    n_group = int(getattr(module.config, "n_group", 1) or 1)
    topk_group = int(getattr(module.config, "topk_group", n_group) or n_group)
    return (n_group, topk_group) if n_group > 1 and topk_group < n_group else None


def _swap(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
