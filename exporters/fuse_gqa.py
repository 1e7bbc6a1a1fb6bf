"""Fuse each Llama-style attention of an optimum decoder graph into ONNX Runtime's GroupQueryAttention op.

optimum's export spells attention out as ~200 nodes per layer (rotary slicing, KV repeat, mask arithmetic, most of
them dynamic-shape bookkeeping). At batch 1 those nodes, not the weight reads, set the decode time on CPU.
GroupQueryAttention (com.microsoft, ONNX Runtime CPU) does rotary, KV concatenation, GQA and causal softmax in one
kernel. The graph keeps optimum's inputs and outputs (past_key_values.N.*, present.N.*), so ORTModelForCausalLM
runs it unchanged. Positions come from the attention mask (right padding or none, as at batch 1); left-padded
batches need the unfused graph.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from compress.errors import UserError
from exporters.graph import drop_dead_nodes, drop_unused_initializers

MS_DOMAIN = "com.microsoft"


@dataclass
class FuseRecord:
    """What the fusion did: layers fused, node counts before and after."""

    layers: int = 0
    nodes_before: int = 0
    nodes_after: int = 0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready."""
        return {"layers": self.layers, "nodes_before": self.nodes_before, "nodes_after": self.nodes_after,
                "notes": self.notes}


