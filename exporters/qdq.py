"""TensorRT-style explicit weight-only quantization of a float ONNX graph with the artifact's own codes:
int4/int8 weight initializer → DequantizeLinear (zero point 0) → MatMul, at opset 21.

Weights are stored in the MatMul's [K=in, N=out] layout so no Transpose is needed: symmetric ≤ 4-bit grouped codes
become int4 (code − 2^(b−1), in [−8, 7]) block-wise along K (axis 0, block_size = the group); per-channel codes of
any width become int8 per output channel (axis 1) when they lie in [−127, 127] (TensorRT's INT4 must be
block-wise). Scales are float32 (the fp16 scales, exactly) and strictly positive as TensorRT requires: a group with
a negative scale has its codes and scale negated (exact unless a 4-bit group holds −8), an all-zero group gets
scale 1. Everything else (asymmetric, grouped ≥ 5-bit, 8-bit codes at −128, 4-bit Q4_0-rule groups that cannot be
negated) is refused, or re-quantized symmetric with positive scales from the dequantized weight when `requantize`.
A quantized embedding is a DequantizeLinear of the same codes (in the [hidden, vocab] layout of the tied head's
MatMul, stored once) → Transpose → Gather.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from compress.errors import UserError
from compress.quantize.modules import PackedWeight
from exporters.graph import (
    RewriteRecord,
    WeightSite,
    all_names,
    drop_dead_nodes,
    drop_unused_initializers,
    replace_node,
    rewrite_file,
    unique_name,
    weight_bytes,
)
from exporters.ort_quant import codes_of, locate, quantized_targets

QDQ_OPSET = 21
BIG = 1 << 16  # initializers above this many bytes are set aside while the opset converter runs


def qdq_plan(name: str, p: PackedWeight) -> tuple[str, str | None]:
    """('int4' | 'int8', None) when `p`'s codes go exactly into a zero-point-0 DequantizeLinear, else (kind, why).

    Grouped ≤ 4-bit codes → int4 block-wise; per-channel codes of any width → int8 per output channel (TensorRT's
    INT4 must be block-wise); grouped 5–8-bit codes have no TensorRT form.
    """
    spec = p.spec
    if spec.kquant:
        return "int4", f"{name}: {spec.label()} is a K-quant (llama.cpp only: export it with --gguf)"
    per_channel = spec.group_for(p.cols) == p.cols
    kind = "int8" if per_channel or spec.bits > 4 else "int4"
    if not spec.symmetric:
        return kind, f"{name}: {spec.label()} is asymmetric (TensorRT needs zero point 0)"
    if kind == "int4":
        if spec.bits == 4 and _negative_at_min(p):
            return kind, (f"{name}: {spec.label()} has negative scales on groups with codes at −8 (TensorRT "
                          "needs scales > 0; quantize with positive scales: 4p, as --target trt does)")
        return kind, None
    if not per_channel:
        return kind, (f"{name}: {spec.label()} — TensorRT runs INT8 weights per output channel only "
                      "(quantize 8-bit layers as 8g0)")
    if spec.bits == 8 and int(codes_of(p).min()) == 0:
        return kind, f"{name}: {spec.label()} has codes at −128 (TensorRT INT8 needs [−127, 127])"
    return kind, None


def _negative_at_min(p: PackedWeight) -> bool:
    """True when a group with a negative scale holds the lowest code (its negation would not fit the width)."""
    g = p.spec.group_for(p.cols)
    low = (codes_of(p) == 0).reshape(p.rows, p.cols // g, g).any(-1)
    return bool((low & (p.scales.float().numpy() < 0)).any())


def _positive(q: np.ndarray, scales: np.ndarray, g: int) -> tuple[np.ndarray, np.ndarray]:
    """The same values with every scale > 0: negate codes and scale of negative groups; zero groups get scale 1."""
    rows, cols = q.shape
    sign = np.where(scales < 0, -1, 1).astype(np.int16)
    q = (q.reshape(rows, cols // g, g) * sign[..., None]).reshape(rows, cols)
    scales = np.abs(scales)
    zero = scales == 0
    if zero.any():
        q = np.where(np.repeat(zero, g, axis=1), 0, q)
        scales = np.where(zero, np.float32(1.0), scales)
    return q, scales


def to_qdq(model: onnx.ModelProto | str | Path, loaded, out_path: Path | str, requantize: bool = False,
           check_ids: np.ndarray | None = None) -> RewriteRecord:
    """qdq_ on a copy of `model` (a graph or its path), written atomically to `out_path`. `check_ids` fills
    `record.check` (see to_matmulnbits)."""
    return rewrite_file(model, out_path, lambda m: qdq_(m, loaded, requantize), check_ids)


def qdq_(m: onnx.ModelProto, loaded, requantize: bool = False) -> RewriteRecord:
    """Rewrite, in memory and in place, the float graph of `loaded`'s dequantized copy with int4/int8 weights →
    DequantizeLinear → MatMul (opset 21, zero points 0)."""
    linears, gathers0, tied0 = quantized_targets(loaded)
    plans = {n: qdq_plan(n, p) for n, p in linears.items()}
    plans.update({n: qdq_plan(n, p) for n, p in gathers0.items() if n not in tied0.values()})
    refused = [why for _, why in plans.values() if why]
    if refused and not requantize:
        raise UserError(f"{len(refused)} layer(s) cannot be written as TensorRT Q/DQ exactly: {refused[0]}"
                        f"{f' (and {len(refused) - 1} more)' if len(refused) > 1 else ''}; re-quantize with "
                        "`compress quantize --target trt`, or export with requantization")
    record = RewriteRecord(kind="qdq", weight_bytes_before=weight_bytes(m))
    record.opset = _bump_opset(m, QDQ_OPSET)
    sites, linears, gathers, tied = locate(m, loaded)
    mm_sites = [s for s in sites if s.node.op_type != "Gather"]
    names = all_names(m)
    done: dict[str, list[str]] = {}
    for site in mm_sites:
        name = site.module
        packed = linears[name]
        kind, why = plans[name]
        if name not in done:
            if why:
                q, scales, axis, block = _requantized(packed, kind)
                err = float(np.abs(_deq(q, scales, axis, block) - packed.dequantize().numpy().T).max())
                record.requantized.append(f"{name}: {packed.spec.label()} → {kind} symmetric "
                                          f"({'per channel' if block is None else f'block {block}'}), "
                                          f"max |Δw| {err:.3g}")
                label = f"{packed.spec.bits}→{kind} (requantized)"
            else:
                q, scales, axis, block = _exact(packed, kind)
                label = f"{packed.spec.bits}→{kind}"
            done[name] = _add_dq(m, names, name, q, scales, axis, block, kind)
            record.layers[name] = (f"DequantizeLinear {kind} {'per channel' if block is None else f'block {block}'}"
                                   f" ({packed.spec.label()}{', requantized' if why else ''})")
            record.count_bits(label)
        _rewire(m, names, site, done[name])
    head_of = {emb: head for head, emb in tied.items()}
    for site in [s for s in sites if s.node.op_type == "Gather"]:
        emb = site.module
        source = head_of.get(emb, emb)
        if source not in done:
            kind, why = plans[emb]
            q, scales, axis, block = (_requantized if why else _exact)(gathers[emb], kind)
            done[emb] = _add_dq(m, names, emb, q, scales, axis, block, kind)
            record.count_bits(f"{gathers[emb].spec.bits}→{kind}" + (" (requantized)" if why else ""))
        _gather_from(m, names, site, done[source][0])
        record.layers[emb] = f"DequantizeLinear → Transpose → Gather ({gathers[emb].spec.label()})"
        if emb in head_of:
            record.shared.append(f"{emb} reads the codes of its tied head {head_of[emb]} (stored once)")
    drop_dead_nodes(m)
    drop_unused_initializers(m)
    record.weight_bytes_after = weight_bytes(m)
    return record


def _exact(p: PackedWeight, kind: str) -> tuple[np.ndarray, np.ndarray, int, int | None]:
    """Signed codes [K, N], float32 scales, DQ axis and block size (None = per channel) of the artifact's codes."""
    spec = p.spec
    q = codes_of(p).astype(np.int16) - 2 ** (spec.bits - 1)  # [N, K], zero point 0
    q, scales = _positive(q, p.scales.float().numpy(), spec.group_for(p.cols))  # [N, K], [N, n_blocks]
    lo, hi = (-8, 7) if kind == "int4" else (-127, 127)
    if q.min() < lo or q.max() > hi:
        raise RuntimeError(f"{kind} codes out of range after making scales positive: {q.min()}..{q.max()}")
    if spec.group_for(p.cols) == p.cols:
        return q.T.astype(np.int8), scales[:, 0].copy(), 1, None
    return q.T.astype(np.int8), np.ascontiguousarray(scales.T), 0, spec.group_for(p.cols)


