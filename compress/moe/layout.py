"""Where a mixture-of-experts model keeps its routers, experts and shared experts, per family.

Families (transformers 4.57): mixtral (`block_sparse_moe`, softmax top-k, renormalised), qwen2_moe / qwen3_moe /
olmoe (`mlp`, softmax top-k, renormalised when `norm_topk_prob`), deepseek_v3 (`mlp`, sigmoid scores with a native
selection-only `e_score_correction_bias`). Dense layers inside an MoE stack (qwen2_moe `mlp_only_layers`,
deepseek_v3 `first_k_dense_replace`) are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from compress.errors import UserError


@dataclass(frozen=True)
class MoeFamily:
    """How one family lays out and routes its sparse MoE block."""

    moe_child: str  # child of the decoder layer holding the sparse block
    router: str  # child of the sparse block computing router scores
    experts: str  # child ModuleList of the sparse block
    expert_linears: tuple[str, str, str]  # (gate, up, down) names inside one expert
    scoring: str  # "softmax" or "sigmoid"
    shared: tuple[str, ...] = ()  # children that are always-on shared experts (and their gates)
    native_bias: str | None = None  # router buffer holding a selection-only bias, when the family has one


MOE_FAMILIES: dict[str, MoeFamily] = {
    "mixtral": MoeFamily("block_sparse_moe", "gate", "experts", ("w1", "w3", "w2"), "softmax"),
    "qwen2_moe": MoeFamily("mlp", "gate", "experts", ("gate_proj", "up_proj", "down_proj"), "softmax",
                           shared=("shared_expert", "shared_expert_gate")),
    "qwen3_moe": MoeFamily("mlp", "gate", "experts", ("gate_proj", "up_proj", "down_proj"), "softmax"),
    "olmoe": MoeFamily("mlp", "gate", "experts", ("gate_proj", "up_proj", "down_proj"), "softmax"),
    "deepseek_v3": MoeFamily("mlp", "gate", "experts", ("gate_proj", "up_proj", "down_proj"), "sigmoid",
                             shared=("shared_experts",), native_bias="e_score_correction_bias"),
}


@dataclass
class MoeLayer:
    """One sparse MoE block: paths (relative to the model root) and routing facts."""

    index: int  # decoder layer index
    path: str  # the sparse block, e.g. "model.layers.3.block_sparse_moe"
    router: str  # e.g. "model.layers.3.block_sparse_moe.gate"
    experts: list[str]  # one path per expert, e.g. "model.layers.3.block_sparse_moe.experts.0"
    shared: list[str] = field(default_factory=list)
    top_k: int = 2
    scoring: str = "softmax"
    normalize: bool = True  # renormalise the top-k weights to sum 1
    native_bias: str | None = None  # path of the selection-only bias buffer (deepseek_v3)

    @property
    def num_experts(self) -> int:
        """Routed experts of this layer (shared experts not counted)."""
        return len(self.experts)


def moe_family(model: nn.Module) -> tuple[str, MoeFamily]:
    """The model's family name and MoE layout, or UserError when it has no experts."""
    family = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
    if family not in MOE_FAMILIES:
        raise UserError(f"{family}: this model has no experts (not a mixture-of-experts family: "
                        f"{', '.join(MOE_FAMILIES)}); use the dense verbs (prune, quantize) instead")
    return family, MOE_FAMILIES[family]


def moe_layers(model: nn.Module) -> list[MoeLayer]:
    """Every sparse MoE block of `model`, in layer order; UserError when the model has none."""
    from compress.models.stack import find_block_stack

    family, fam = moe_family(model)
    config = model.config
    blocks_path, blocks = find_block_stack(model)
    top_k = int(getattr(config, "num_experts_per_tok", 2))
    normalize = True if family == "mixtral" else bool(getattr(config, "norm_topk_prob", False))
    out = []
    for i, blk in enumerate(blocks):
        sparse = getattr(blk, fam.moe_child, None)
        experts = getattr(sparse, fam.experts, None) if sparse is not None else None
        if not isinstance(experts, nn.ModuleList):
            continue  # a dense layer inside the MoE stack
        path = f"{blocks_path}.{i}.{fam.moe_child}"
        out.append(MoeLayer(
            index=i, path=path, router=f"{path}.{fam.router}",
            experts=[f"{path}.{fam.experts}.{e}" for e in range(len(experts))],
            shared=[f"{path}.{s}" for s in fam.shared if getattr(sparse, s, None) is not None],
            top_k=top_k, scoring=fam.scoring, normalize=normalize,
            native_bias=f"{path}.{fam.router}.{fam.native_bias}" if fam.native_bias else None,
        ))
    if not out:
        raise UserError(f"{family}: no sparse MoE block found in {blocks_path} (every layer is dense)")
    return out
