"""GGUF export measured in llama.cpp: layer-wise `--target gguf` artifacts near 5.5 and 6 bits/weight → export_gguf
→ llama-cpp-python logits on the ANCHORS.md windows (persuasion.txt, first N × 512 tokens), KL(original ‖ llama.cpp)
mean/p99 and top-1, the artifact's own torch KL on the same windows, greedy generation and decode ms/token. Uniform
Q8_0/Q5_0 GGUFs of the original (the gguf package's reference quantizers) are the baselines.

    python benchmarks/gguf.py --model smollm2-135m [--avg-bits 5.5,6] [--windows 6] [--artifact 5.5=DIR ...]

JSON to benchmarks/results/gguf-<model>.json (BENCHMARKS.md is not touched).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
# this file's name would shadow the `gguf` package: run with the repository, not benchmarks/, on the path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "benchmarks"]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

AUSTEN = REPO.parent / "shared" / "data" / "text" / "austen"
CALIB = ",".join(str(p) for p in sorted(AUSTEN.glob("*.txt")) if p.name != "persuasion.txt")
PROMPT = "It is a truth universally acknowledged, that a single man in possession of a good fortune"


def torch_kl(model, ref_logits: list[torch.Tensor], windows) -> dict:
    """KL(original ‖ model in torch) and top-1 on the same windows."""
    from evals.metrics import kl_per_token, log_softmax_chunked, summarize, top1_agreement

    kl, top1 = [], []
    with torch.inference_mode():
        for r, ids in zip(ref_logits, windows.input_ids, strict=True):
            c = model.module(input_ids=ids[None], use_cache=False).logits[0].float()
            kl.append(kl_per_token(log_softmax_chunked(r), c))
            top1.append(top1_agreement(r, c))
    s = summarize(torch.cat(kl))
    return {"kl_mean": s["mean"], "kl_p99": s["p99"], "top1": float(torch.cat(top1).mean())}


def measure(name: str, gguf_path: Path, export, original, windows, ref_logits, a, extra: dict) -> dict:
    """llama.cpp numbers for one GGUF."""
    from evals.llamacpp import compare_with_reference, llamacpp_decode_speed, llamacpp_generate

    cmp = compare_with_reference(gguf_path, original, windows, n_threads=a.threads, ref_logits=ref_logits)
    t0 = time.perf_counter()
    text = llamacpp_generate(gguf_path, PROMPT, max_tokens=16, n_threads=a.threads)
    gen_s = time.perf_counter() - t0
    prompt = original.tokenizer(PROMPT)["input_ids"]
    ms = llamacpp_decode_speed(gguf_path, n_tokens=a.decode_tokens, n_threads=a.threads, prompt=prompt)
    row = {"name": name, "gguf_bytes": export.file_bytes, "gguf_bpw": export.bpw, "file_type": export.file_type,
           "tensors_exact": export.n_exact, "tensors_approximated": export.n_approximated,
           "approximation_note": export.approximation_note(), "export_seconds": export.seconds,
           "tokenizer": export.tokenizer, "llamacpp_kl_mean": cmp.kl_mean, "llamacpp_kl_p99": cmp.kl_p99,
           "llamacpp_top1": cmp.top1_agreement, "llamacpp_logits_seconds": cmp.llamacpp_seconds,
           "generate_prompt": PROMPT, "generated": text, "generate_seconds": round(gen_s, 2),
           "decode_ms_per_token": round(ms, 2), **extra}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m", help="zoo name or HF llama directory")
    ap.add_argument("--avg-bits", default="5.5,6")
    ap.add_argument("--artifact", action="append", default=[], help="BITS=DIR: reuse an artifact made earlier")
    ap.add_argument("--windows", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--baselines", default="Q8_0,Q5_0", help="uniform GGUF types of the original ('' for none)")
    ap.add_argument("--work", type=Path, default=REPO / "out" / "gguf")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from compress.artifact import load_artifact
    from compress.data import load_windows
    from compress.models import load_model
    from compress.quantize.run import QuantizeRequest, run_quantize
    from evals.llamacpp import reference_logits
    from exporters.gguf import export_gguf

    name = Path(a.model).name
    work = a.work / name
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    original = load_model(a.model)
    windows = load_windows(str(AUSTEN / "persuasion.txt"), original, split="all", tokens=512 * a.windows,
                           seq_len=512, sequential=True)
    ref_logits = reference_logits(original, windows)
    reference_s = time.perf_counter() - t0
    reuse = dict(s.split("=", 1) for s in a.artifact)
    rows = []
    for bits in [b.strip() for b in a.avg_bits.split(",") if b.strip()]:
        art_dir, quantize_s = Path(reuse[bits]) if bits in reuse else work / f"lw{bits}", None
        if bits not in reuse:
            t = time.perf_counter()
            run_quantize(QuantizeRequest(model=a.model, layerwise=True, avg_bits=float(bits), target="gguf",
                                         data=CALIB, tokens=1024, eval_tokens=1024, out=art_dir))
            quantize_s = round(time.perf_counter() - t, 1)
        art = load_artifact(art_dir)
        manifest = art.extra["manifest"]
        export = export_gguf(art, work / f"lw{bits}.gguf")
        own = torch_kl(art, ref_logits, windows)
        extra = {"avg_bits_requested": float(bits), "artifact": str(art_dir), "quantize_seconds": quantize_s,
                 "artifact_bpw": manifest.get("bpw"), "units": manifest["plan"]["meta"].get("units"),
                 "calibration": manifest["plan"]["meta"].get("calibration"), "torch_artifact": own}
        rows.append(measure(f"layer-wise {bits} --target gguf", work / f"lw{bits}.gguf", export, original, windows,
                            ref_logits, a, extra))
        del art
    for qtype in [t.strip() for t in a.baselines.split(",") if t.strip()]:
        export = export_gguf(original, work / f"uniform-{qtype}.gguf", float_type=qtype)
        rows.append(measure(f"uniform {qtype} of the original", work / f"uniform-{qtype}.gguf", export, original,
                            windows, ref_logits, a, {}))
    out = REPO / "benchmarks" / "results" / f"gguf-{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": a.model, "date": time.strftime("%Y-%m-%d"), "machine": platform.machine(),
            "torch": torch.__version__, "llama_cpp": __import__("llama_cpp").__version__, "threads": a.threads,
            "windows": windows.describe(), "reference_seconds": round(reference_s, 1),
            "load_average": os.getloadavg()[0]}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