def _requantized(p: PackedWeight, kind: str) -> tuple[np.ndarray, np.ndarray, int, int | None]:
    """Symmetric codes re-derived from the dequantized weight: int4 block-wise (the artifact's group, or per
    channel) or int8 per output channel in [−127, 127]."""
    w = p.dequantize().double()  # [N, K]
    g = p.spec.group_for(p.cols)
    if kind == "int4":  # TensorRT's positive-scale rule: positives reach 7, negatives −8
        blocks = w.reshape(p.rows, p.cols // g, g)
        pos, neg = blocks.amax(-1, keepdim=True).clamp_min(0), (-blocks).amax(-1, keepdim=True).clamp_min(0)
        scale = torch.maximum(pos / 7, neg / 8).float()
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.clamp(torch.round(blocks / scale.double()), -8, 7).reshape(p.rows, p.cols)
        scale = scale.squeeze(-1)
        if g == p.cols:
            return q.numpy().T.astype(np.int8), scale[:, 0].numpy().copy(), 1, None
        return q.numpy().T.astype(np.int8), np.ascontiguousarray(scale.numpy().T), 0, g
    scale = (w.abs().amax(-1) / 127).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(w / scale.double()[:, None]), -127, 127)
    return q.numpy().T.astype(np.int8), scale.numpy(), 1, None


