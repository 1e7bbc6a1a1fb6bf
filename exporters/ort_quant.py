"""Rewrite a float ONNX graph of a dequantized artifact so its quantized layers carry the artifact's own codes, as
ONNX Runtime contrib ops: MatMulNBits for Linear layers (and the LM head), GatherBlockQuantized for the embedding.

Layout (onnxruntime 1.32 CPU): MatMulNBits B is uint8 [N=out, n_blocks, block_size·bits/8], codes packed low bits
first along K=in (the artifact's own byte stream for 2/4/8 bits); scales [N, n_blocks] in the activation dtype;
zero points uint8 [N, ceil(n_blocks·bits/8)] packed per row like B (default 2^(bits−1) = our symmetric offset), or
float [N, n_blocks] for hqq. 3-bit codes go unchanged into 4-bit containers and 5/6-bit into 8-bit ones, with
explicit zero points. GatherBlockQuantized reads uint8 [vocab, hidden·bits/8] with the same scales/zero points.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from compress.errors import UserError
from compress.quantize.modules import PackedWeight, QuantEmbedding, QuantLinear, TiedQuantHead
from compress.quantize.packing import unpack
from exporters.graph import (
    MS_DOMAIN,
    RewriteRecord,
    WeightSite,
    all_names,
    drop_dead_nodes,
    drop_unused_initializers,
    ensure_opset,
    match_weights,
    replace_node,
    rewrite_file,
    unique_name,
    weight_bytes,
)

CONTAINER = {2: 2, 3: 4, 4: 4, 5: 8, 6: 8, 8: 8}


# ------------------------------------------------------------------------------------------ dequantized float copy
def dequantized_copy(loaded):
    """A LoadedModel whose QuantLinear/QuantEmbedding/TiedQuantHead are float nn.Linear/nn.Embedding holding the
    exact dequantized weights (a tied head stays tied to the embedding); the original is left untouched."""
    from compress.models.hf import LoadedModel
    from compress.quantize.apply import HalfLinear

    model = copy.deepcopy(loaded.module)
    conv1d = _conv1d_names(model)
    embeddings: dict[int, nn.Embedding] = {}
    swaps: list[tuple[str, nn.Module]] = []
    for name, mod in model.named_modules():
        if isinstance(mod, QuantEmbedding):
            new = nn.Embedding(mod.num_embeddings, mod.embedding_dim, mod.padding_idx)
            new.weight = nn.Parameter(mod.packed.dequantize(), requires_grad=False)
            embeddings[id(mod)] = new
            swaps.append((name, new))
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            swaps.append((name, _float_linear(mod.packed.dequantize(), mod.bias, name in conv1d)))
        elif isinstance(mod, HalfLinear):
            swaps.append((name, _float_linear(mod.weight.detach().float(), mod.bias, name in conv1d,
                                              transposed=name in conv1d)))
        elif isinstance(mod, TiedQuantHead):
            emb = embeddings[id(mod._embedding[0])]
            head = nn.Linear(emb.embedding_dim, emb.num_embeddings, bias=mod.bias is not None)
            head.weight = emb.weight  # tied: the same Parameter
            if mod.bias is not None:
                head.bias = nn.Parameter(torch.as_tensor(mod.bias).detach().clone(), requires_grad=False)
            swaps.append((name, head))
    for name, new in swaps:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    model.eval()
    return LoadedModel(model, loaded.tokenizer, loaded.kind, loaded.family, f"{loaded.spec} (dequantized)",
                       loaded.path, loaded.pooling, dict(loaded.extra))


def _float_linear(w: torch.Tensor, bias, conv1d: bool, transposed: bool = False) -> nn.Module:
    """nn.Linear with weight `w` [out, in] (GPT-2 Conv1D, stored [in, out], when the architecture expects one)."""
    if conv1d:
        from transformers.pytorch_utils import Conv1D

        w_in_out = w if transposed else w.t()
        new = Conv1D(w_in_out.shape[1], w_in_out.shape[0])
        new.weight = nn.Parameter(w_in_out.contiguous(), requires_grad=False)
        new.bias = nn.Parameter(bias.detach().clone() if bias is not None else torch.zeros(w_in_out.shape[1]),
                                requires_grad=False)
        return new
    new = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
    new.weight = nn.Parameter(w.contiguous(), requires_grad=False)
    if bias is not None:
        new.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return new


def _conv1d_names(model: nn.Module) -> set[str]:
    """Names where the architecture (rebuilt from its config on the meta device) has a GPT-2 Conv1D."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", "") not in ("gpt2", "gpt_bigcode", "openai-gpt"):
        return set()
    from transformers.pytorch_utils import Conv1D

    with torch.device("meta"):
        skeleton = type(model)(config)
    return {n for n, m in skeleton.named_modules() if isinstance(m, Conv1D)}


