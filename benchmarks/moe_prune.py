"""Expert pruning and expert placement on the trained tiny Mixtral (tiny-austen-moe, 8 experts per layer, top-2).

One process. Calibration windows from the Austen novels except persuasion.txt; evaluation on persuasion.txt (first
16 × 256 tokens, in order). 25% of all routed experts removed under each schedule with usefulness importance (routed
mass × mean output norm), against random drops (uniform schedule, mean of 3 seeds) and ΔKL importance; merging the
dropped experts (frequency-weighted, output similarity, channels aligned or not) against dropping them. Every row:
KL(original ‖ pruned) mean per token and top-1 agreement. Placement: routed token loads per expert measured on the
held-out windows, 4 devices, balanced (ours) vs round-robin, with 0 and 2 replicas per layer. JSON to
benchmarks/results/.

    python benchmarks/moe_prune.py [--model ~/.cache/compress/models/tiny-austen-moe] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
AUSTEN = REPO.parent / "shared" / "data" / "text" / "austen"
CALIB = ",".join(str(p) for p in sorted(AUSTEN.glob("*.txt")) if p.name != "persuasion.txt")
DEFAULT_MODEL = Path("~/.cache/compress/models/tiny-austen-moe").expanduser()


@torch.inference_mode()
def compare(ref_logits: list[torch.Tensor], cand, windows) -> dict[str, float]:
    """KL(ref ‖ cand) mean per token and top-1 agreement over the evaluation windows."""
    from evals.metrics import kl_per_token, log_softmax_chunked, top1_agreement

    kl, top1 = [], []
    for ids, ref in zip(windows.input_ids, ref_logits, strict=True):
        logits = cand(input_ids=ids.unsqueeze(0), use_cache=False).logits[0]
        kl.append(kl_per_token(log_softmax_chunked(ref), logits))
        top1.append(top1_agreement(ref, logits))
    return {"kl_mean": float(torch.cat(kl).mean()), "top1": float(torch.cat(top1).mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--percent", type=float, default=25.0)
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="JSON (default benchmarks/results/moe-prune-NAME.json)")
    a = ap.parse_args()

    from compress.data import load_windows
    from compress.models import load_model
    from compress.moe.layout import moe_layers
    from compress.moe.place import place_experts, round_robin
    from compress.moe.prune import expert_stats, prune_moe

    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    ref = load_model(a.model)
    calib = load_windows(CALIB, ref, split="calibration", tokens=a.calib_tokens, seq_len=a.seq_len)
    held = load_windows(str(AUSTEN / "persuasion.txt"), ref, split="all", tokens=a.eval_windows * a.seq_len,
                        seq_len=a.seq_len, sequential=True)
    with torch.inference_mode():
        ref_logits = [ref.module(input_ids=ids.unsqueeze(0), use_cache=False).logits[0] for ids in held.input_ids]
    layers = moe_layers(ref.module)
    state: dict = {"model": a.model, "percent": a.percent, "layers": len(layers),
                   "experts": [ly.num_experts for ly in layers], "top_k": layers[0].top_k,
                   "calibration": calib.describe(), "evaluation": held.describe(), "rows": [],
                   "machine": f"{platform.machine()}, torch {torch.__version__}, {a.threads} threads"}

    def run(label: str, **kw) -> dict:
        t = time.perf_counter()
        cand = copy.deepcopy(ref.module)
        plan, _ = prune_moe(cand, calib, a.percent, **kw)
        row = {"label": label, **kw, **compare(ref_logits, cand, held), "kept": plan.experts_per_layer,
               "removed": plan.removed, "seconds": round(time.perf_counter() - t, 1)}
        if plan.costs is not None:
            row["costs"] = plan.costs
        print(json.dumps({k: v for k, v in row.items() if k != "costs"}), flush=True)
        state["rows"].append(row)
        return row

    for schedule in ("uniform", "descending", "ascending", "pyramid", "adaptive"):
        run(f"drop {schedule}", schedule=schedule)
    randoms = [run(f"random drop seed {s}", schedule="uniform", importance="random", seed=s) for s in range(3)]
    state["random_mean"] = {k: sum(r[k] for r in randoms) / len(randoms) for k in ("kl_mean", "top1")}
    run("drop uniform, kl importance", schedule="uniform", importance="kl")
    run("merge uniform", schedule="uniform", merge=True)
    run("merge adaptive", schedule="adaptive", merge=True)
    run("merge uniform, channels not aligned", schedule="uniform", merge=True, align=False)
    run("merge adaptive, channels not aligned", schedule="adaptive", merge=True, align=False)

    stats = expert_stats(ref.module, held)
    loads = [stats[ly.index].counts.tolist() for ly in layers]
    placement = {"loads": loads, "devices": a.devices}
    placement["round_robin"] = round_robin(loads, a.devices).summary()
    for r in (0, 2):
        placement[f"balanced_r{r}"] = place_experts(loads, a.devices, replicas=r).summary()
    placement["per_layer"] = {
        "round_robin": [ly.imbalance for ly in round_robin(loads, a.devices).layers],
        **{f"balanced_r{r}": [ly.imbalance for ly in place_experts(loads, a.devices, replicas=r).layers]
           for r in (0, 2)}}
    state["placement"] = placement
    print(json.dumps({k: v for k, v in placement.items() if k not in ("loads",)}), flush=True)
    state["seconds"] = round(time.perf_counter() - t0, 1)
    out = a.out or REPO / "benchmarks" / "results" / f"moe-prune-{Path(a.model).name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(state, indent=1) + "\n")
    print(f"wrote {out} ({state['seconds']} s)")


if __name__ == "__main__":
    main()
