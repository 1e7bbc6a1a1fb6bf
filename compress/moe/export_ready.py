"""Export-friendly MoE blocks: every expert runs on every token and a dense [tokens, E] weight matrix (zero for
experts a token did not choose) combines them, so the forward has no data-dependent control flow and tracing
(torch.onnx, torch.jit.trace) keeps the full routing instead of baking in the experts one example happened to hit.

E× the expert FLOPs of the sparse forward: meant for export and small models, not for fast eager inference.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from compress.errors import UserError
from compress.moe.balanced import family_subclass
from compress.moe.layout import MoeLayer, moe_family, moe_layers
from compress.moe.routing import as_module, block_bias, combine_weights, router_scores, select

if TYPE_CHECKING:
    from compress.models.hf import LoadedModel


class DenseRoutedMoe(nn.Module):
    """A sparse block (any MoE family, original or balanced) computing all experts and a dense routing matrix."""

    def __init__(self, block: nn.Module, layer: MoeLayer):
        nn.Module.__init__(self)  # not the family class's __init__: the modules are taken over from `block`
        for k, v in vars(block).items():
            if not k.startswith("_") and k != "training" and isinstance(v, int | float | bool | str):
                setattr(self, k, v)
        self.gate, self.experts = block.gate, block.experts
        self.native_router = isinstance(getattr(block.gate, "e_score_correction_bias", None), torch.Tensor)
        self.shared_names = [n for n in ("shared_expert", "shared_expert_gate", "shared_experts")
                             if getattr(block, n, None) is not None]
        for n in self.shared_names:
            setattr(self, n, getattr(block, n))
        self.top_k, self.normalize = layer.top_k, layer.normalize
        if getattr(block, "runtime_capacity", None) is not None:
            raise UserError("this MoE re-solves its routing on every forward pass (--runtime-capacity), which an "
                            "exported graph cannot do yet; export a model rebalanced without --runtime-capacity")
        bias = block_bias(block)
        self.register_buffer("selection_bias", None if bias is None else bias.detach().float().clone())

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """What the family's block returns: (hidden, router_logits), or hidden alone for deepseek_v3."""
        batch, seq, dim = hidden_states.shape
        x = hidden_states.reshape(-1, dim)
        if self.native_router:  # deepseek_v3: its router selects (group-limited, native bias) and weighs
            indices, weights = self.gate(hidden_states)
            out = self.combine(x, indices, weights).to(x.dtype) + self.shared_experts(x)
            return out.reshape(batch, seq, dim)
        router_logits = self.gate(x)
        scores = router_scores(router_logits, "softmax")
        indices = select(scores, self.top_k, self.selection_bias)
        out = self.combine(x, indices, combine_weights(scores, indices, self.normalize).to(x.dtype))
        if "shared_expert" in self.shared_names:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out.reshape(batch, seq, dim), router_logits

    def combine(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Σ_e W[:, e] · expert_e(x) with W [tokens, E] scattered from the chosen (indices, weights)."""
        dense = torch.zeros(x.shape[0], len(self.experts), dtype=weights.dtype, device=x.device)
        dense = dense.scatter(1, indices, weights)
        out = torch.zeros(x.shape, dtype=weights.dtype, device=x.device)
        for e, expert in enumerate(self.experts):
            out = out + dense[:, e:e + 1] * expert(x)
        return out

    def extra_repr(self) -> str:
        return f"top_k={self.top_k}, experts={len(self.experts)}, dense routing"


def export_friendly(model: nn.Module | LoadedModel) -> nn.Module:
    """Swap every sparse block of `model` (in place) for a DenseRoutedMoe computing the same outputs."""
    module = as_module(model)
    moe_family(module)
    for layer in moe_layers(module):
        block = module.get_submodule(layer.path)
        if isinstance(block, DenseRoutedMoe):
            continue
        parent, _, child = layer.path.rpartition(".")
        setattr(module.get_submodule(parent), child, family_subclass(DenseRoutedMoe, type(block))(block, layer))
    return module
