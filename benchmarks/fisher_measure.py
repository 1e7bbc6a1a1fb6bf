"""`--measure fisher` against `--measure full` (issue 16): how well the predicted distortion table stands in for the
measured one, and what it costs.

    python benchmarks/fisher_measure.py [--model smollm2-135m] [--budgets 4.5,3.5,105MB]

One run, one process, the same windows: the full table (every unit × candidate of the default torch menu measured
as KL on the calibration windows) and the Fisher table (one forward and backward per calibration window, then
½ Σ F ΔW² per cell), each timed; Spearman ρ between their cells; then for each budget the DP plan of each table,
quantized and evaluated on held-out windows, with the Fisher table's predicted plan KL beside the measured one.
Targets: plan KL of fisher ≤ 1.15 × full's, measurement time ≤ 0.1 × full's. Beside them, the floor of any
gradient-based prediction: one plain forward and backward of the calibration NLL through the whole model.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
AUSTEN = REPO.parent / "shared" / "data" / "text" / "austen"
CALIB = ",".join(str(p) for p in sorted(AUSTEN.glob("*.txt")) if p.name != "persuasion.txt")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--budgets", default="4.5,3.5", help="bits per weight, or bytes of weights as 105MB")
    ap.add_argument("--calib-tokens", type=int, default=1024)
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=1, help="time each measurement this many times (medians)")
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from scipy.stats import spearmanr

    from compress.data import load_windows
    from compress.evaluate import evaluate
    from compress.importance.context import ScoringContext
    from compress.models import layer_map, load_model
    from compress.plan import Plan
    from compress.quantize.allocate import solve_dp
    from compress.quantize.apply import quantizable
    from compress.quantize.budget import Budget
    from compress.quantize.distortion import measure_kl
    from compress.quantize.fisher import predict_fisher
    from compress.quantize.pipeline import plan_inputs, quantize
    from flows.quantize import QuantizeRequest, candidates_for, fitting_defaults

    torch.set_num_threads(2)
    ref = load_model(a.model)
    lmap = layer_map(ref.module)
    calib = load_windows(CALIB, ref, split="calibration", tokens=a.calib_tokens)
    heldout = load_windows(CALIB, ref, split="evaluation", tokens=a.eval_tokens)
    cands, _ = fitting_defaults(candidates_for(QuantizeRequest(model=a.model, layerwise=True, avg_bits=4.5)),
                                ref.module, quantizable(ref.module, lmap))
    some_budget = Budget.parse(4.5, None).resolve(ref.module)
    cands, units, sizes, _, allowed = plan_inputs(ref.module, lmap, cands, some_budget)
    times: dict[str, list[float]] = {"full": [], "fisher": [], "floor": []}
    for _ in range(a.repeats):  # alternated, so a busy spell of the machine falls on both
        t0 = time.perf_counter()
        full = measure_kl(ScoringContext(ref, lmap, calib), units, cands, allowed)
        times["full"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        fisher = predict_fisher(ref, lmap, calib, units, cands, allowed)
        times["fisher"].append(time.perf_counter() - t0)
        times["floor"].append(_gradient_floor(ref.module, calib))
    t_full, t_fisher = statistics.median(times["full"]), statistics.median(times["fisher"])
    t_floor = statistics.median(times["floor"])
    cells = [(f, m) for fr, mr in zip(fisher.distortion, full.distortion, strict=True)
             for f, m in zip(fr, mr, strict=True) if m != float("inf")]
    rho = float(spearmanr([c[0] for c in cells], [c[1] for c in cells]).statistic)
    print(f"full {t_full:.0f} s, fisher {t_fisher:.1f} s, spearman {rho:.3f}", flush=True)

    rows = []
    for b in a.budgets.split(","):
        size = b.endswith("MB")  # a byte budget (--max-size), else bits per weight (--avg-bits)
        budget = Budget.parse(None if size else float(b), int(float(b[:-2]) * 1e6) if size else None)
        budget = budget.resolve(ref.module).for_units(ref.module, lmap, units)
        out = {}
        for name, table in (("full", full), ("fisher", fisher)):
            picks = solve_dp(table.distortion, sizes, budget.room)
            plan = Plan({m: cands[c].to_dict() for u, c in zip(units, picks, strict=True) for m in u.modules}, {})
            cand = load_model(a.model)
            quantize(cand, layer_map(cand.module), plan)
            r = evaluate(cand, ref, heldout)
            predicted = sum(table.distortion[u][c] for u, c in enumerate(picks))
            out[name] = (r, predicted, picks)
            print(f"{_budget(b)} {name}: KL {r.kl_mean:.4f} (predicted sum {predicted:.4f}), bpw {r.bpw:.3f}",
                  flush=True)
        rows.append((b, out))

    from markdown import replace_section, tilde

    shown = tilde(a.model)
    again = f" --repeats {a.repeats}" if a.repeats > 1 else ""
    lines = [f"Written by `python benchmarks/fisher_measure.py --model {shown} --budgets {a.budgets}{again}` on "
             f"{time.strftime('%Y-%m-%d')} ({platform.machine()}, {os.cpu_count()} cores, torch "
             f"{torch.__version__}). Calibration: {calib.num_tokens} tokens of the Austen novels but persuasion.txt; "
             f"held-out evaluation: {heldout.num_tokens} tokens of their evaluation split. Table: {len(units)} units "
             f"(blocks + embedding/tied head) × {len(cands)} candidates ({', '.join(c.label() for c in cands)}).", "",
             f"- Measurement time{' (medians of ' + str(a.repeats) + ', alternated)' if a.repeats > 1 else ''}: "
             f"full {t_full:.0f} s, fisher {t_fisher:.1f} s → ratio **{t_fisher / t_full:.3f}** "
             f"(target ≤ 0.1: {'met' if t_fisher <= 0.1 * t_full else '**missed**'}).",
             f"- The floor of any gradient-based prediction (the Fisher needs the calibration NLL's gradient at every "
             f"weight): one forward and backward of that NLL through the whole model in memory, all windows in one "
             f"batch, with no Fisher accumulated and nothing predicted: {t_floor:.2f} s = **{t_floor / t_full:.3f}** "
             "of full.",
             f"- Spearman ρ between the {len(cells)} predicted and measured cells: **{rho:.3f}**.", "",
             "| budget | plan from | bpw | KL held-out | top-1 | KL / full's | target ≤ 1.15 | Σ table of the plan "
             "| measured / Σ |", "|---|---|---|---|---|---|---|---|---|"]
    for b, out in rows:
        kl_full = out["full"][0].kl_mean
        for name, (r, predicted, _) in out.items():
            ratio = r.kl_mean / kl_full
            verdict = "" if name == "full" else ("met" if ratio <= 1.15 else "**missed**")
            lines.append(f"| {_budget(b)} | {name} | {r.bpw:.3f} | {r.kl_mean:.4f} | {r.top1_agreement:.3f} | "
                         f"{ratio:.3f} | {verdict} | {predicted:.4f} | {r.kl_mean / predicted:.2f} |")
    name = Path(a.model).name if Path(a.model).exists() else a.model
    replace_section(REPO / "BENCHMARKS.md", f"Predicted distortion, --measure fisher: {name} (issue 16)",
                    "\n".join(lines) + "\n")
    print("\n".join(lines))


def _gradient_floor(model: torch.nn.Module, windows) -> float:
    """Seconds of one forward and backward of the calibration NLL through the whole model (the least any gradient
    of it costs), all windows in one batch; gradients freed after."""
    ids, mask = windows.input_ids, windows.attention_mask
    t0 = time.perf_counter()
    with torch.enable_grad():
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100), use_cache=False).loss
        loss.backward()
    seconds = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    return seconds


def _budget(b: str) -> str:
    return f"≤ {b[:-2]} MB" if b.endswith("MB") else f"{b} bpw"


if __name__ == "__main__":
    main()
