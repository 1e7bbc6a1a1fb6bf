"""`compress export` as a function: load a model or artifact, write the graph, validate it, summarise — atomically.

Float formats (fp32, fp16) are validated against the model they came from. Quantized formats (int4: ONNX Runtime
MatMulNBits / GatherBlockQuantized; qdq: TensorRT-style DequantizeLinear) carry the artifact's own codes and are
validated twice: against the artifact's torch model (must match to kernel rounding) and against the original
float model (KL and top-1, reported, gated only by the user's --max-kl / --min-top1).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from compress.errors import UserError
from compress.progress import phase
from exporters.formats import QUANTIZED_FORMATS, check_export_options
from flows.options import DataOptions, ModelOptions, OutputOptions

# int8 activations are not kernel rounding: their graph is checked against the artifact by distribution instead
# (on SmolLM2 layer-wise 4.5 bpw: logits KL 0.005, top-1 0.955, KV cache cosine 0.9997 vs the artifact).
INT8_ACTIVATIONS_TOLERANCE = {"kl_max": 0.01, "top1_min": 0.9, "cos_min": 0.999}
SUMMARY = "README.md"
VALIDATION = "validation.json"


@dataclass(kw_only=True)
class ExportRequest(OutputOptions, DataOptions, ModelOptions):
    """Everything `compress export` was asked to do."""

    out: Path
    fmt: str = "fp32"
    opset: int | None = None
    validate: bool = True
    tokens: int = 512
    seq_len: int | None = 256
    requantize: bool = False
    accuracy_level: int = 0  # int4: 0 = fp32 MatMulNBits compute (exact), 4 = int8 activations (faster)
    max_kl: float | None = None
    min_top1: float | None = None
    fuse_attention: bool = False  # decoders: one GroupQueryAttention per layer (ONNX Runtime contrib op)


def _check(req: ExportRequest) -> None:
    from compress.artifact import is_artifact

    fmt = check_export_options(req.fmt, req.opset, req.accuracy_level, req.fuse_attention)
    if fmt.quantized and not is_artifact(Path(req.model)):
        raise UserError(f"--format {req.fmt} exports a quantized artifact's own codes: pass a directory written by "
                        f"`compress quantize ... --target {fmt.target} --out DIR` (got {req.model})")
    if Path(req.out).exists() and not Path(req.out).is_dir():
        raise UserError(f"--onnx {req.out}: exists and is not a directory")
    req.check_data()


def run_export(req: ExportRequest, progress=None) -> dict:
    """Export, validate and write OUT (complete or absent); returns the summary (also in OUT/README.md)."""
    _check(req)
    from compress.atomic import atomic_dir

    loaded, artifact = req.load_source()
    result: dict = {"model": req.model, "format": req.fmt, "out": str(req.out)}
    with atomic_dir(Path(req.out)) as tmp:
        t0 = time.perf_counter()
        with phase(f"export {req.fmt} graph", progress=progress):  # ~1-2 minutes for a 135 M decoder
            result["export"] = _export(loaded, tmp, req)
        result["export_seconds"] = round(time.perf_counter() - t0, 2)
        if req.validate:
            t1 = time.perf_counter()
            result["validation"] = _validate(loaded, tmp, req, artifact, progress)
            result["validation_seconds"] = round(time.perf_counter() - t1, 2)
            result["passed"] = all(v["passed"] for v in result["validation"].values())
        else:
            result["passed"] = None
        result["size_bytes"] = sum(f.stat().st_size for f in tmp.glob("model.onnx*"))
        (tmp / VALIDATION).write_text(json.dumps(result, indent=2) + "\n")
        (tmp / SUMMARY).write_text(summary_markdown(result))
    return result


def _export(loaded, tmp: Path, req: ExportRequest) -> dict:
    """Write OUT/model.onnx (+ config, tokenizer, export.json). A plain float export is the exporter's own graph;
    otherwise the exporter's float graph is read once into memory, rewritten there (the artifact's own codes as
    MatMulNBits / Q/DQ, then attention fusion) and saved once."""
    import onnx

    from exporters.graph import save_model_atomic
    from exporters.onnx import EXPORT_JSON, MODEL_FILE, write_float

    if req.fmt == "genai":
        return _export_genai(loaded, tmp, req.accuracy_level)
    quantized = req.fmt in QUANTIZED_FORMATS
    if not quantized and not req.fuse_attention:
        return write_float(loaded, tmp, req.fmt, req.opset).to_dict()
    if req.fuse_attention and loaded.kind != "decoder":
        raise UserError(f"--fuse-attention applies to decoders with a KV cache, not a {loaded.kind}")
    staging = tmp / ".exporter"
    if quantized:
        from exporters.ort_quant import dequantized_copy

        res = write_float(dequantized_copy(loaded), staging, "fp32", req.opset)
    else:
        res = write_float(loaded, staging, req.fmt, req.opset)
    graph = onnx.load(str(res.onnx_path), load_external_data=True)  # the one in-memory graph every rewrite edits
    meta = {**res.to_dict(), "fmt": req.fmt}
    extra = meta.setdefault("extra", {})
    if quantized:
        if req.fmt == "int4":
            from exporters.ort_quant import matmulnbits_

            record = matmulnbits_(graph, loaded, accuracy_level=req.accuracy_level)
        else:
            from exporters.qdq import qdq_

            record = qdq_(graph, loaded, requantize=req.requantize)
        meta["opset"] = record.opset or res.opset
        extra["rewrite"] = record.to_dict()
    if req.fuse_attention:
        from exporters.fuse_gqa import fuse_attention

        extra["fusion"] = fuse_attention(graph, loaded.module.config).to_dict()
    for f in staging.iterdir():  # config, tokenizer: everything but the exporter's graph and record
        if not f.name.startswith(MODEL_FILE) and f.name != EXPORT_JSON:
            shutil.move(str(f), tmp / f.name)
    shutil.rmtree(staging)
    save_model_atomic(graph, tmp / MODEL_FILE)  # external data only above 2 GB
    (tmp / EXPORT_JSON).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _export_genai(loaded, tmp: Path, accuracy_level: int = 0) -> dict:
    """--format genai: the ONNX Runtime GenAI package, made by its own model builder from the artifact's codes."""
    from exporters.genai import write_genai
    from exporters.onnx import EXPORT_JSON

    pkg = write_genai(loaded, tmp, accuracy_level)
    meta = {"fmt": "genai", "task": "text-generation-with-past (onnxruntime-genai)", "opset": None,
            "extra": {"genai": pkg.to_dict()}}
    (tmp / EXPORT_JSON).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _validate(loaded, tmp: Path, req: ExportRequest, artifact: bool, progress) -> dict:
    """One report per reference: the model itself (float formats) or the artifact and the original (quantized)."""
    from exporters.validate import validate

    inputs = validation_inputs(loaded, req.data, req.tokens, req.seq_len, req.seed)
    if req.fmt == "genai":
        from compress.models import load_model
        from exporters.genai import validate_genai

        base = loaded.extra.get("manifest", {}).get("base")
        return _finite(validate_genai(tmp, loaded, load_model(base) if base else None, inputs,
                                      max_kl=req.max_kl, min_top1=req.min_top1,
                                      int8_activations=bool(req.accuracy_level)))
    graph = tmp / "model.onnx"
    if req.fmt not in QUANTIZED_FORMATS:
        reports = {"vs source" + (" (dequantized artifact)" if artifact else ""): validate(graph, loaded, inputs,
                                                                                           fmt=req.fmt)}
    else:
        from compress.models import load_model

        if req.accuracy_level:
            own = validate(graph, loaded, inputs, fmt=req.fmt, elementwise=False, **INT8_ACTIVATIONS_TOLERANCE)
            label = "vs artifact (int8 activations: KL and top-1)"
        else:
            own, label = validate(graph, loaded, inputs, fmt=req.fmt), "vs artifact (kernel rounding)"
        base = loaded.extra.get("manifest", {}).get("base")
        reports = {label: own}
        if base:
            original = load_model(base)
            reports["vs original float"] = validate(
                graph, original, inputs, fmt="fp32", elementwise=False,
                kl_max=req.max_kl if req.max_kl is not None else float("inf"),
                top1_min=req.min_top1 if req.min_top1 is not None else 0.0, cos_min=-1.0)
    return {k: _finite(v.to_dict()) for k, v in reports.items()}


