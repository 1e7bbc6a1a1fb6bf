"""The seed paper's curve (issue 3): KL vs the fraction of blocks moved from a higher to a lower bit width,
moving the least important blocks first by LIM, by ZD, by the DP's own measure (per-block ΔKL at the lower
width on calibration windows), and in random order (5 seeds). Blocks' Linears only (embedding / head float),
RTN group 32 symmetric; KL on the ANCHORS.md protocol (persuasion.txt, 6 × 512 tokens).

    python benchmarks/seed_curve.py --model smollm2-135m --high 4 --low 3
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
AUSTEN = REPO.parent / "shared" / "data" / "text" / "austen"
CALIB = ",".join(str(p) for p in sorted(AUSTEN.glob("*.txt")) if p.name != "persuasion.txt")
SEEDS = 5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--high", type=int, default=4)
    ap.add_argument("--low", type=int, default=3)
    ap.add_argument("--points", type=int, default=7, help="Fractions evaluated, 0 to 1 inclusive.")
    ap.add_argument("--calib-tokens", type=int, default=1024)
    a = ap.parse_args()

    from compress.data import load_windows
    from compress.importance import score_model
    from compress.importance.context import ScoringContext
    from compress.models import layer_map, load_model
    from compress.quantize.apply import weight_matrix
    from compress.quantize.distortion import measure_kl
    from compress.quantize.pipeline import units_for
    from compress.quantize.rtn import quantize_rtn
    from compress.quantize.spec import QuantSpec

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    loaded = load_model(a.model)
    model, lmap = loaded.module, layer_map(loaded.module)
    hi, lo = QuantSpec(a.high, 32, True), QuantSpec(a.low, 32, True)
    calib = load_windows(CALIB, loaded, split="calibration", tokens=a.calib_tokens)
    anchors = load_windows(str(AUSTEN / "persuasion.txt"), loaded, split="all", tokens=3072, seq_len=512,
                           sequential=True)
    scores = score_model(loaded, calib, ["lim", "zd"], lmap)
    units = units_for(model, lmap, "block", embeddings=False)
    measured = measure_kl(ScoringContext(loaded, lmap, calib), units, [lo])
    n = len(lmap.blocks)
    orders = {
        "lim": scores.ranking("lim")[::-1],  # least important first
        "zd": scores.ranking("zd")[::-1],
        "dp measure": [u.block for u, _ in sorted(zip(units, measured.distortion, strict=True), key=lambda t: t[1][0])],
    }
    for s in range(SEEDS):
        order = list(range(n))
        random.Random(s).shuffle(order)
        orders[f"random {s}"] = order

    ctx = ScoringContext(loaded, lmap, anchors)
    _ = ctx.reference_probs  # reference before any weight changes
    names = {b.index: list(b.linears) for b in lmap.blocks}
    original = {p: weight_matrix(model.get_submodule(p)).detach().clone() for ps in names.values() for p in ps}
    q = {spec.bits: {p: quantize_rtn(w, spec).dequantize() for p, w in original.items()} for spec in (hi, lo)}
    ks = sorted({round(i * n / (a.points - 1)) for i in range(a.points)})

    @torch.inference_mode()
    def kl_with(low_blocks: set[int]) -> float:
        for b, ps in names.items():
            for p in ps:
                weight_matrix(model.get_submodule(p)).copy_(q[lo.bits if b in low_blocks else hi.bits][p])
        vals = [ctx.divergence(i, ctx.runner.run_from(batch, 0, batch.inputs[0]))
                for i, batch in enumerate(ctx.runner.batches)]
        return float(torch.cat(vals).mean())

    curves: dict[str, list[float]] = {}
    ends = {0: kl_with(set()), n: kl_with(set(range(n)))}
    for label, order in orders.items():
        curves[label] = [ends[k] if k in ends else kl_with(set(order[:k])) for k in ks]
        print(label, [round(v, 4) for v in curves[label]], flush=True)
    rand = torch.tensor([curves[f"random {s}"] for s in range(SEEDS)])
    curves["random mean"] = rand.mean(0).tolist()
    seconds = time.perf_counter() - t0

    name = Path(a.model).name if Path(a.model).exists() else a.model
    png = REPO / "benchmarks" / "results" / f"seed_curve-{name}-{a.high}to{a.low}.png"
    _plot(png, ks, n, curves, rand, f"{name}: blocks moved {hi.label()} → {lo.label()}")
    frac = [k / n for k in ks]
    lines = [f"Written by `python benchmarks/seed_curve.py --model {a.model} --high {a.high} --low {a.low}` on "
             f"{time.strftime('%Y-%m-%d')} ({platform.processor() or platform.machine()}, torch {torch.__version__}, "
             f"2 threads, {seconds:.0f} s). Blocks' Linears RTN {hi.label()}, the least important first moved to "
             f"{lo.label()}; embedding / head float. Orders from {calib.num_tokens} calibration tokens (Austen except "
             "persuasion.txt); KL = mean per-token KL(original ‖ quantized) on the ANCHORS.md windows. Plot: "
             f"`benchmarks/results/{png.name}` (not in git; rerun to make it).", "",
             "| order | " + " | ".join(f"{f:.2f}" for f in frac) + " | area |",
             "|---|" + "---|" * (len(ks) + 1)]
    for label in ["lim", "zd", "dp measure", "random mean"] + [f"random {s}" for s in range(SEEDS)]:
        c = curves[label]
        area = sum((c[i] + c[i + 1]) / 2 * (frac[i + 1] - frac[i]) for i in range(len(c) - 1))
        lines.append(f"| {label} | " + " | ".join(f"{v:.4f}" for v in c) + f" | {area:.4f} |")
    text = "\n".join(lines) + "\n"
    sys.path.insert(0, str(REPO / "benchmarks"))
    from markdown import replace_section

    replace_section(REPO / "BENCHMARKS.md", f"Seed-paper curve: {name}, {a.high} → {a.low} bits (issue 3)", text)
    (png.with_suffix(".json")).write_text(json.dumps({"ks": ks, "n": n, "curves": curves, "orders": orders}, indent=1))
    print(text)


def _plot(path: Path, ks: list[int], n: int, curves: dict, rand: torch.Tensor, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    x = [k / n for k in ks]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    ax.fill_between(x, rand.min(0).values, rand.max(0).values, color="0.85", label="random (5 seeds, range)")
    ax.plot(x, curves["random mean"], color="0.4", ls="--", label="random (mean)")
    for label, color in (("lim", "tab:blue"), ("zd", "tab:orange"), ("dp measure", "tab:green")):
        ax.plot(x, curves[label], marker="o", color=color, label=label)
    ax.set_xlabel("fraction of blocks moved to the lower width")
    ax.set_ylabel("KL(original ‖ quantized), anchors")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
