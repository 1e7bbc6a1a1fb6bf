"""An ONNX Runtime GenAI package (model.onnx, genai_config.json, tokenizer) from a quantized artifact, with the
artifact's own codes, made by ONNX Runtime GenAI's own model builder.

The artifact is written as an "olive"-format quantized checkpoint — per Linear `NAME.qweight` (uint8 codes packed
along the input axis, low bits first: MatMulNBits' byte layout), `NAME.scales`, `NAME.qzeros`, per-layer bits in
`quantization_config.overrides` — which the builder's olive loader only reshapes, never requantizes, so every
MatMulNBits carries our bytes while the graph gets the builder's fusions (SkipSimplifiedLayerNormalization,
GroupQueryAttention with rotary, packed Q/K/V where the three share a width). The builder's own quantizer is kept
away from everything else (`nodes_to_exclude`), and `accuracy_level=0` keeps fp32 activations, so the package
computes what the artifact computes.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from compress.errors import UserError

QKV = ("q_proj", "k_proj", "v_proj")  # packed into one MatMulNBits by the builder
FAMILIES = {"llama": "LlamaForCausalLM"}  # HF model_type -> architecture the package is tested for
GENAI_CONFIG = "genai_config.json"
# classes onnxruntime-genai 0.18's builder imports that transformers 4.57 does not have (models it cannot build
# here anyway); placeholders let the builder import
_BUILDER_IMPORTS = ("Gemma4ForCausalLM", "Gemma4UnifiedForCausalLM", "Lfm2AudioForConditionalGeneration",
                    "Qwen3_5DecoderLayer", "Qwen3_5ForConditionalGeneration", "Qwen3_5MoeDecoderLayer",
                    "Qwen3_5MoeForConditionalGeneration")


@dataclass
class GenaiPackage:
    """What was written: layers and their bits, the graph's op counts, what was fused, notes."""

    layers: dict[str, str] = field(default_factory=dict)
    ops: dict[str, int] = field(default_factory=dict)
    fusions: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON form (export.json's `extra.genai`)."""
        return {"layers": self.layers, "ops": self.ops, "fusions": self.fusions, "notes": self.notes,
                "files": self.files, "nodes": sum(self.ops.values())}


def check_genai(loaded) -> None:
    """UserError when the artifact's family or plan cannot become a package that computes exactly its codes."""
    from exporters.ort_quant import _ort_problem, quantized_targets

    model_type = getattr(loaded.module.config, "model_type", None)
    if loaded.kind != "decoder" or model_type not in FAMILIES:
        raise UserError(f"--format genai: the {model_type or loaded.kind} family is not covered (the package is "
                        f"made for {', '.join(FAMILIES)} decoders); export it with --format int4 instead")
    linears, gathers, tied = quantized_targets(loaded)
    if gathers and not tied:
        raise UserError("--format genai: the builder cannot carry a quantized untied embedding; quantize with "
                        "--embeddings keep (or a plan that leaves the embedding in float)")
    for name, p in linears.items():
        why = _ort_problem(name, p, gather=False)
        if why is None and p.spec.bits not in (2, 4, 8):
            why = f"{name}: {p.spec.label()} — MatMulNBits runs 2, 4 and 8 bits; {p.spec.bits} bits has no kernel"
        if why is None and p.zeros is not None and p.zeros.dtype == torch.float16:
            why = f"{name}: {p.spec.label()} — the package needs integer zero points (hqq's are fp16)"
        if why is not None:
            raise UserError(f"--format genai: {why}; make the artifact with `compress quantize ... --target ort`")


def write_genai(loaded, out: Path, accuracy_level: int = 0) -> GenaiPackage:
    """Write the package for the artifact `loaded` into the directory `out` (which must exist and be empty);
    `accuracy_level` 4 lets MatMulNBits quantize activations to int8 (faster, no longer exact)."""
    from exporters.ort_quant import slow_eight_bit_note

    check_genai(loaded)
    pkg = GenaiPackage()
    with tempfile.TemporaryDirectory(prefix="compress-genai-", dir=out.parent) as tmp:
        src, cache = Path(tmp) / "olive", Path(tmp) / "cache"
        tied_quantized = _write_olive(loaded, src, pkg)
        options = [f"accuracy_level={accuracy_level}", "nodes_to_exclude=/lm_head/MatMul,/model/embed_tokens/Gather"]
        if tied_quantized:  # the builder's tied GatherBlockQuantized needs 2-D scales: fixed after the build
            options = [f"accuracy_level={accuracy_level}", "shared_embeddings=true"]
        _build(src, out, cache, options)
    if tied_quantized:
        _tie_fix(out / "model.onnx", pkg)
    _describe(out, pkg)
    note = slow_eight_bit_note(pkg.layers.values(), accuracy_level)
    if note:
        pkg.notes.append(note)
    return pkg


def _write_olive(loaded, root: Path, pkg: GenaiPackage) -> bool:
    """The artifact as an olive-format checkpoint in `root`; returns True when the LM head is the quantized table
    of a tied embedding."""
    from safetensors.torch import save_file

    from exporters.ort_quant import ort_blocks, pack_rows, quantized_targets

    root.mkdir(parents=True)
    linears, _gathers, tied = quantized_targets(loaded)
    model = loaded.module
    state: dict[str, torch.Tensor] = {}
    overrides: dict[str, dict] = {}
    widths = [ort_blocks(p)["bits"] for p in linears.values()]
    default_bits = max(set(widths), key=widths.count) if widths else 4
    groups = {p.spec.group_for(p.cols) for p in linears.values()}
    default_group = max(groups) if groups else 32
    tied_quantized = False
    for name, p in linears.items():
        blocks = ort_blocks(p)
        bits, rows, nb = blocks["bits"], p.rows, blocks["data"].shape[1]
        target = "lm_head" if name in tied else name
        tied_quantized |= name in tied
        zeros = blocks["zeros"]
        if zeros is None and name.rpartition(".")[2] in QKV:
            # symmetric in its own width: the default zero point, written out, because the builder concatenates
            # the packed Q/K/V's zero points and 0.18 fails on a missing one
            zeros = pack_rows(np.full((rows, nb), 2 ** (bits - 1), np.uint8), bits)
        state[f"{target}.qweight"] = torch.from_numpy(np.ascontiguousarray(blocks["data"].reshape(rows, -1)))
        state[f"{target}.scales"] = torch.from_numpy(blocks["scales"].astype(np.float32))
        if zeros is not None:  # absent: MatMulNBits' default zero point 2^(bits-1), as the builder's own int4
            state[f"{target}.qzeros"] = torch.from_numpy(np.ascontiguousarray(zeros.reshape(rows, -1)))
        if bits != default_bits or blocks["block_size"] != default_group:
            overrides[target] = {"bits": bits, "group_size": blocks["block_size"]}
        pkg.layers[name] = f"MatMulNBits {p.spec.label()} (bits {bits})"
    done = {n for n in linears}
    for key, t in _float_state(model, done, tied).items():
        state[key] = t
    save_file({k: v.contiguous() for k, v in state.items()}, str(root / "model.safetensors"),
              metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg.update(architectures=[FAMILIES[cfg["model_type"]]], torch_dtype="float32",
               quantization_config={"quant_method": "olive", "bits": default_bits, "group_size": default_group,
                                    "overrides": overrides})
    cfg.pop("_name_or_path", None)
    if cfg.get("rope_scaling") is None:
        cfg["rope_scaling"] = {"rope_type": "default"}  # the builder iterates it; null would crash it
    (root / "config.json").write_text(json.dumps(cfg, indent=2))
    if loaded.tokenizer is None:
        raise UserError(f"--format genai: {loaded.spec} has no tokenizer beside its weights; the package needs one")
    loaded.tokenizer.save_pretrained(root)
    return tied_quantized


def _float_state(model: torch.nn.Module, quantized: set[str], tied: dict[str, str]) -> dict[str, torch.Tensor]:
    """The float tensors of the model in HF names (norms, a float embedding / head): every state entry that is not
    part of a quantized module; a quantized tied table gives the embedding its exact dequantized values."""
    from compress.quantize.modules import QuantEmbedding

    out: dict[str, torch.Tensor] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, QuantEmbedding):
            out[f"{name}.weight"] = mod.packed.dequantize()
    skip = tuple(f"{n}." for n in quantized) + tuple(f"{n}." for n in tied.values())
    for key, t in model.state_dict().items():
        if key.startswith(skip) or key in out:
            continue
        if key == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False):
            continue
        if t.is_floating_point():
            out[key] = t.detach().float().clone()
    return out