# -------------------------------------------------------------------------------------------------- the rewrite
def quantized_targets(loaded) -> tuple[dict[str, PackedWeight], dict[str, PackedWeight], dict[str, str]]:
    """(Linear-like modules → PackedWeight, embeddings → PackedWeight, tied head → its embedding's name)."""
    linears: dict[str, PackedWeight] = {}
    gathers: dict[str, PackedWeight] = {}
    tied: dict[str, str] = {}
    emb_names = {id(m): n for n, m in loaded.module.named_modules() if isinstance(m, QuantEmbedding)}
    for name, mod in loaded.module.named_modules():
        if isinstance(mod, QuantLinear):
            linears[name] = mod.packed
        elif isinstance(mod, QuantEmbedding):
            gathers[name] = mod.packed
        elif isinstance(mod, TiedQuantHead):
            linears[name] = mod._embedding[0].packed
            tied[name] = emb_names[id(mod._embedding[0])]
    return linears, gathers, tied


def locate(model: onnx.ModelProto, loaded) -> tuple[list[WeightSite], dict, dict, dict]:
    """Match every quantized module of `loaded` to the MatMul/Gather reading its weight in `model` (by value)."""
    linears, gathers, tied = quantized_targets(loaded)
    lin_w = {n: p.dequantize().numpy() for n, p in linears.items()}
    gat_w = {n: p.dequantize().numpy() for n, p in gathers.items()}
    return match_weights(model, lin_w, gat_w), linears, gathers, tied


def _is_pow2_block(g: int) -> bool:
    return g >= 16 and not g & (g - 1)


def _ort_problem(name: str, p: PackedWeight, gather: bool) -> str | None:
    spec = p.spec
    if spec.kquant:
        return f"{name}: {spec.label()} — a K-quant runs in llama.cpp only (export it with --gguf)"
    g = spec.group_for(p.cols)
    if spec.group_size == 0 or not _is_pow2_block(g):
        return (f"{name}: {spec.label()} — ONNX Runtime needs a power-of-two block ≥ 16 along the input axis "
                f"({'per channel' if spec.group_size == 0 else f'group {g}'} is not one)")
    if not spec.symmetric and spec.method == "hqq" and (gather or CONTAINER[spec.bits] == 8):
        what = "GatherBlockQuantized (integer zero points only)" if gather else "8-bit MatMulNBits"
        return f"{name}: {spec.label()} — fp16 zero points cannot be expressed in {what}"
    return None


def codes_of(p: PackedWeight) -> np.ndarray:
    """Unsigned codes [rows, cols] (uint8)."""
    return unpack(p.qweight, p.spec.bits, p.rows * p.cols).reshape(p.rows, p.cols).numpy()


