"""Reparameterization figures (issue 6), written to BENCHMARKS.md: MobileNetV2 BN folding on real photos, a
RepVGG-style network merged, SmolLM2 norm folding that still quantizes and exports. One run, one process.

    python benchmarks/reparam.py

Photos: scikit-image's sample photos, read straight from its wheel (`pip download --no-deps scikit-image`, not
installed), each with 8 augmentations (flips, crops, brightness, rotation); ImageNet preprocessing.
"""

from __future__ import annotations

import argparse
import copy
import io
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
HEADING = "Reparameterization (issue 6)"
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "motorcycle_left.png", "rocket.jpg", "horse.png",
          "hubble_deep_field.jpg", "camera.png")
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def photos(work: Path) -> tuple[torch.Tensor, list[str]]:
    """[n, 3, 224, 224] ImageNet-normalised tensors: every photo × 8 augmentations."""
    from PIL import Image, ImageEnhance, ImageOps

    wheel_dir = work / "skimage"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    if not list(wheel_dir.glob("scikit_image-*.whl")):
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "scikit-image==0.26.0", "-d",
                        str(wheel_dir)], check=True)
    wheel = next(wheel_dir.glob("scikit_image-*.whl"))
    out, names = [], []
    with zipfile.ZipFile(wheel) as z:
        for name in PHOTOS:
            img = Image.open(io.BytesIO(z.read(f"skimage/data/{name}"))).convert("RGB")
            w, h = img.size
            augs = {"plain": img, "mirror": ImageOps.mirror(img), "crop-center": img.crop((w // 8, h // 8,
                                                                                          w - w // 8, h - h // 8)),
                    "crop-left": img.crop((0, 0, 3 * w // 4, 3 * h // 4)),
                    "bright": ImageEnhance.Brightness(img).enhance(1.3),
                    "dark": ImageEnhance.Brightness(img).enhance(0.7),
                    "contrast": ImageEnhance.Contrast(img).enhance(1.4), "rotate": img.rotate(12)}
            for aug, im in augs.items():
                out.append(_preprocess(im))
                names.append(f"{name}:{aug}")
    return torch.stack(out), names


def _preprocess(img) -> torch.Tensor:
    w, h = img.size
    s = 256 / min(w, h)
    img = img.resize((max(224, round(w * s)), max(224, round(h * s))))
    w, h = img.size
    left, top = (w - 224) // 2, (h - 224) // 2
    a = np.asarray(img.crop((left, top, left + 224, top + 224)), dtype=np.float64) / 255.0
    return torch.from_numpy(((a - MEAN) / STD).transpose(2, 0, 1).astype(np.float32))


def latency_ms(module: torch.nn.Module, x: torch.Tensor, repeats: int = 20) -> float:
    """Median ms of one forward of `x`, after 3 warm-up calls."""
    times = []
    with torch.inference_mode():
        for i in range(repeats + 3):
            t0 = time.perf_counter()
            module(x)
            if i >= 3:
                times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=None)
    a = ap.parse_args()
    torch.set_num_threads(2)
    work = a.work or Path(tempfile.mkdtemp(prefix="compress-reparam-bench-"))
    from compress.models import load_model
    from compress.reparam.repvgg import TinyRepVGG
    from flows.export import ExportRequest, run_export
    from flows.reparam import run_reparam

    lines = [f"Written by `python benchmarks/reparam.py` on {time.strftime('%Y-%m-%d')} ({platform.machine()}, "
             f"torch {torch.__version__}, 2 threads). Latency: median of 20 forwards after 3 warm-up, before and "
             "after in the same process."]

    # 1. MobileNetV2, real ImageNet weights
    x, names = photos(work)
    mnv2 = load_model("mobilenet-v2")
    folded_dir = work / "mnv2-folded"
    res = run_reparam(copy.deepcopy(mnv2), ["fold-bn"], folded_dir)
    folded = load_model(str(folded_dir))
    with torch.inference_mode():
        a_out, b_out = mnv2.module(x), folded.module(x)
    diff = float((a_out - b_out).abs().max())
    agree = float((a_out.argmax(-1) == b_out.argmax(-1)).float().mean())
    one = x[:1]
    lat = (latency_ms(mnv2.module, one), latency_ms(folded.module, one), latency_ms(mnv2.module, x[:16]),
           latency_ms(folded.module, x[:16]))
    exp = run_export(ExportRequest(model=str(folded_dir), out=work / "mnv2-folded-onnx"))
    checks = next(iter(exp["validation"].values()))["checks"]
    plain = [names[i].split(":")[0] for i in range(0, len(names), 8)]
    predicted = ", ".join(f"{n} → {c}" for n, c in zip(plain, a_out.argmax(-1)[::8].tolist(), strict=True))
    lines += ["", f"**MobileNetV2** (zoo `mobilenet-v2`, real ImageNet weights): `compress reparam mobilenet-v2 "
              f"--fold-bn --out DIR` folded {res['changes']} BatchNorms ({res['modules_before']['batchnorm']} "
              f"before, {res['modules_after']['batchnorm']} after; params {res['params_before']:,} → "
              f"{res['params_after']:,}) in {res['records'][0]['seconds']:.2f} s. On {len(names)} real photos "
              f"({len(PHOTOS)} scikit-image sample photos × 8 augmentations): max |Δlogit| {diff:.2e} "
              f"(max |logit| {float(a_out.abs().max()):.1f}), top-1 agreement {agree:.4f}. Predicted classes of the "
              f"plain photos (ImageNet class index): {predicted}.",
              "", "| MobileNetV2 | unfolded | folded | ratio |", "|---|---|---|---|",
              f"| batch 1, ms | {lat[0]:.1f} | {lat[1]:.1f} | {lat[0] / lat[1]:.2f}× |",
              f"| batch 16, ms | {lat[2]:.1f} | {lat[3]:.1f} | {lat[2] / lat[3]:.2f}× |", "",
              f"Folded model exported to ONNX (`compress export DIR --onnx OUT`, dynamo exporter) in "
              f"{exp['export_seconds']} s and validated in ONNX Runtime: {'passed' if exp['passed'] else 'FAILED'} "
              f"(logits max |Δ| {checks[0]['max_abs']:.2e}, tolerance {checks[0]['atol']:.2e})."]

    # 2. RepVGG-style network with non-trivial BN statistics
    torch.manual_seed(0)
    net = TinyRepVGG(num_classes=10, widths=(32, 64, 128), depths=(2, 4, 4)).eval()
    g = torch.Generator().manual_seed(1)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 2 + 0.1)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    img = torch.randn(8, 3, 64, 64, generator=g)
    before = copy.deepcopy(net)
    rv = run_reparam(net, ["fold-bn", "merge-branches"], sample_inputs=img)
    with torch.inference_mode():
        ra, rb = before(img), net(img)
    rl = (latency_ms(before, img), latency_ms(net, img))
    lines += ["", "**TinyRepVGG** (defined in compress/reparam/repvgg.py; widths 32/64/128, 10 blocks; BN running "
              "statistics and affine parameters randomised): `fold-bn` then `merge-branches` — "
              + ", ".join(f"{r['pass']} {r['count']} changes" for r in rv["records"])
              + f"; convs {rv['modules_before']['conv']} → {rv['modules_after']['conv']}, BatchNorms "
              f"{rv['modules_before']['batchnorm']} → {rv['modules_after']['batchnorm']}; max |Δ| "
              f"{float((ra - rb).abs().max()):.2e} (max |out| {float(ra.abs().max()):.2f}). Latency, batch 8 × "
              f"64²: {rl[0]:.1f} → {rl[1]:.1f} ms (**{rl[0] / rl[1]:.2f}×** faster)."]

    # 3. SmolLM2 --fold-norm: exact, then quantized and exported
    from flows.quantize import QuantizeRequest, run_quantize

    norm_dir = work / "smollm2-normfold"
    nf = run_reparam("smollm2-135m", ["fold-norm"], norm_dir)
    q = run_quantize(QuantizeRequest(model=str(norm_dir), bits=4, data=str(REPO.parent / "shared" / "data" / "text"
                                                                          / "austen" / "persuasion.txt"),
                                     tokens=512, eval_tokens=1024, out=work / "smollm2-normfold-q4"))
    qb = run_quantize(QuantizeRequest(model="smollm2-135m", bits=4, data=str(REPO.parent / "shared" / "data"
                                                                           / "text" / "austen" / "persuasion.txt"),
                                      tokens=512, eval_tokens=1024))
    ex = run_export(ExportRequest(model=str(norm_dir), out=work / "smollm2-normfold-onnx"))
    rec = nf["records"][0]
    lines += ["", f"**SmolLM2-135M `--fold-norm`**: {rec['count']} norms folded into the following Linears, "
              f"max |Δlogit| / max |logit| {nf['equivalence']['rel_diff']:.2e} ("
              + "; ".join(rec["notes"][:2]) + f"). The folded model quantizes (`--bits 4`, q4g32s RTN of the "
              f"blocks): KL {q['metrics']['kl_mean']:.4f} vs {qb['metrics']['kl_mean']:.4f} for the unfolded "
              "model, same windows (folding γ into the weights changes what each group's scale sees); it exports "
              f"to ONNX and validates ({'passed' if ex['passed'] else 'FAILED'}, export {ex['export_seconds']} s)."]
    # 4. MiniLM --linearize-ffn at 10/25/50%: embedding cosine and encoder latency, one run
    from compress.data import load_split
    from compress.evaluate import evaluate
    from compress.models import layer_map
    from compress.reparam import linearize_ffn

    austen = REPO.parent / "shared" / "data" / "text" / "austen"
    calib_spec = ",".join(str(p) for p in sorted(austen.glob("*.txt")) if p.name != "persuasion.txt")
    mini = load_model("minilm-l6")
    calib, _ = load_split(calib_spec, mini, 2048, 256)
    from compress.data import load_windows

    held = load_windows(str(austen / "persuasion.txt"), mini, split="all", tokens=4096, seq_len=256, sequential=True)
    batch = held.input_ids[:8], held.attention_mask[:8]

    def enc_ms(module) -> float:
        times = []
        with torch.inference_mode():
            for i in range(13):
                t0 = time.perf_counter()
                module(input_ids=batch[0], attention_mask=batch[1])
                if i >= 3:
                    times.append(time.perf_counter() - t0)
        return 1000 * statistics.median(times)

    base_ms = enc_ms(mini.module)
    lines += ["", "**MiniLM-L6 `--linearize-ffn`** (RePaViT, post-training, no retraining): channels ranked by the "
              "residual of a least-squares line through GELU on 2,048 calibration tokens (Austen except "
              "persuasion.txt) × ‖W2 column‖²; embedding cosine to the original on persuasion.txt "
              f"({held.num_tokens} tokens in {len(held.input_ids)} windows of 256); latency = one batch of 8 × 256 "
              "tokens, median of 10, same process.", "",
              "| share linearized | params | embedding cosine | encoder ms | × original |", "|---|---|---|---|---|",
              f"| 0% | {sum(p.numel() for p in mini.module.parameters()):,} | 1 | {base_ms:.0f} | 1.00× |"]
    for share in (0.10, 0.25, 0.50):
        cand = copy.deepcopy(mini)
        linearize_ffn.apply(cand.module, layer_map(cand.module), calib, share)
        cos = evaluate(cand, mini, held).emb_cosine
        ms = enc_ms(cand.module)
        lines.append(f"| {share:.0%} | {sum(p.numel() for p in cand.module.parameters()):,} | {cos:.4f} | {ms:.0f} | "
                     f"{base_ms / ms:.2f}× |")
    lines += ["", "The linearized model is measured in memory (no loader yet). LoRA merging (`--merge-lora`) is "
              "tested on tiny models with PEFT-layout adapters; no real adapter ships offline."]
    sys.path.insert(0, str(REPO / "benchmarks"))
    from markdown import replace_section

    replace_section(REPO / "BENCHMARKS.md", HEADING, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
