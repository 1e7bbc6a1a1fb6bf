"""`compress export --gguf` as a function: write the GGUF, then run it in llama.cpp against torch.

Validation runs the file in llama.cpp itself (llama-cpp-python, the `llamacpp` extra) on held-out windows: against
the artifact's own torch model (llama.cpp's kernels quantize activations to 8 bits, so the check is by distribution:
KL and top-1, not elementwise) and against the original float model (reported, gated by --max-kl / --min-top1).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from compress.errors import UserError
from compress.progress import phase
from flows.options import DataOptions, ModelOptions, OutputOptions, StreamOptions

# llama.cpp vs the torch model it came from. Its Q4/Q5/Q8 dot products run on 8-bit activations: the SmolLM2
# source Q4_1 file in llama.cpp vs its own dequantized weights measures KL 0.0034, top-1 0.963 (ANCHORS.md).
OWN_TOLERANCE = {"kl_max": 0.02, "top1_min": 0.9}
FLOAT_TYPES = ("F16", "F32", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")


@dataclass(kw_only=True)
class GgufRequest(StreamOptions, OutputOptions, DataOptions, ModelOptions):
    """Everything `compress export --gguf` was asked to do."""

    out: Path
    float_type: str = "F16"
    validate: bool = True
    tokens: int = 512
    seq_len: int | None = 256
    threads: int = 2
    max_kl: float | None = None
    min_top1: float | None = None


def check_request(req: GgufRequest) -> None:
    """UserError for bad input, before anything is loaded or written."""
    if req.float_type.upper() not in FLOAT_TYPES:
        raise UserError(f"--float-type {req.float_type}: use one of {', '.join(FLOAT_TYPES)}")
    out = Path(req.out)
    if out.suffix != ".gguf":
        raise UserError(f"--gguf {req.out}: name the output file OUT.gguf")
    if out.is_dir():
        raise UserError(f"--gguf {req.out} is a directory: pass the path of the .gguf file to write")
    if not out.parent.exists():
        raise UserError(f"--gguf {req.out}: directory {out.parent} does not exist")
    if req.validate:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            raise UserError("validating a GGUF runs it in llama.cpp: pip install 'compress[llamacpp]' (builds "
                            "llama.cpp, ~5 minutes), or pass --no-validate") from None
    req.check_data()
    req.check_stream()


def run_gguf_export(req: GgufRequest, progress=None) -> dict:
    """Write OUT.gguf (atomically) and validate it in llama.cpp; the summary also goes to OUT.gguf.json."""
    check_request(req)
    from compress.atomic import write_text
    from compress.outputs import stamp
    from exporters.gguf import export_gguf

    choice = req.stream_choice(req.model)
    if choice.stream:
        return _run_streaming(req, choice, progress)
    req.compute_device(streamed=False)
    loaded, artifact = req.load_source()
    report = export_gguf(loaded, req.out, float_type=req.float_type.upper())
    result: dict = {"model": req.model, "format": "gguf", "out": str(req.out), "export": report.to_dict(),
                    "export_seconds": report.seconds, "size_bytes": report.file_bytes, "bpw": report.bpw,
                    "not_exact": report.approximation_note()}
    if req.validate:
        with phase("llama.cpp validation", progress=progress):
            result["validation"] = _validate(loaded, req, artifact)
        result["validation_seconds"] = round(sum(v["seconds"] for v in result["validation"].values()), 2)
        result["passed"] = all(v["passed"] for v in result["validation"].values())
    else:
        result["passed"] = None
    write_text(Path(str(req.out) + ".json"), json.dumps({**result, "written_by": stamp()["written_by"]}, indent=2)
               + "\n")
    return result


def _run_streaming(req: GgufRequest, choice, progress=None) -> dict:
    """The GGUF written block by block (exporters.gguf.export_gguf_streaming); validated in llama.cpp against
    reference logits computed block by block too (the artifact's and its source's)."""
    from compress.atomic import write_text
    from compress.outputs import stamp
    from compress.stream.decide import decide
    from compress.stream.evaluate import logits_streaming
    from compress.stream.lazy import open_lazy
    from exporters.gguf import export_gguf_streaming

    device = req.compute_device(streamed=True)
    lazy = open_lazy(choice.path, req.model, device=device)
    report = export_gguf_streaming(lazy, req.out, float_type=req.float_type.upper(), progress=progress)
    result: dict = {"model": req.model, "format": "gguf", "out": str(req.out), "export": report.to_dict(),
                    "export_seconds": report.seconds, "size_bytes": report.file_bytes, "bpw": report.bpw,
                    "not_exact": report.approximation_note(), "stream": True, "notes": [choice.why]}
    if req.validate:
        from compress.data import load_windows

        windows = load_windows(req.data, lazy.loaded, split="evaluation", tokens=req.tokens, seq_len=req.seq_len,
                               seed=req.seed)
        artifact = bool(lazy.specs)
        with phase("llama.cpp validation", progress=progress):
            own = "vs artifact (llama.cpp, 8-bit activations)" if artifact else "vs source"
            reports = {own: _compare(req.out, lazy.loaded, windows, req.threads,
                                     ref_logits=logits_streaming(lazy, windows), **OWN_TOLERANCE)}
            base = (lazy.loaded.extra.get("manifest") or {}).get("base") if artifact else None
            if base:
                source = open_lazy(decide(base, "on").path, base, device=device)
                reports["vs original float"] = _compare(req.out, source.loaded, windows, req.threads,
                                                        kl_max=req.max_kl, top1_min=req.min_top1,
                                                        ref_logits=logits_streaming(source, windows))
        result["validation"] = reports
        result["validation_seconds"] = round(sum(v["seconds"] for v in reports.values()), 2)
        result["passed"] = all(v["passed"] for v in reports.values())
    else:
        result["passed"] = None
    write_text(Path(str(req.out) + ".json"), json.dumps({**result, "written_by": stamp()["written_by"]}, indent=2)
               + "\n")
    return result


def _validate(loaded, req: GgufRequest, artifact: bool) -> dict:
    from compress.data import load_windows
    from compress.models import load_model

    windows = load_windows(req.data, loaded, split="evaluation", tokens=req.tokens, seq_len=req.seq_len,
                           seed=req.seed)
    own_label = "vs artifact (llama.cpp, 8-bit activations)" if artifact else "vs source"
    reports = {own_label: _compare(req.out, loaded, windows, req.threads, **OWN_TOLERANCE)}
    base = loaded.extra.get("manifest", {}).get("base") if artifact else None
    if base:
        reports["vs original float"] = _compare(
            req.out, load_model(base), windows, req.threads,
            kl_max=req.max_kl, top1_min=req.min_top1)
    return reports


def _compare(gguf_path: Path, reference, windows, threads: int, kl_max: float | None, top1_min: float | None,
             ref_logits=None) -> dict:
    from exporters.llamacpp import compare_with_reference

    cmp = compare_with_reference(gguf_path, reference, windows, n_threads=threads, ref_logits=ref_logits)
    passed = (kl_max is None or cmp.kl_mean <= kl_max) and (top1_min is None or cmp.top1_agreement >= top1_min)
    return {**cmp.to_dict(), "kl_max": kl_max, "top1_min": top1_min, "passed": passed,
            "seconds": round(cmp.llamacpp_seconds + cmp.reference_seconds, 2)}