def rotary_caches(config, max_positions: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin tables (positions × head_dim/2) exactly as the model's own rotary embedding computes them."""
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope_type = (getattr(config, "rope_scaling", None) or {}).get("rope_type", "default")
    if rope_type not in ("default", "linear", "llama3"):
        raise UserError(f"attention fusion: rope type '{rope_type}' is not supported; export without "
                        "--fuse-attention")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    n = max_positions or config.max_position_embeddings
    freqs = torch.outer(torch.arange(n, dtype=torch.float32), inv_freq.float())
    return (freqs.cos() * scaling).numpy(), (freqs.sin() * scaling).numpy()


def _proj_output(graph: onnx.GraphProto, layer: int, proj: str) -> str:
    """Output tensor of layer `layer`'s q/k/v projection MatMul (float or MatMulNBits)."""
    pat = re.compile(rf"(^|[/.])layers[./]{layer}[/.]self_attn[/.]{proj}[/.]")
    hits = [n for n in graph.node if pat.search(n.name) and n.op_type in ("MatMul", "MatMulNBits", "Gemm")]
    if len(hits) != 1:
        raise UserError(f"attention fusion: layer {layer} {proj} not found as one MatMul in the graph; export "
                        "without --fuse-attention")
    node = hits[0]
    consumers = [n for n in graph.node if node.output[0] in n.input]
    if len(consumers) == 1 and consumers[0].op_type == "Add":  # a projection bias
        return consumers[0].output[0]
    return node.output[0]


def _o_proj(graph: onnx.GraphProto, layer: int) -> onnx.NodeProto:
    pat = re.compile(rf"(^|[/.])layers[./]{layer}[/.]self_attn[/.]o_proj[/.]")
    hits = [n for n in graph.node if pat.search(n.name) and n.op_type in ("MatMul", "MatMulNBits", "Gemm")]
    if len(hits) != 1:
        raise UserError(f"attention fusion: layer {layer} o_proj not found as one MatMul; export without "
                        "--fuse-attention")
    return hits[0]


def fuse_attention(model: onnx.ModelProto, config) -> FuseRecord:
    """Rewrite `model` in place: every layer's attention becomes one GroupQueryAttention node."""
    g = model.graph
    rec = FuseRecord(nodes_before=len(g.node))
    inputs = {i.name for i in g.input}
    if "attention_mask" not in inputs or "past_key_values.0.key" not in inputs:
        raise UserError("attention fusion needs a decoder exported with its KV cache (text-generation-with-past)")
    n_layers = config.num_hidden_layers
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if head_dim % 16:
        raise UserError(f"--fuse-attention: GroupQueryAttention needs a head size that is a multiple of 16 (this "
                        f"model's is {head_dim}); export without --fuse-attention")
    cos, sin = rotary_caches(config)
    past_type = next(i for i in g.input if i.name == "past_key_values.0.key").type.tensor_type.elem_type
    if past_type == TensorProto.FLOAT16:
        cos, sin = cos.astype(np.float16), sin.astype(np.float16)
    g.initializer.extend([numpy_helper.from_array(cos, "gqa.cos_cache"), numpy_helper.from_array(sin, "gqa.sin_cache")])
    shared = [
        helper.make_node("ReduceSum", ["attention_mask", "gqa.axes1"], ["gqa.mask_sum"], keepdims=0, name="gqa/sum"),
        helper.make_node("Sub", ["gqa.mask_sum", "gqa.one"], ["gqa.seqlens_i64"], name="gqa/sub"),
        helper.make_node("Cast", ["gqa.seqlens_i64"], ["gqa.seqlens_k"], to=TensorProto.INT32, name="gqa/cast"),
        helper.make_node("Shape", ["attention_mask"], ["gqa.mask_shape"], name="gqa/shape"),
        helper.make_node("Gather", ["gqa.mask_shape", "gqa.one"], ["gqa.total_i64"], axis=0, name="gqa/gather"),
        helper.make_node("Cast", ["gqa.total_i64"], ["gqa.total_len"], to=TensorProto.INT32, name="gqa/cast_total"),
    ]
    g.initializer.extend([numpy_helper.from_array(np.array([1], np.int64), "gqa.axes1"),
                          numpy_helper.from_array(np.array(1, np.int64), "gqa.one")])
    before_o: dict[str, onnx.NodeProto] = {}  # o_proj node name -> its GroupQueryAttention
    replaced_outputs: set[str] = set()
    for i in range(n_layers):
        q, k, v = (_proj_output(g, i, p) for p in ("q_proj", "k_proj", "v_proj"))
        o = _o_proj(g, i)
        out = f"gqa.layers.{i}.out"
        before_o[o.name] = (helper.make_node(
            "GroupQueryAttention",
            [q, k, v, f"past_key_values.{i}.key", f"past_key_values.{i}.value", "gqa.seqlens_k", "gqa.total_len",
             "gqa.cos_cache", "gqa.sin_cache"],
            [out, f"present.{i}.key", f"present.{i}.value"],
            domain=MS_DOMAIN, name=f"layers.{i}/GroupQueryAttention", num_heads=heads, kv_num_heads=kv_heads,
            do_rotary=1, rotary_interleaved=0, scale=1.0 / math.sqrt(head_dim)))
        o.input[0] = out
        replaced_outputs |= {f"present.{i}.key", f"present.{i}.value"}
        rec.layers += 1
    ordered = list(shared)
    for n in g.node:
        if replaced_outputs.intersection(n.output):
            continue
        if n.name in before_o:
            ordered.append(before_o[n.name])
        ordered.append(n)
    del g.node[:]
    g.node.extend(ordered)
    drop_dead_nodes(model)
    drop_unused_initializers(model)
    _toposort(g)
    if not any(op.domain == MS_DOMAIN for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    rec.nodes_after = len(g.node)
    rec.notes.append(f"{rec.layers} attentions fused into GroupQueryAttention: {rec.nodes_before:,} → "
                     f"{rec.nodes_after:,} nodes; positions from the attention mask (no left padding)")
    return rec


def _toposort(g: onnx.GraphProto) -> None:
    """Order nodes so every input is produced before it is read (the fused nodes were prepended)."""
    ready = {i.name for i in g.input} | {t.name for t in g.initializer} | {""}
    pending = list(g.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        rest = []
        for n in pending:
            if all(i in ready for i in n.input):
                ordered.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise UserError(f"attention fusion produced a cycle or a dangling input at {rest[0].name}")
        pending = rest
    del g.node[:]
    g.node.extend(ordered)
