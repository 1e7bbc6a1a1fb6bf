"""Apply a Plan to a model: swap Linear/Embedding modules for packed ones; tied embedding/head stay tied."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from compress.errors import UserError
from compress.models.layers import LayerMap
from compress.quantize.modules import PackedWeight, QuantEmbedding, QuantLinear, TiedQuantHead
from compress.quantize.rtn import quantize_rtn
from compress.quantize.spec import QuantSpec


class HalfLinear(nn.Module):
    """A Linear kept in fp16 storage (computed in the input's dtype)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().half(), requires_grad=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight.to(x.dtype), self.bias)


@dataclass
class Record:
    """What a pass did: per-module specs, notes (e.g. untied weights), seconds."""

    specs: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


def quantizable(model: nn.Module, lmap: LayerMap) -> list[str]:
    """Block Linear modules, then the input embedding and (if not tied to it) the LM head."""
    names = [p for b in lmap.blocks for p in b.linears]
    if lmap.embeddings:
        names.append(lmap.embeddings)
    if lmap.head and not is_tied(model, lmap):
        names.append(lmap.head)
    return names


def is_tied(model: nn.Module, lmap: LayerMap) -> bool:
    """True when the LM head shares the input embedding's weight tensor."""
    if not (lmap.head and lmap.embeddings):
        return False
    head = model.get_submodule(lmap.head)
    emb = model.get_submodule(lmap.embeddings)
    if isinstance(head, TiedQuantHead):
        return head._embedding[0] is emb
    if isinstance(emb, QuantEmbedding) or isinstance(head, QuantLinear):
        return False  # codes of their own (reading .weight would dequantize them)
    return getattr(head, "weight", None) is getattr(emb, "weight", None)


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The [out, in] weight of a Linear, GPT-2 Conv1D ([in, out] stored) or Embedding ([tokens, dim])."""
    w = module.weight
    return w.t() if type(module).__name__ == "Conv1D" else w


def apply_plan(model: nn.Module, lmap: LayerMap, specs: dict[str, QuantSpec],
               quantized: dict[str, object] | None = None, empty: bool = False) -> Record:
    """Replace every module in `specs` in place (RTN unless `quantized` holds precomputed QuantizedWeights).

    `empty` builds the packed modules without quantizing (zeros), to be filled by load_state_dict.
    """
    record = Record()
    tied = is_tied(model, lmap)
    quantized = quantized or {}
    for name, spec in specs.items():
        module = model.get_submodule(name)
        cols = weight_matrix(module).shape[1]
        spec.check_shape(name, cols)
        spec = spec.for_width(cols)  # a K-quant on a width of no whole super-blocks: its group fallback
        record.specs[name] = spec.label()
        if spec.bits == 32:
            continue
        if isinstance(module, nn.Embedding):
            new = _quant_embedding(module, spec, quantized.get(name), empty)
        elif spec.bits == 16:
            new = HalfLinear(module)
        else:
            out_f, in_f = weight_matrix(module).shape
            packed = None if empty else PackedWeight.from_quantized(quantized.get(name)
                                                                     or quantize_rtn(weight_matrix(module), spec))
            new = QuantLinear(in_f, out_f, spec, module.bias is not None, packed)
            if module.bias is not None:
                new.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
        _set(model, name, new)
    if tied and lmap.embeddings in specs:
        emb = model.get_submodule(lmap.embeddings)
        if isinstance(emb, QuantEmbedding):
            _set(model, lmap.head, TiedQuantHead(emb))
            record.notes.append(f"{lmap.head} stays tied to {lmap.embeddings}: quantized once ({emb.spec.label()})")
    return record


def _quant_embedding(module: nn.Embedding, spec: QuantSpec, q=None, empty: bool = False) -> nn.Module:
    if spec.bits == 16:
        raise UserError("fp16 embeddings are not supported: quantize the embedding (e.g. 8 bits) or keep it (32)")
    packed = None if empty else PackedWeight.from_quantized(q or quantize_rtn(module.weight, spec))
    return QuantEmbedding(module.num_embeddings, module.embedding_dim, spec, module.padding_idx, packed)


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
