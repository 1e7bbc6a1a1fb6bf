"""LayerMap: the repeated block stack of a model, each block's sublayers, Linear modules, norms and sizes.

Per-family adapters are small dicts of child names; everything else (finding the block stack, the final norm,
the head) is found structurally, so wrapped models (e.g. `model.language_model.layers`) work too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

from compress.models.stack import count_params as _count
from compress.models.stack import find_block_stack

if TYPE_CHECKING:
    from compress.moe.layout import MoeLayer

# How skipping a sublayer is done, per residual style:
#  zero      pre-norm residual (x + f(norm(x))): the sublayer's output is replaced by zeros.
#  input     post-norm block part that returns norm(x + f(x)) (BERT attention): output replaced by its input x.
#  residual  post-norm part called as g(h, x) -> norm(dense(h) + x) (BERT FFN output): replaced by x.
SKIP_RULES = ("zero", "input", "residual")


@dataclass(frozen=True)
class SublayerSpec:
    """Where a sublayer sits inside a block and how to skip it."""

    children: tuple[str, ...]  # child module names that make up the sublayer
    hook: str  # the child whose output is replaced when the sublayer is skipped
    skip: str  # one of SKIP_RULES


@dataclass(frozen=True)
class Adapter:
    """A model family's block layout."""

    name: str
    sublayers: dict[str, SublayerSpec]


LLAMA_STYLE = Adapter("llama-style", {
    "attn": SublayerSpec(("self_attn",), "self_attn", "zero"),
    "mlp": SublayerSpec(("mlp",), "mlp", "zero"),
})
BERT_STYLE = Adapter("bert", {
    "attn": SublayerSpec(("attention",), "attention", "input"),
    "mlp": SublayerSpec(("intermediate", "output"), "output", "residual"),
})
GPT2_STYLE = Adapter("gpt2", {
    "attn": SublayerSpec(("attn",), "attn", "zero"),
    "mlp": SublayerSpec(("mlp",), "mlp", "zero"),
})
MIXTRAL_STYLE = Adapter("mixtral", {
    "attn": SublayerSpec(("self_attn",), "self_attn", "zero"),
    "mlp": SublayerSpec(("block_sparse_moe",), "block_sparse_moe", "zero"),
})
FAMILIES: dict[str, Adapter] = {
    **{f: LLAMA_STYLE for f in ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3", "gemma3_text",
                                "olmo", "olmo2", "phi3", "granite", "smollm3")},
    **{f: BERT_STYLE for f in ("bert", "roberta", "xlm-roberta", "camembert", "electra")},
    "gpt2": GPT2_STYLE,
    # mixture-of-experts families: the "mlp" sublayer is the sparse block (router + experts + shared experts)
    "mixtral": MIXTRAL_STYLE,
    **{f: LLAMA_STYLE for f in ("qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3")},
}
FINAL_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_layer_norm", "final_norm")
ATTN_WORDS = ("attn", "attention")
MLP_WORDS = ("mlp", "ffn", "feed_forward", "feedforward")


@dataclass
class Sublayer:
    """One sublayer of a block (attention, FFN/MLP, ...)."""

    name: str
    paths: list[str]
    hook_path: str
    skip: str
    params: int


@dataclass
class Block:
    """One repeated block of the stack."""

    index: int
    path: str
    sublayers: dict[str, Sublayer]
    linears: list[str]
    norms: list[str]
    params: int
    moe: MoeLayer | None = None  # router / expert / shared-expert paths and top_k of a sparse MoE block

    def linears_of(self, sublayer: str) -> list[str]:
        """The block's Linear modules that belong to one sublayer (e.g. q/k/v/o for "attn")."""
        paths = self.sublayers[sublayer].paths
        return [p for p in self.linears if any(p == s or p.startswith(s + ".") for s in paths)]