def _build(src: Path, out: Path, cache: Path, options: list[str]) -> None:
    """Run ONNX Runtime GenAI's model builder (int4 precision: our prequantized layers pass through unchanged)."""
    import transformers

    for name in _BUILDER_IMPORTS:
        if not hasattr(transformers, name):
            setattr(transformers, name, type(name, (), {}))
    try:
        from onnxruntime_genai.models.builder import create_model, parse_extra_options
    except ImportError as exc:
        raise UserError("--format genai needs onnxruntime-genai: pip install -e \".[genai]\"") from exc
    logging.disable(logging.INFO)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            extra = parse_extra_options(None, str(src), str(out), "int4", "cpu", str(cache), options)
            create_model(None, str(src), str(out), "int4", "cpu", str(cache), **extra)
    finally:
        logging.disable(logging.NOTSET)
    shutil.rmtree(cache, ignore_errors=True)


def _tie_fix(path: Path, pkg: GenaiPackage) -> None:
    """The builder's tied GatherBlockQuantized reads the head's 1-D scales / zero points, which ONNX Runtime refuses
    for Gather ("same rank as data"): give both ops those initializers in 2-D [N, blocks] form (MatMulNBits takes
    either), in place."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path), load_external_data=True)
    inits = {i.name: i for i in m.graph.initializer}
    rows_of = {}  # a MatMulNBits' scales / zero points -> its N (output rows)
    for node in m.graph.node:
        if node.op_type == "MatMulNBits":
            n = next(onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "N")
            rows_of.update({name: n for name in node.input[2:4]})
    fixed = 0
    for node in m.graph.node:
        if node.op_type != "GatherBlockQuantized":
            continue
        rows = rows_of.get(node.input[2])
        for k in (2, 3):
            if len(node.input) > k and node.input[k] in inits and rows:
                arr = numpy_helper.to_array(inits[node.input[k]])
                if arr.ndim == 1:
                    inits[node.input[k]].CopyFrom(numpy_helper.from_array(arr.reshape(rows, -1), node.input[k]))
                    fixed += 1
    if fixed:
        data = path.with_name("model.onnx.data")
        data.unlink(missing_ok=True)  # loaded into memory above; onnx.save appends to an existing data file
        onnx.save(m, str(path), save_as_external_data=True, location=data.name, all_tensors_to_one_file=True)
        pkg.notes.append("tied embedding / LM head: one quantized table, read by GatherBlockQuantized and "
                         "MatMulNBits (its scales and zero points reshaped to 2-D for the Gather)")


def _describe(out: Path, pkg: GenaiPackage) -> None:
    import collections

    import onnx

    m = onnx.load(str(out / "model.onnx"), load_external_data=False)
    pkg.ops = dict(collections.Counter(n.op_type for n in m.graph.node))
    names = [n.name for n in m.graph.node]
    if pkg.ops.get("SkipSimplifiedLayerNormalization"):
        pkg.fusions.append(f"RMSNorm + residual → SkipSimplifiedLayerNormalization "
                           f"({pkg.ops['SkipSimplifiedLayerNormalization']})")
    if pkg.ops.get("GroupQueryAttention"):
        pkg.fusions.append(f"attention with rotary → GroupQueryAttention ({pkg.ops['GroupQueryAttention']})")
    packed = sum("qkv_proj" in n for n in names if "MatMulNBits" in n)
    if packed:
        pkg.fusions.append(f"Q/K/V → one packed MatMulNBits in {packed} layer(s) (the others differ in width)")
    pkg.files = sorted(f.name for f in out.iterdir())


# ---------------------------------------------------------------------------------------------- validation
def package_logits(out: Path, windows) -> list[np.ndarray]:
    """Per-window logits [seq, vocab] of the package run by onnxruntime_genai itself (one generator per window)."""
    import onnxruntime_genai as og

    model = og.Model(str(out))
    logits = []
    for ids in windows.input_ids:
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(ids) + 1)
        gen = og.Generator(model, params)
        gen.append_tokens(ids.tolist())
        logits.append(np.array(gen.get_output("logits"))[0].astype(np.float32))
    return logits


def package_greedy(out: Path, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy continuation of `prompt` by onnxruntime_genai's generator loop."""
    import onnxruntime_genai as og

    model = og.Model(str(out))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + new_tokens)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    while not gen.is_done():
        gen.generate_next_token()
    return [int(t) for t in gen.get_sequence(0)][len(prompt):]