def _finite(obj):
    """JSON has no infinity: an unbounded threshold is written as null."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return None if isinstance(obj, float) and obj in (float("inf"), float("-inf")) else obj


def validation_inputs(loaded, data: str | None, tokens: int = 512, seq_len: int | None = 256, seed: int = 0):
    """Held-out windows for language models (evaluation split); seeded random images for image models."""
    if loaded.kind == "cnn":
        from exporters.validate import random_images

        return random_images(4, seed=seed)
    from compress.data import load_windows

    return load_windows(data, loaded, split="evaluation", tokens=tokens, seq_len=seq_len, seed=seed)


def summary_markdown(result: dict) -> str:
    """A model-card-like summary: what was exported, how it was validated, the numbers."""
    exp = result["export"]
    lines = [f"# {Path(str(result['model'])).name} — ONNX ({result['format']})", "",
             f"Exported by `compress export` from `{result['model']}` in {result['export_seconds']} s: task "
             f"`{exp.get('task')}`, opset {exp.get('opset')}, {result['size_bytes']:,} bytes of graph.", ""]
    rw = exp.get("extra", {}).get("rewrite")
    if rw:
        lines += [f"Quantized layers carry the artifact's own codes ({rw['kind']}): {len(rw['layers'])} layers, "
                  f"bits {rw['bits']}; weight bytes {rw['weight_bytes_before']:,} → {rw['weight_bytes_after']:,}."]
        lines += [f"- {n}" for n in rw.get("notes", [])] + [""]
    fusion = exp.get("extra", {}).get("fusion")
    if fusion:
        lines += [f"Attention fused: {n}." for n in fusion["notes"]] + [""]
    if result.get("validation") is None:
        lines.append("Not validated (--no-validate).")
        return "\n".join(lines) + "\n"
    verdict = "PASSED" if result["passed"] else "FAILED"
    lines += [f"Validation {verdict} in {result['validation_seconds']} s (ONNX Runtime CPU vs torch):", "",
              "| reference | check | max abs diff | tolerance | cosine | KL mean | top-1 | pass |",
              "|---|---|---|---|---|---|---|---|"]
    for ref, rep in result["validation"].items():
        for c in rep["checks"]:
            lines.append(f"| {ref} | {c['name']} | {_f(c.get('max_abs'))} | {_f(c.get('atol'))} | "
                         f"{_f(c.get('cosine'))} | {_f(c.get('kl_mean'))} | {_f(c.get('top1'))} | "
                         f"{'yes' if c.get('passed') else 'NO'} |")
    return "\n".join(lines) + "\n"


def _f(v) -> str:
    if v is None:
        return "-"
    return f"{v:.3g}" if isinstance(v, float) else str(v)
