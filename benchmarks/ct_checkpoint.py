"""compressed-tensors checkpoint of a real layer-wise artifact (issue 3), written to BENCHMARKS.md: does plain
transformers `from_pretrained` load it, and does it give the artifact's logits?

    python benchmarks/ct_checkpoint.py ART_DIR

ART_DIR is any `compress quantize --out` directory (e.g. the `--target ort` 4.5 bpw SmolLM2 artifact that
benchmarks/export.py writes). Compares fp32 logits on the ANCHORS.md windows (persuasion.txt, first 6 × 512).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
AUSTEN = REPO.parent / "shared" / "data" / "text" / "austen"
HEADING = "compressed-tensors checkpoint of a layer-wise artifact (issue 3)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--work", type=Path, default=None)
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM

    from compress.artifact_formats import load_artifact
    from compress.data import load_windows
    from compress.metrics import kl_per_token, log_softmax_chunked, top1_agreement
    from compress.quantize.compressed_tensors import write_compressed_tensors

    torch.set_num_threads(2)
    work = a.work or Path(tempfile.mkdtemp(prefix="compress-ct-bench-"))
    art = load_artifact(a.artifact)
    t0 = time.perf_counter()
    out = work / "ct"
    record = write_compressed_tensors(art, out)
    write_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    windows = load_windows(str(AUSTEN / "persuasion.txt"), art, split="all", tokens=3072, seq_len=512,
                           sequential=True)
    max_abs, ref_max, kls, top1 = 0.0, 0.0, [], []
    with torch.inference_mode():
        for ids in windows.input_ids:
            ids = ids.unsqueeze(0)
            ours = art.module(input_ids=ids).logits
            theirs = hf(input_ids=ids).logits
            max_abs = max(max_abs, float((ours - theirs).abs().max()))
            ref_max = max(ref_max, float(ours.abs().max()))
            kls.append(kl_per_token(log_softmax_chunked(ours), theirs).reshape(-1))
            top1.append(top1_agreement(ours, theirs).reshape(-1))
    kl = float(torch.cat(kls).mean())
    agree = float(torch.cat(top1).mean())
    manifest = art.extra["manifest"]
    lines = [f"Written by `python benchmarks/ct_checkpoint.py {a.artifact}` on {time.strftime('%Y-%m-%d')} "
             f"(compressed-tensors {record['compressed_tensors']}, torch {torch.__version__}). Artifact: "
             f"{manifest.get('base')} at {manifest.get('metrics', {}).get('bpw', '?')} bpw; converted with "
             f"`compress convert {a.artifact} --compressed-tensors OUT` (default portable containers, quantized "
             "embedding) and loaded with `AutoModelForCausalLM.from_pretrained(OUT, dtype=torch.float32)`; logits "
             f"compared on the ANCHORS.md windows ({windows.num_tokens} tokens).", "",
             "| write s | load s | safetensors bytes | containers | max abs Δlogit (max abs logit) | KL(ours ‖ "
             "transformers) | top-1 agreement |", "|---|---|---|---|---|---|---|",
             f"| {write_s:.1f} | {load_s:.1f} | {record['file_bytes']:,} | "
             + ", ".join(f"{k}: {v}" for k, v in record["containers"].items())
             + f" | {max_abs:.2e} ({ref_max:.1f}) | {kl:.2e} | {agree:.4f} |", ""]
    lines += [f"- {n}" for n in record["notes"]]
    sys.path.insert(0, str(REPO / "benchmarks"))
    from markdown import replace_section

    replace_section(REPO / "BENCHMARKS.md", HEADING, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