def validate_genai(out: Path, artifact, original, windows, new_tokens: int = 32, max_kl: float | None = None,
                   min_top1: float | None = None, int8_activations: bool = False) -> dict:
    """Reports in export's form: logits of the package (run by onnxruntime_genai) against the artifact in torch
    (must match to kernel rounding; with int8 activations, KL ≤ 0.01 and top-1 ≥ 0.9) and against the original
    (reported; gated by max_kl / min_top1), plus greedy generation against the artifact in torch (all tokens
    equal; with int8 activations reported only)."""
    from compress.metrics import kl_per_token, log_softmax_chunked

    got = package_logits(out, windows)
    reports = {}
    refs = [("vs artifact (kernel rounding)", artifact)] + ([("vs original float", original)] if original else [])
    for label, ref in refs:
        with torch.inference_mode():
            want = [ref.module(input_ids=ids[None], use_cache=False).logits[0].float() for ids in windows.input_ids]
        kl, top1, diff = [], [], 0.0
        for g, w in zip(got, want, strict=True):
            gt = torch.from_numpy(g)
            kl.append(kl_per_token(log_softmax_chunked(w), gt))
            top1.append((gt.argmax(-1) == w.argmax(-1)).float())
            diff = max(diff, float((gt - w).abs().max()))
        kl_mean, top1_mean = float(torch.cat(kl).mean()), float(torch.cat(top1).mean())
        if ref is artifact:
            passed = kl_mean <= (1e-2 if int8_activations else 1e-3) and top1_mean >= (0.9 if int8_activations
                                                                                      else 0.99)
        else:
            passed = (max_kl is None or kl_mean <= max_kl) and (min_top1 is None or top1_mean >= min_top1)
        check = {"name": "logits (onnxruntime_genai)", "max_abs": diff, "atol": None, "cosine": None,
                 "kl_mean": kl_mean, "top1": top1_mean, "passed": passed}
        reports[label] = {"passed": passed, "checks": [check]}
    prompt = windows.input_ids[0][:32].tolist()
    ours = package_greedy(out, prompt, new_tokens)
    with torch.inference_mode():
        theirs = artifact.module.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False,
                                          pad_token_id=0)[0, len(prompt):].tolist()
    same = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), min(len(ours), len(theirs)))
    gen = {"name": f"greedy tokens equal to the artifact's (of {new_tokens})", "max_abs": None, "atol": None,
           "cosine": None, "kl_mean": None, "top1": same / max(new_tokens, 1),
           "passed": same == new_tokens or int8_activations, "equal_tokens": same}
    reports["vs artifact (kernel rounding)"]["checks"].append(gen)
    art = reports["vs artifact (kernel rounding)"]
    art["passed"] = all(c["passed"] for c in art["checks"])
    return reports
