"""Layer-wise quantization figures (issue 3), written to benchmarks/results/quantize-<model>.md and printed.

One run measures the distortion table once (RTN, every unit × candidate, on calibration windows from the Austen
novels except persuasion.txt), then builds and evaluates, on the same evaluation windows:
uniform RTN baselines, layer-wise DP plans, and the seed's rank allocation by LIM and by ZD, at 3.5 and 4.5
effective bpw and (for SmolLM2) at the ≤105 MB size of llama.cpp's Q4_K_M; then RTN vs HQQ vs GPTQ at 4 bits.

    python benchmarks/quantize_layerwise.py --model smollm2-135m
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
AUSTEN = REPO.parent / "shared" / "data" / "text" / "austen"
CALIB = ",".join(str(p) for p in sorted(AUSTEN.glob("*.txt")) if p.name != "persuasion.txt")
MENU = "8g64,6g64,6g32,5g64,5g32,4g64,4g32,3g64,3g32,2g32"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib-tokens", type=int, default=1024)
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--max-size", type=int, default=105_000_000)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()

    from compress.data import load_windows
    from compress.evaluate import evaluate
    from compress.importance import score_model
    from compress.importance.context import ScoringContext
    from compress.models import layer_map, load_model
    from compress.plan import Plan
    from compress.quantize.allocate import allocate_by_rank, solve_dp  # noqa: I001
    from compress.quantize.apply import quantizable
    from compress.quantize.distortion import error_energy, measure_kl
    from compress.quantize.pipeline import Budget, _rank_order, quantize, units_for
    from compress.quantize.spec import QuantSpec
    from flows.quantize import parse_candidates

    torch.set_num_threads(2)
    ref = load_model(a.model)
    lmap = layer_map(ref.module)
    calib = load_windows(CALIB, ref, split="calibration", tokens=a.calib_tokens)
    heldout = load_windows(CALIB, ref, split="evaluation", tokens=a.eval_tokens)
    anchors = load_windows(str(AUSTEN / "persuasion.txt"), ref, split="all", tokens=3072, seq_len=512,
                           sequential=True)
    cands = parse_candidates(MENU)
    units = units_for(ref.module, lmap, "block", embeddings=True)
    t0 = time.perf_counter()
    table = measure_kl(ScoringContext(ref, lmap, calib), units, cands)
    t_measure = time.perf_counter() - t0
    scores = score_model(ref, calib, ["lim", "zd"], lmap)
    rows: list[dict] = []

    def run(label: str, plan: Plan, windows_sets=(("anchors", anchors), ("heldout", heldout)), calib_w=None) -> dict:
        cand = load_model(a.model)
        clmap = layer_map(cand.module)
        t = time.perf_counter()
        quantize(cand, clmap, plan, calib_w)
        secs = time.perf_counter() - t
        row = {"label": label, "quantize_s": round(secs, 1)}
        for name, w in windows_sets:
            r = evaluate(cand, ref, w)
            row[name] = {"kl_mean": r.kl_mean, "kl_p99": r.kl_p99, "top1": r.top1_agreement, "ppl": r.ppl,
                         "ppl_ref": r.ppl_ref}
            row["size_bytes"], row["bpw"] = r.size_bytes, r.bpw
        print(json.dumps(row), flush=True)
        rows.append(row)
        return row

    def plan_from(picks, label) -> Plan:
        rules = {m: cands[c].to_dict() for u, c in zip(units, picks, strict=True) for m in u.modules}
        return Plan(rules, {"label": label})

    names = quantizable(ref.module, lmap)
    budgets = [(f"{b} bpw", Budget.from_args(ref.module, b, None).for_units(ref.module, lmap, units))
               for b in (4.5, 3.5)]
    if a.max_size:
        budgets.insert(0, (f"{a.max_size / 1e6:.0f} MB",
                           Budget.from_args(ref.module, None, a.max_size).for_units(ref.module, lmap, units)))
    energy = [[error_energy(ref.module, u, c) for c in cands] for u in units]
    g64 = [i for i, c in enumerate(cands) if c.group_size == 64]
    for label, budget in budgets:
        room = budget.room
        picks = solve_dp(table.distortion, table.sizes, room)
        dp_plan = plan_from(picks, "dp")
        run(f"{label} layerwise dp, RTN", dp_plan)
        # --measure fast: only the candidate at/below the budget is measured; the rest scaled by error energy.
        a_idx = max((i for i in range(len(cands)) if cands[i].bits_per_weight(4096) <= budget.avg_bits),
                    key=lambda i: cands[i].bits_per_weight(4096))
        fast = [[row[a_idx] * energy[u][c] / energy[u][a_idx] for c in range(len(cands))]
                for u, row in enumerate(table.distortion)]
        run(f"{label} layerwise dp, RTN, --measure fast (at {cands[a_idx].label()})",
            plan_from(solve_dp(fast, table.sizes, room), "dp-fast"))
        gptq_rules = {m: {**act, "method": "gptq"} for m, act in dp_plan.rules.items()}
        run(f"{label} layerwise dp, GPTQ", Plan(gptq_rules, {"label": "dp-gptq"}), calib_w=calib)
        # The seed's ranking uses two widths around the budget: the g64 widths just above and just below it.
        bpw = {i: cands[i].bits_per_weight(4096) for i in g64}
        hi = min((i for i in g64 if bpw[i] > budget.avg_bits), key=lambda i: bpw[i])
        lo = max((i for i in g64 if bpw[i] < budget.avg_bits), key=lambda i: bpw[i])
        two = [[table.sizes[u][hi], table.sizes[u][lo]] for u in range(len(units))]
        two_d = [[table.distortion[u][hi], table.distortion[u][lo]] for u in range(len(units))]
        pair = f"{cands[hi].label()}/{cands[lo].label()}"
        dp2 = solve_dp(two_d, two, room)
        run(f"{label} layerwise dp, RTN, two widths {pair}", plan_from([(hi, lo)[c] for c in dp2], "dp2"))
        for method in ("lim", "zd"):
            rp = allocate_by_rank(_rank_order(units, scores, method), two, room)
            run(f"{label} rank by {method}, RTN, two widths {pair}", plan_from([(hi, lo)[c] for c in rp], method))
        if label.endswith("bpw"):
            bits = 4 if label.startswith("4.5") else 3
            run(f"{label} uniform q{bits}g32s RTN (all matrices)", Plan.uniform(QuantSpec(bits, 32, True), names))
    linears = [p for b in lmap.blocks for p in b.linears]
    for method, spec in (("rtn", QuantSpec(4, 32, True)), ("hqq", QuantSpec(4, 32, False, "hqq")),
                         ("rtn-asym", QuantSpec(4, 32, False)), ("gptq", QuantSpec(4, 32, True, "gptq"))):
        run(f"blocks q4g32 {method} (embedding fp32)", Plan.uniform(spec, linears), (("anchors", anchors),),
            calib_w=calib)

    lines = [f"Written by `python benchmarks/quantize_layerwise.py --model {a.model}` on {time.strftime('%Y-%m-%d')} "
             f"({platform.processor() or platform.machine()}, torch {torch.__version__}, 2 threads).",
             f"Calibration: {calib.num_tokens} tokens from the Austen novels except persuasion.txt (sha256 "
             f"{calib.data_hash[:12]}); distortion table {len(units)} units × {len(cands)} candidates ({MENU}) "
             f"measured in {t_measure:.0f} s. Evaluation: `anchors` = ANCHORS.md protocol (persuasion.txt, first 6 "
             f"× 512 tokens); `heldout` = {heldout.num_tokens} tokens of evaluation windows from the other novels "
             "(disjoint from calibration). KL = mean per-token KL(original ‖ quantized).", "",
             "| plan | weight bytes | bpw | KL anchors | p99 | top-1 | ppl (ref) | KL heldout | top-1 heldout | "
             "quantize s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        an, ho = r["anchors"], r.get("heldout")
        lines.append(f"| {r['label']} | {r['size_bytes']:,} | {r['bpw']:.3f} | {an['kl_mean']:.4f} | "
                     f"{an['kl_p99']:.3f} | {an['top1']:.3f} | {an['ppl']:.2f} ({an['ppl_ref']:.2f}) | "
                     f"{ho['kl_mean'] if ho else float('nan'):.4f} | {ho['top1'] if ho else float('nan'):.3f} | "
                     f"{r['quantize_s']} |")
    text = "\n".join(lines) + "\n"
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    from markdown import replace_section

    name = Path(a.model).name if Path(a.model).exists() else a.model
    train_log = Path(a.model) / "train_log.json"
    if train_log.is_file():
        t = json.loads(train_log.read_text())
        text = (f"Float decoder trained by `python benchmarks/train_tiny_lm.py {' '.join(_train_args(t))}`: "
                f"{t['params']:,} parameters, {t['train_tokens']:,} training tokens, {t['epochs']} epochs, final "
                f"train loss {t['log'][-1]['loss']} after {t['log'][-1]['seconds']:.0f} s.\n\n") + text
    replace_section(a.out or REPO / "BENCHMARKS.md", f"Layer-wise quantization: {name} (issue 3)", text)
    raw = REPO / "benchmarks" / "results" / f"quantize-{a.model.replace('/', '_')}.json"
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text(json.dumps({"rows": rows, "table": table.to_dict()}, indent=1))
    print(text)


def _train_args(log: dict) -> list[str]:
    keep = ("steps", "hidden", "layers", "batch", "seq_len", "vocab", "seed")
    return [f"--{k.replace('_', '-')} {log['args'][k]}" for k in keep if k in log["args"]]


if __name__ == "__main__":
    main()
