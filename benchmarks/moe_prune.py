"""Expert pruning and expert placement on the trained tiny Mixtral (tiny-austen-moe, 8 experts per layer, top-2).

One process. Calibration windows from the Austen novels except persuasion.txt; evaluation on persuasion.txt (first
16 × 256 tokens, in order). 25% of all routed experts removed under each schedule with usefulness importance (routed
mass × mean output norm), against random drops (uniform schedule, mean of 3 seeds) and ΔKL importance; merging the
dropped experts (frequency-weighted, output similarity, channels aligned or not) against dropping them. Every row:
KL(original ‖ pruned) mean per token and top-1 agreement. Placement: routed token loads per expert measured on the
held-out windows, 4 devices, balanced (ours) vs round-robin, with 0 and 2 replicas per layer. JSON to
benchmarks/results/.

    python benchmarks/moe_prune.py [--model ~/.cache/compress/models/tiny-austen-moe] [--threads 1]

The measurements are functions (`reference_logits`, `prune_rows`, `placement`) that benchmarks/moe.py reuses on its
own windows.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
AUSTEN = REPO.parent / "shared" / "data" / "text" / "austen"
CALIB = ",".join(str(p) for p in sorted(AUSTEN.glob("*.txt")) if p.name != "persuasion.txt")
DEFAULT_MODEL = Path("~/.cache/compress/models/tiny-austen-moe").expanduser()
SCHEDULES = ("uniform", "descending", "ascending", "pyramid", "adaptive")
RANDOM_SEEDS = (0, 1, 2)
# (label, prune_moe keyword arguments) after the schedules and the random drops
VARIANTS = (("drop uniform, kl importance", {"schedule": "uniform", "importance": "kl"}),
            ("merge uniform", {"schedule": "uniform", "merge": True}),
            ("merge adaptive", {"schedule": "adaptive", "merge": True}),
            ("merge uniform, channels not aligned", {"schedule": "uniform", "merge": True, "align": False}),
            ("merge adaptive, channels not aligned", {"schedule": "adaptive", "merge": True, "align": False}))


@torch.inference_mode()
def reference_logits(module, windows) -> list[torch.Tensor]:
    """The original model's logits [seq, vocab] on every evaluation window."""
    return [module(input_ids=ids.unsqueeze(0), use_cache=False).logits[0] for ids in windows.input_ids]


@torch.inference_mode()
def compare(ref_logits: list[torch.Tensor], cand, windows) -> dict[str, float]:
    """KL(ref ‖ cand) mean per token and top-1 agreement over the evaluation windows."""
    from compress.metrics import kl_per_token, log_softmax_chunked, top1_agreement

    kl, top1 = [], []
    for ids, ref in zip(windows.input_ids, ref_logits, strict=True):
        logits = cand(input_ids=ids.unsqueeze(0), use_cache=False).logits[0]
        kl.append(kl_per_token(log_softmax_chunked(ref), logits))
        top1.append(top1_agreement(ref, logits))
    return {"kl_mean": float(torch.cat(kl).mean()), "top1": float(torch.cat(top1).mean())}


def prune_one(module, calib, held, ref_logits: list[torch.Tensor], percent: float, label: str,
              **kw: Any) -> dict[str, Any]:
    """Prune a copy of `module` by `percent`% of its routed experts (prune_moe keywords `kw`), compared on `held`."""
    from compress.moe.prune import prune_moe

    t = time.perf_counter()
    cand = copy.deepcopy(module)
    plan, _ = prune_moe(cand, calib, percent, **kw)
    row = {"label": label, **kw, **compare(ref_logits, cand, held), "kept": plan.experts_per_layer,
           "removed": plan.removed, "seconds": round(time.perf_counter() - t, 1)}
    if plan.costs is not None:
        row["costs"] = plan.costs
    return row


def prune_rows(module, calib, held, ref_logits: list[torch.Tensor], percent: float = 25.0,
               log: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Every schedule (usefulness, drop), random drops (uniform, seeds 0-2), ΔKL importance and merging: rows plus
    the mean of the random drops."""
    rows: list[dict[str, Any]] = []

    def run(label: str, **kw: Any) -> dict[str, Any]:
        row = prune_one(module, calib, held, ref_logits, percent, label, **kw)
        if log is not None:
            log({k: v for k, v in row.items() if k != "costs"})
        rows.append(row)
        return row

    for schedule in SCHEDULES:
        run(f"drop {schedule}", schedule=schedule)
    randoms = [run(f"random drop seed {s}", schedule="uniform", importance="random", seed=s) for s in RANDOM_SEEDS]
    for label, kw in VARIANTS:
        run(label, **kw)
    random_mean = {k: sum(r[k] for r in randoms) / len(randoms) for k in ("kl_mean", "top1")}
    return {"rows": rows, "random_mean": random_mean}


def placement(loads: list[list[float]], devices: int, replicas: tuple[int, ...] = (0, 2)) -> dict[str, Any]:
    """Balanced (ours, each replica count) vs round-robin device placement of the per-layer expert `loads`."""
    from compress.moe.place import place_experts, round_robin

    rr = round_robin(loads, devices)
    ours = {r: place_experts(loads, devices, replicas=r) for r in replicas}
    out: dict[str, Any] = {"loads": loads, "devices": devices, "round_robin": rr.summary()}
    for r, p in ours.items():
        out[f"balanced_r{r}"] = p.summary()
    out["per_layer"] = {"round_robin": [ly.imbalance for ly in rr.layers],
                        **{f"balanced_r{r}": [ly.imbalance for ly in p.layers] for r, p in ours.items()}}
    return out


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
    from compress.moe.prune import expert_stats

    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    ref = load_model(a.model)
    calib = load_windows(CALIB, ref, split="calibration", tokens=a.calib_tokens, seq_len=a.seq_len)
    held = load_windows(str(AUSTEN / "persuasion.txt"), ref, split="all", tokens=a.eval_windows * a.seq_len,
                        seq_len=a.seq_len, sequential=True)
    ref_logits = reference_logits(ref.module, held)
    layers = moe_layers(ref.module)
    state: dict = {"model": a.model, "percent": a.percent, "layers": len(layers),
                   "experts": [ly.num_experts for ly in layers], "top_k": layers[0].top_k,
                   "calibration": calib.describe(), "evaluation": held.describe(),
                   "machine": f"{platform.machine()}, torch {torch.__version__}, {a.threads} threads"}
    state.update(prune_rows(ref.module, calib, held, ref_logits, a.percent,
                            log=lambda row: print(json.dumps(row), flush=True)))

    stats = expert_stats(ref.module, held)
    loads = [stats[ly.index].counts.tolist() for ly in layers]
    state["placement"] = placement(loads, a.devices)
    print(json.dumps({k: v for k, v in state["placement"].items() if k not in ("loads",)}), flush=True)
    state["seconds"] = round(time.perf_counter() - t0, 1)
    out = a.out or REPO / "benchmarks" / "results" / f"moe-prune-{Path(a.model).name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(state, indent=1) + "\n")
    print(f"wrote {out} ({state['seconds']} s)")


if __name__ == "__main__":
    main()