def _deq(q: np.ndarray, scales: np.ndarray, axis: int, block: int | None) -> np.ndarray:
    """DequantizeLinear of [K, N] codes, as ONNX defines it."""
    if block is None:
        return q.astype(np.float32) * scales[None, :]
    return q.astype(np.float32) * np.repeat(scales, block, axis=0)


def _int4_tensor(name: str, q: np.ndarray) -> TensorProto:
    flat = (q.reshape(-1).astype(np.int16) & 0xF).astype(np.uint8)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    packed = flat[0::2] | (flat[1::2] << 4)
    return helper.make_tensor(name, TensorProto.INT4, list(q.shape), packed.tobytes(), raw=True)


def _add_dq(m, names, module: str, q, scales, axis, block, kind) -> list[str]:
    """Add the codes, scales, zero points and the DequantizeLinear node; returns [its output]."""
    wq = unique_name(names, f"{module}.weight_q")
    sc = unique_name(names, f"{module}.weight_scale")
    zp = unique_name(names, f"{module}.weight_zero_point")
    out = unique_name(names, f"{module}.weight_dq")
    zeros = np.zeros(scales.shape, np.int8)
    if kind == "int4":
        m.graph.initializer.extend([_int4_tensor(wq, q), _int4_tensor(zp, zeros)])
    else:
        m.graph.initializer.extend([numpy_helper.from_array(q.astype(np.int8), wq),
                                    numpy_helper.from_array(zeros, zp)])
    m.graph.initializer.append(numpy_helper.from_array(scales.astype(np.float32), sc))
    attrs = {"axis": axis} if block is None else {"axis": axis, "block_size": block}
    node = helper.make_node("DequantizeLinear", [wq, sc, zp], [out], name=unique_name(names, f"{module}/DQ"), **attrs)
    m.graph.node.insert(0, node)
    return [out]


def _rewire(m, names, site: WeightSite, dq_out: list[str]) -> None:
    """MatMul(x, DQ(w)); a Gemm keeps its C input (transB 0: the DQ output already is [K, N])."""
    name = site.node.name or unique_name(names, f"{site.module}/{site.node.op_type}")
    if site.node.op_type == "Gemm":
        node = helper.make_node("Gemm", [site.node.input[0], dq_out[0], *site.node.input[2:]],
                                list(site.node.output), name=name)
    else:
        node = helper.make_node("MatMul", [site.node.input[0], dq_out[0]], list(site.node.output), name=name)
    replace_node(m, site.node, [node])


def _gather_from(m, names, site: WeightSite, dq_out: str) -> None:
    """Gather(Transpose(DQ(w))): the dequantized [hidden, vocab] weight read as a [vocab, hidden] table."""
    t_out = unique_name(names, f"{site.module}.table")
    transpose = helper.make_node("Transpose", [dq_out], [t_out], perm=[1, 0],
                                 name=unique_name(names, f"{site.module}/Transpose"))
    attrs = {a.name: helper.get_attribute_value(a) for a in site.node.attribute}
    gather = helper.make_node("Gather", [t_out, site.node.input[1]], list(site.node.output),
                              name=site.node.name or unique_name(names, f"{site.module}/Gather"), **attrs)
    replace_node(m, site.node, [transpose, gather])


def _bump_opset(m: onnx.ModelProto, version: int) -> int:
    """Convert the default domain to `version` if lower (large initializers set aside meanwhile); the version."""
    current = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 0)
    if current >= version:
        return current
    from onnx import version_converter

    aside = {}
    for t in m.graph.initializer:
        if t.raw_data and len(t.raw_data) > BIG:
            aside[t.name] = t.raw_data
            t.raw_data = b""
    try:
        converted = version_converter.convert_version(m, version)
    except Exception as exc:  # the converter raises bare RuntimeErrors/ValueErrors naming the op
        raise UserError(f"cannot convert the graph from opset {current} to {version} ({exc}); export the float "
                        f"graph at opset {version}") from exc
    for t in converted.graph.initializer:
        if t.name in aside:
            t.raw_data = aside.pop(t.name)
    if aside:
        raise RuntimeError(f"opset conversion lost initializers: {', '.join(list(aside)[:4])}")
    m.CopyFrom(converted)
    return version
