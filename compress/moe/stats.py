"""Expert-load statistics of an MoE model on token windows: tokens per expert, max/mean load, coefficient of
variation, router entropy, dead experts and expert co-activation, per layer."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch

from compress.moe.routing import LayerRouting, capture_routing, max_entropy

if TYPE_CHECKING:
    from torch import nn

    from compress.data import Windows
    from compress.models.hf import LoadedModel


@dataclass
class LayerStats:
    """Load of one MoE layer's experts over the captured tokens."""

    index: int
    path: str
    num_experts: int
    top_k: int
    tokens: int
    load: list[int]  # tokens routed to each expert (sums to tokens * top_k)
    max_over_mean: float  # max load / mean load (1.0 = perfectly balanced)
    cv: float  # coefficient of variation of the load (std / mean)
    router_entropy: float  # mean per-token entropy of the router scores, nats
    load_entropy: float  # entropy of the load distribution, nats (log E = uniform)
    max_entropy: float  # log E
    dead: list[int]  # experts that got no token
    coactivation: list[list[int]]  # [i][j]: tokens that chose both i and j (diagonal = load)


@dataclass
class MoeStats:
    """Per-layer expert-load statistics of one model on one set of windows."""

    layers: list[LayerStats]
    tokens: int

    @property
    def worst(self) -> LayerStats:
        """The layer with the highest max/mean load."""
        return max(self.layers, key=lambda s: s.max_over_mean)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with a per-layer list and the worst layer's index."""
        return {"tokens": self.tokens, "worst_layer": self.worst.index if self.layers else None,
                "max_over_mean": max((s.max_over_mean for s in self.layers), default=None),
                "layers": [asdict(s) for s in self.layers]}


def moe_stats(model: nn.Module | LoadedModel, windows: Windows) -> MoeStats:
    """Capture the routing of `model` (nn.Module or LoadedModel) on `windows` and summarise every MoE layer."""
    routing = capture_routing(model, windows)
    layers = [layer_stats(r) for r in routing.values()]
    return MoeStats(layers, layers[0].tokens if layers else 0)


def layer_stats(routing: LayerRouting) -> LayerStats:
    """Summarise one layer's captured routing."""
    idx, n_exp = routing.indices, routing.layer.num_experts
    tokens = len(idx)
    load = load_of(idx, n_exp)
    co = coactivation(idx, n_exp)
    return LayerStats(
        index=routing.layer.index, path=routing.layer.path, num_experts=n_exp, top_k=routing.layer.top_k,
        tokens=tokens, load=load.tolist(), max_over_mean=max_over_mean(load), cv=_cv(load),
        router_entropy=routing.entropy_sum / tokens if tokens else 0.0, load_entropy=_entropy(load),
        max_entropy=max_entropy(n_exp), dead=[e for e, n in enumerate(load.tolist()) if n == 0],
        coactivation=co.tolist(),
    )


def load_of(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Tokens per expert from chosen indices [tokens, k] (int64 counts)."""
    return torch.bincount(indices.reshape(-1).long(), minlength=num_experts)


def coactivation(indices: torch.Tensor, num_experts: int, chunk: int = 65536) -> torch.Tensor:
    """[E, E] int64: tokens whose chosen experts include both i and j, in token chunks (bounded memory)."""
    out = torch.zeros(num_experts, num_experts, dtype=torch.float64)
    for s in range(0, len(indices), chunk):
        part = indices[s:s + chunk].long()
        chosen = torch.zeros(len(part), num_experts, dtype=torch.float64).scatter_(1, part, 1.0)
        out += chosen.T @ chosen
    return out.round().to(torch.int64)


def max_over_mean(load: torch.Tensor) -> float:
    """Max load over mean load (nan without tokens)."""
    mean = float(load.double().mean())
    return float(load.max()) / mean if mean > 0 else math.nan


def _cv(load: torch.Tensor) -> float:
    x = load.double()
    return float(x.std(unbiased=False) / x.mean()) if x.mean() > 0 else math.nan


def _entropy(load: torch.Tensor) -> float:
    p = load.double() / max(int(load.sum()), 1)
    return float(-(p[p > 0] * p[p > 0].log()).sum())
