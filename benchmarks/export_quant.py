"""Quantized ONNX export of an artifact: size, exactness and decode latency of MatMulNBits vs torch fp32 eager.

    python benchmarks/export_quant.py ART_DIR [--float-onnx PATH] [--out DIR] [--tokens 32] [--reference NAME]

Exports the dequantized artifact to float ONNX (optimum, text-generation-with-past) unless given, rewrites it with
exporters.ort_quant.to_matmulnbits, and prints JSON: file sizes, max |Δlogit| vs the float graph (prefill and
decode with KV cache), and batch-1 decode ms/token (median over --tokens after warm-up) for ORT int4 at accuracy
level 0 (fp32 compute) and 4 (int8 activations), ORT float, and torch fp32 eager of the original model.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import torch  # noqa: E402

from exporters.graph import decoder_feed, max_logit_diff, session  # noqa: E402

PROMPT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
          "of a wife. However little known the feelings or views of such a man may be")


def export_float(art, out: Path) -> Path:
    """Float ONNX of the dequantized artifact (optimum)."""
    from optimum.exporters.onnx import main_export

    from exporters.ort_quant import dequantized_copy

    fl = dequantized_copy(art)
    hf = out.with_name(out.name + "_hf")
    fl.module.save_pretrained(hf)
    if fl.tokenizer is not None:
        fl.tokenizer.save_pretrained(hf)
    main_export(str(hf), str(out), task="text-generation-with-past", do_validation=False)
    return out / "model.onnx"


def ort_decode_ms(sess, ids: np.ndarray, warmup: int, tokens: int) -> float:
    """Median ms per greedy decode step (batch 1, KV cache) after `warmup` steps."""
    names = [o.name for o in sess.get_outputs()]
    outs = dict(zip(names, sess.run(None, decoder_feed(sess, ids, None, 0)), strict=True))
    past_len, times = ids.shape[1], []
    for step in range(warmup + tokens):
        nxt = outs["logits"][:, -1:].argmax(-1)
        past = {n.replace("present", "past_key_values"): v for n, v in outs.items() if n.startswith("present")}
        feed = decoder_feed(sess, nxt, past, past_len)
        t0 = time.perf_counter()
        outs = dict(zip(names, sess.run(None, feed), strict=True))
        if step >= warmup:
            times.append(time.perf_counter() - t0)
        past_len += 1
    return 1000 * statistics.median(times)


def torch_decode_ms(model, ids: np.ndarray, warmup: int, tokens: int) -> float:
    """Median ms per greedy decode step of a transformers model in fp32 eager (DynamicCache)."""
    times = []
    with torch.inference_mode():
        out = model(input_ids=torch.as_tensor(ids), use_cache=True)
        cache = out.past_key_values
        for step in range(warmup + tokens):
            nxt = out.logits[:, -1:].argmax(-1)
            t0 = time.perf_counter()
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            if step >= warmup:
                times.append(time.perf_counter() - t0)
            cache = out.past_key_values
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact")
    ap.add_argument("--float-onnx")
    ap.add_argument("--out", default="out/export_quant")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--reference", default="smollm2-135m")
    args = ap.parse_args()

    from compress.artifact_formats import load_artifact
    from compress.models import load_model
    from exporters.ort_quant import to_matmulnbits

    art_dir, out = Path(args.artifact), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    art = load_artifact(art_dir)
    src = Path(args.float_onnx) if args.float_onnx else export_float(art, out / "float")
    if src.is_dir():
        src = src / "model.onnx"
    q = out / "model_int4.onnx"
    t0 = time.perf_counter()
    rec = to_matmulnbits(src, art, q)
    rewrite_s = time.perf_counter() - t0
    ids = np.asarray([art.tokenizer(PROMPT)["input_ids"]], np.int64) if art.tokenizer else np.arange(1, 33)[None]
    diff = max_logit_diff(src, q, ids, steps=4)
    lvl4 = onnx.load(str(q))
    for n in lvl4.graph.node:
        if n.op_type == "MatMulNBits":
            n.attribute.append(onnx.helper.make_attribute("accuracy_level", 4))
    ref = load_model(args.reference).module.eval()
    result = {
        "artifact": str(art_dir), "rewrite_seconds": round(rewrite_s, 1), "bits": rec.bits,
        "shared": rec.shared, "duplicated": rec.duplicated,
        "safetensors_bytes": (art_dir / "model.safetensors").stat().st_size,
        "int4_onnx_bytes": q.stat().st_size + sum(p.stat().st_size for p in out.glob(q.name + "_data")),
        "float_onnx_bytes": src.stat().st_size + sum(p.stat().st_size for p in src.parent.glob("*.onnx_data")),
        "weight_bytes_before": rec.weight_bytes_before, "weight_bytes_after": rec.weight_bytes_after,
        "logits_vs_float_onnx": diff, "prompt_tokens": int(ids.shape[1]),
        "median_of": args.tokens, "warmup": args.warmup, "load_avg_before": os.getloadavg()[0],
    }
    timing = {}
    for threads in (1, 2):  # an oversubscribed box punishes spinning thread pools (torch most): report both
        torch.set_num_threads(threads)
        timing[f"{threads}_threads"] = {
            "ort_matmulnbits_acc0": ort_decode_ms(session(q, threads), ids, args.warmup, args.tokens),
            "ort_matmulnbits_acc4": ort_decode_ms(session(lvl4, threads), ids, args.warmup, args.tokens),
            "ort_float": ort_decode_ms(session(src, threads), ids, args.warmup, args.tokens),
            "torch_fp32_eager_original": torch_decode_ms(ref, ids, args.warmup, args.tokens),
        }
    result["decode_ms_per_token"] = timing
    result["load_avg_after"] = os.getloadavg()[0]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