def pack_rows(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack uint8 codes [rows, n] along each row, low bits first, padding each row to whole bytes (bits 2/4/8)."""
    if bits == 8:
        return codes.astype(np.uint8)
    per = 8 // bits
    pad = (-codes.shape[1]) % per
    if pad:
        codes = np.concatenate([codes, np.zeros((codes.shape[0], pad), np.uint8)], axis=1)
    c = codes.reshape(codes.shape[0], -1, per).astype(np.uint16)
    return (c << (np.arange(per, dtype=np.uint16) * bits)).sum(-1).astype(np.uint8)


def ort_blocks(p: PackedWeight) -> dict[str, np.ndarray | int | None]:
    """The artifact's codes in ORT's block layout: data [rows, n_blocks, blob], scales, zero points, bits."""
    spec = p.spec
    bits = CONTAINER[spec.bits]
    g = spec.group_for(p.cols)
    nb = p.cols // g
    if bits == spec.bits:  # the packed stream already is ORT's layout: whole codes per byte, low bits first
        data = p.qweight.numpy().reshape(p.rows, nb, g * bits // 8)
    else:
        data = pack_rows(codes_of(p), bits).reshape(p.rows, nb, g * bits // 8)
    scales = p.scales.float().numpy().reshape(p.rows, nb)
    zeros = None
    if spec.symmetric:
        if bits != spec.bits:
            zeros = pack_rows(np.full((p.rows, nb), 2 ** (spec.bits - 1), np.uint8), bits)
    elif p.zeros.dtype == torch.float16:
        zeros = p.zeros.float().numpy().reshape(p.rows, nb)
    else:
        z = unpack(p.zeros, spec.bits, p.rows * nb).reshape(p.rows, nb).numpy()
        zeros = pack_rows(z, bits)
    return {"data": np.ascontiguousarray(data), "scales": np.ascontiguousarray(scales), "zeros": zeros, "bits": bits,
            "block_size": g, "K": p.cols, "N": p.rows}


def to_matmulnbits(model: onnx.ModelProto | str | Path, loaded, out_path: Path | str, accuracy_level: int = 0,
                   check_ids: np.ndarray | None = None) -> RewriteRecord:
    """matmulnbits_ on a copy of `model` (a graph or its path), written atomically to `out_path`.

    `check_ids` ([batch, seq] token ids) also runs both graphs (prefill + one KV-cache decode step) into `record.check`.
    """
    return rewrite_file(model, out_path, lambda m: matmulnbits_(m, loaded, accuracy_level), check_ids)


def matmulnbits_(m: onnx.ModelProto, loaded, accuracy_level: int = 0) -> RewriteRecord:
    """Rewrite, in memory and in place, the float graph of `loaded`'s dequantized copy: quantized Linears →
    MatMulNBits, the embedding → GatherBlockQuantized, with the artifact's codes."""
    linears, gathers, _ = quantized_targets(loaded)
    problems = [why for why in (_ort_problem(n, p, False) for n, p in linears.items()) if why]
    problems += [why for why in (_ort_problem(n, p, True) for n, p in gathers.items()) if why]
    if problems:
        raise UserError(f"{len(problems)} layer(s) cannot run exactly in ONNX Runtime: {problems[0]}"
                        f"{f' (and {len(problems) - 1} more)' if len(problems) > 1 else ''}; re-quantize with "
                        "`compress quantize --target ort`")
    sites, linears, gathers, tied = locate(m, loaded)
    record = RewriteRecord(kind="ort-matmulnbits", weight_bytes_before=weight_bytes(m))
    names = all_names(m)
    made: dict[str, dict[str, str]] = {}  # module → initializer names of its data/scales/zeros
    ensure_opset(m, MS_DOMAIN, 1)
    # MatMuls first so a tied head's MatMulNBits owns the [N, blocks, blob] initializer the Gather reshapes
    for site in sorted(sites, key=lambda s: s.node.op_type == "Gather"):
        name = site.module
        packed = gathers[name] if site.node.op_type == "Gather" else linears[name]
        blocks = ort_blocks(packed)
        key = tied.get(name, name)
        spec = packed.spec
        label = str(spec.bits) if blocks["bits"] == spec.bits else f"{spec.bits}→{blocks['bits']}"
        inits = made.get(key)
        shared = inits is not None
        if inits is None:
            inits = _add_blocks(m, names, key, blocks, two_d=site.node.op_type == "Gather")
            made[key] = inits
        counted = name in record.layers
        if site.node.op_type == "Gather":
            _gather_node(m, names, site, inits, blocks)
            record.layers[name] = f"GatherBlockQuantized {spec.label()} (bits {blocks['bits']})"
        else:
            _matmul_node(m, names, site, inits, blocks, accuracy_level)
            record.layers[name] = f"MatMulNBits {spec.label()} (bits {blocks['bits']})"
        if shared and (name != key or name in tied.values()):  # the second of a tied head/embedding pair
            head = name if name != key else next(h for h, e in tied.items() if e == key)
            record.shared.append(f"{head} and {key} read one copy of the codes, scales and zero points")
        if not counted:  # a module whose initializer feeds several nodes counts once
            record.count_bits(label)
    drop_dead_nodes(m)
    drop_unused_initializers(m)
    for head, emb in tied.items():
        if emb not in gathers:
            record.notes.append(f"{head} is tied to {emb}, which the graph does not read through a Gather")
    record.notes.append("scales are stored as float32 (MatMulNBits needs the activation dtype): "
                        "2 bytes more per group than the artifact's fp16 scales")
    note = slow_eight_bit_note(record.layers.values(), accuracy_level)
    if note:
        record.notes.append(note)
    record.weight_bytes_after = weight_bytes(m)
    record.opset = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
    return record


def _add_blocks(m: onnx.ModelProto, names: set[str], key: str, blocks: dict, two_d: bool) -> dict[str, str]:
    out = {"data": unique_name(names, f"{key}.qweight"), "scales": unique_name(names, f"{key}.scales")}
    data = blocks["data"].reshape(blocks["N"], -1) if two_d else blocks["data"]
    m.graph.initializer.append(numpy_helper.from_array(data, out["data"]))
    m.graph.initializer.append(numpy_helper.from_array(blocks["scales"], out["scales"]))
    if blocks["zeros"] is not None:
        out["zeros"] = unique_name(names, f"{key}.zero_points")
        m.graph.initializer.append(numpy_helper.from_array(blocks["zeros"], out["zeros"]))
    return out


def slow_eight_bit_note(layers, accuracy_level: int) -> str | None:
    """The warning for 8-bit MatMulNBits at accuracy level 0 (`layers`: descriptions ending in "(bits N)"), or None."""
    eight = sum(1 for v in layers if v.startswith("MatMulNBits") and v.endswith("(bits 8)"))
    if not eight or accuracy_level:
        return None
    return (f"{eight} MatMulNBits layer(s) run 8-bit codes with fp32 activations, which ONNX Runtime CPU computes "
            "slowly (measured 15-18x a 4-bit layer; BENCHMARKS.md): decode with --accuracy-level 4, or plan without "
            "8-bit candidates (e.g. --target ort --candidates 4a,4,4g64a,4g64,2a; a torch-target plan's 5/6-bit "
            "layers land in 8-bit containers too)")


def _matmul_node(m, names, site: WeightSite, inits: dict, blocks: dict, accuracy_level: int) -> None:
    inputs = [site.node.input[0], inits["data"], inits["scales"]]
    if "zeros" in inits:
        inputs.append(inits["zeros"])
    attrs = {"K": blocks["K"], "N": blocks["N"], "bits": blocks["bits"], "block_size": blocks["block_size"]}
    if accuracy_level:
        attrs["accuracy_level"] = accuracy_level
    bias = site.node.input[2] if site.node.op_type == "Gemm" and len(site.node.input) > 2 else ""
    out = unique_name(names, f"{site.module}/MatMulNBits_output") if bias else site.node.output[0]
    new = [helper.make_node("MatMulNBits", inputs, [out], domain=MS_DOMAIN,
                            name=unique_name(names, f"{site.module}/MatMulNBits"), **attrs)]
    if bias:  # a Gemm's C: added after, as the Gemm did
        new.append(helper.make_node("Add", [out, bias], [site.node.output[0]],
                                    name=unique_name(names, f"{site.module}/Add")))
    replace_node(m, site.node, new)


def _gather_node(m, names, site: WeightSite, inits: dict, blocks: dict) -> None:
    axis = next((a.i for a in site.node.attribute if a.name == "axis"), 0)
    if axis != 0:
        raise UserError(f"{site.module}: Gather on axis {axis}; only row lookups (axis 0) become GatherBlockQuantized")
    data2d, new = inits["data"], []
    if next(len(t.dims) for t in m.graph.initializer if t.name == data2d) == 3:  # shared with a MatMulNBits
        shape2d = unique_name(names, f"{site.module}/shape")
        data2d = unique_name(names, f"{site.module}/qweight_2d")
        m.graph.initializer.append(numpy_helper.from_array(np.array([blocks["N"], -1], np.int64), shape2d))
        new.append(helper.make_node("Reshape", [inits["data"], shape2d], [data2d],
                                    name=unique_name(names, f"{site.module}/Reshape")))
    inputs = [data2d, site.node.input[1], inits["scales"]]
    if "zeros" in inits:
        inputs.append(inits["zeros"])
    new.append(helper.make_node("GatherBlockQuantized", inputs, list(site.node.output), domain=MS_DOMAIN,
                                name=unique_name(names, f"{site.module}/GatherBlockQuantized"), gather_axis=0,
                                quantize_axis=1, block_size=blocks["block_size"], bits=blocks["bits"]))
    replace_node(m, site.node, new)