@dataclass
class LayerMap:
    """The structure every scorer, allocator and transform works on."""

    family: str
    adapter: str
    blocks_path: str
    blocks: list[Block]
    final_norm: str | None
    head: str | None
    embeddings: str | None
    total_params: int
    logit_softcap: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def num_blocks(self) -> int:
        """How many repeated blocks the stack has."""
        return len(self.blocks)

    @property
    def num_sublayers(self) -> int:
        """How many sublayers all blocks have together."""
        return sum(len(b.sublayers) for b in self.blocks)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with `num_blocks` and `blocks`."""
        d = asdict(self)
        for b in d["blocks"]:
            if b["moe"] is None:  # dense blocks keep their dict shape
                del b["moe"]
        d["num_blocks"] = self.num_blocks
        d["num_sublayers"] = self.num_sublayers
        return d


def layer_map(model: nn.Module) -> LayerMap:
    """Build the LayerMap of `model`: per-family adapter where known, structural fallback otherwise."""
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", None) or type(model).__name__
    blocks_path, blocks_list = find_block_stack(model)
    adapter = FAMILIES.get(family) or _generic_adapter(blocks_list[0])
    notes = [] if family in FAMILIES else [f"no adapter for '{family}': block stack and sublayers found structurally"]
    blocks = []
    for i, blk in enumerate(blocks_list):
        path = f"{blocks_path}.{i}"
        sublayers = {}
        for name, spec in adapter.sublayers.items():
            present = [c for c in spec.children if _has_child(blk, c)]
            if not present:
                continue
            sublayers[name] = Sublayer(
                name, [f"{path}.{c}" for c in present], f"{path}.{spec.hook}", spec.skip,
                sum(_count(blk.get_submodule(c)) for c in present),
            )
        linears = [f"{path}.{n}" for n, m in blk.named_modules() if _is_linear(m)]
        norms = [f"{path}.{n}" for n, m in blk.named_modules() if n and "norm" in type(m).__name__.lower()]
        blocks.append(Block(i, path, sublayers, linears, norms, _count(blk)))
    for moe in _moe_layers(model, family):
        blocks[moe.index].moe = moe
    return LayerMap(
        family=family,
        adapter=adapter.name,
        blocks_path=blocks_path,
        blocks=blocks,
        final_norm=_final_norm(model, blocks_path),
        head=_module_path(model, _call(model, "get_output_embeddings")),
        embeddings=_module_path(model, _call(model, "get_input_embeddings")),
        total_params=_count(model),
        logit_softcap=getattr(config, "final_logit_softcapping", None),
        notes=notes,
    )


def _moe_layers(model: nn.Module, family: str) -> list[MoeLayer]:
    """The sparse MoE blocks of a mixture-of-experts family (none for dense models or an all-dense stack)."""
    from compress.errors import UserError
    from compress.moe.layout import MOE_FAMILIES, moe_layers

    if family not in MOE_FAMILIES:
        return []
    try:
        return moe_layers(model)
    except UserError:
        return []


def _generic_adapter(block: nn.Module) -> Adapter:
    subs: dict[str, SublayerSpec] = {}
    for child, _ in block.named_children():
        low = child.lower()
        if "attn" not in subs and any(w in low for w in ATTN_WORDS):
            subs["attn"] = SublayerSpec((child,), child, "zero")
        elif "mlp" not in subs and any(w in low for w in MLP_WORDS):
            subs["mlp"] = SublayerSpec((child,), child, "zero")
    return Adapter("generic", subs)


def _final_norm(model: nn.Module, blocks_path: str) -> str | None:
    parent = blocks_path.rsplit(".", 1)[0] if "." in blocks_path else ""
    owner = model.get_submodule(parent) if parent else model
    for n in FINAL_NORM_NAMES:
        if _has_child(owner, n):
            return f"{parent}.{n}" if parent else n
    return None


def _module_path(model: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    for n, m in model.named_modules():
        if m is target:
            return n
    return None


def _call(model: nn.Module, method: str) -> nn.Module | None:
    fn = getattr(model, method, None)
    try:
        return fn() if fn else None
    except (NotImplementedError, AttributeError):
        return None


def _has_child(module: nn.Module, name: str) -> bool:
    return name in dict(module.named_children())


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"
