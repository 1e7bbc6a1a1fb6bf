"""bitsandbytes backend figures: KL and CPU latency of Linear8bitLt / Linear4bit nf4 vs fp32 and our QuantLinear.

On SmolLM2-135M, the 30 blocks' Linears (embedding and tied head fp32) at uniform 8-bit (Linear8bitLt) and 4-bit
(nf4, block 64, nested absmax), beside our own q4g64 RTN QuantLinear: KL(original ‖ candidate) on the ANCHORS
windows, and latency of a 512-token prefill and of per-token decode with a KV cache (batch 1) in the same run.
Writes its own section of BENCHMARKS.md.

    python benchmarks/bnb_backend.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
AUSTEN = REPO.parent / "shared" / "data" / "text" / "austen"
COMMAND = "python benchmarks/bnb_backend.py"


@torch.inference_mode()
def latency(model, ids: torch.Tensor, prefill_runs: int, decode_steps: int) -> tuple[float, float]:
    """Median ms of a prefill of `ids` and median ms per decoded token (greedy, KV cache) after it."""
    pre = []
    for _ in range(prefill_runs):
        t = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        pre.append(time.perf_counter() - t)
    past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    steps = []
    for _ in range(decode_steps + 2):  # the first two steps are warm-up
        t = time.perf_counter()
        out = model(input_ids=tok, past_key_values=past, use_cache=True)
        steps.append(time.perf_counter() - t)
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return statistics.median(pre) * 1e3, statistics.median(steps[2:]) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--prefill-runs", type=int, default=3)
    ap.add_argument("--decode-steps", type=int, default=24)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()

    from compress.data import load_windows
    from compress.evaluate import evaluate
    from compress.models import layer_map, load_model
    from compress.plan import Plan
    from compress.quantize.bnb import fused_cpu_kernel, hf_quantization_config, to_bitsandbytes
    from compress.quantize.pipeline import quantize
    from compress.quantize.spec import QuantSpec

    torch.set_num_threads(2)
    load_start = os.getloadavg()[0]
    ref = load_model(a.model)
    lmap = layer_map(ref.module)
    linears = [p for b in lmap.blocks for p in b.linears]
    anchors = load_windows(str(AUSTEN / "persuasion.txt"), ref, split="all", tokens=a.eval_tokens, seq_len=512,
                           sequential=True)
    prompt = anchors.input_ids[0].unsqueeze(0)
    float_bytes = sum(ref.module.get_submodule(p).weight.numel() * 4 for p in linears)
    params = float_bytes // 4
    rows: list[dict] = []

    def measure(label: str, model, stored: int, extra: dict | None = None) -> None:
        t = time.perf_counter()
        r = evaluate(model, ref, anchors) if model is not ref else None
        eval_s = time.perf_counter() - t
        pre, dec = latency(model.module, prompt, a.prefill_runs, a.decode_steps)
        row = {"label": label, "stored_bytes": stored, "bpw": stored * 8 / params, "prefill_ms": pre,
               "decode_ms": dec, "eval_s": eval_s, **(extra or {})}
        if r is not None:
            row.update(kl_mean=r.kl_mean, kl_p99=r.kl_p99, top1=r.top1_agreement, ppl=r.ppl, ppl_ref=r.ppl_ref)
        print(json.dumps(row), flush=True)
        rows.append(row)

    measure("fp32 eager (reference)", ref, float_bytes)
    reload_diff = None
    for label, spec in (("bnb Linear8bitLt int8, threshold 0", QuantSpec(8, 64)),
                        ("bnb Linear4bit nf4, block 64, nested absmax", QuantSpec(4, 64))):
        cand = load_model(a.model)
        rec = to_bitsandbytes(cand.module, dict.fromkeys(linears, spec))
        measure(label, cand, rec.stored_bytes, {"map_s": rec.seconds, "notes": rec.notes})
        if spec.bits == 4:  # save through transformers and load back: same logits?
            from transformers import AutoModelForCausalLM

            cand.module.config.quantization_config = hf_quantization_config(cand.module, rec)
            with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
                cand.module.save_pretrained(tmp)
                back = AutoModelForCausalLM.from_pretrained(tmp, device_map="cpu", dtype=torch.float32)
                reload_diff = (back(input_ids=prompt).logits - cand.module(input_ids=prompt).logits).abs().max()
                reload_diff = float(reload_diff)
                file_bytes = sum(f.stat().st_size for f in Path(tmp).glob("*.safetensors"))
            rows[-1].update(reload_max_abs_diff=reload_diff, file_bytes=file_bytes)
            print(json.dumps({"reload_max_abs_diff": reload_diff, "file_bytes": file_bytes}), flush=True)
        del cand
    cand = load_model(a.model)
    t = time.perf_counter()
    quantize(cand, layer_map(cand.module), Plan.uniform(QuantSpec(4, 64), linears))
    q_s = time.perf_counter() - t
    stored = sum(cand.module.get_submodule(p).packed.stored_weight_bytes() for p in linears)
    measure("ours: QuantLinear q4g64 RTN (dequantize per call)", cand, stored, {"map_s": q_s})

    cpu = _cpu_name()
    load_end = os.getloadavg()[0]
    lines = [f"Written by `{COMMAND}` on {time.strftime('%Y-%m-%d')} ({cpu}, 2 threads shared with other jobs; "
             f"torch {torch.__version__}, bitsandbytes {_version('bitsandbytes')}, transformers "
             f"{_version('transformers')}; AVX512-BF16 fused nf4 kernel: {'yes' if fused_cpu_kernel() else 'no'}; "
             f"1-minute load average {load_start:.1f} at the start, {load_end:.1f} at the end: the latencies are "
             "comparable within this run only).",
             f"Model {a.model}: the 30 blocks' {len(linears)} Linears mapped ({params:,} weights), embedding and tied "
             f"head fp32 in every row. KL = mean per-token KL(original ‖ candidate) on the ANCHORS windows "
             f"(persuasion.txt, first {len(anchors.input_ids)} × 512 tokens). Prefill: one 512-token window, median "
             f"of {a.prefill_runs}; decode: batch 1 with KV cache after that prefill, median of {a.decode_steps} "
             "steps. Stored bytes: the block Linears only, as each format serializes them (bnb: int8 + fp32 row "
             "scales; nf4 packed + 8-bit absmax per block + fp32 per 256 blocks + codebooks).", "",
             "| variant | stored bytes | bpw | KL anchors | p99 | top-1 | ppl (ref) | prefill 512 ms | "
             "decode ms/token |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        q = (f"{r['kl_mean']:.4f} | {r['kl_p99']:.3f} | {r['top1']:.3f} | {r['ppl']:.2f} ({r['ppl_ref']:.2f})"
             if "kl_mean" in r else "— | — | — | —")
        lines.append(f"| {r['label']} | {r['stored_bytes']:,} | {r['bpw']:.3f} | {q} | {r['prefill_ms']:.0f} | "
                     f"{r['decode_ms']:.1f} |")
    nf4 = next(r for r in rows if "nf4" in r["label"])
    lines += ["", f"Save/reload: `model.config.quantization_config = hf_quantization_config(model, record); "
              f"model.save_pretrained(dir)` wrote {nf4['file_bytes']:,} bytes of safetensors; "
              "`AutoModelForCausalLM.from_pretrained(dir, device_map=\"cpu\", dtype=torch.float32)` gave logits "
              f"within {reload_diff:.2e} (max abs) of the mapped model on a 512-token window."]
    text = "\n".join(lines) + "\n"
    sys.path.insert(0, str(REPO / "benchmarks"))
    from markdown import replace_section

    replace_section(a.out or REPO / "BENCHMARKS.md", "bitsandbytes backend: SmolLM2-135M on CPU (`--backend bnb`)",
                    text)
    raw = REPO / "benchmarks" / "results" / "bnb-backend.json"
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text(json.dumps({"rows": rows}, indent=1))
    print(text)


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
