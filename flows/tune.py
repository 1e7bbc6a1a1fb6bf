"""`compress tune`: search layer-wise quantization budgets for the most compressed model that passes a gate, within a
time budget, and always leave the best model found so far and the Pareto set behind.

One distortion table is measured (the expensive part); every candidate is then a DP solve at a budget, an RTN
quantization and an evaluation on held-out windows, gated like `compress gate`. The size objective bisects the
bit budget (quality is monotone in it); the latency objective measures real ONNX Runtime int4 decode latency of
each candidate (counted bits are not speed) over a grid of budgets. After every candidate, `pareto.json`,
`pareto.png` and `tune.json` are rewritten atomically and a new best passing model replaces `best/`, so an
interrupted run (Ctrl-C, time out) keeps everything measured so far.
"""

from __future__ import annotations

import copy
import re
import time
from dataclasses import dataclass
from pathlib import Path

from compress.errors import UserError
from flows.options import DataOptions, ModelOptions, OutputOptions

DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*(s|m|h)?\s*$")
OBJECTIVES = ("size", "latency")


def parse_duration(text: str) -> float:
    """'10m' -> 600, '90s' / '90' -> 90, '1.5h' -> 5400; UserError otherwise or when ≤ 0."""
    m = DURATION.match(str(text))
    if not m or float(m.group(1)) <= 0:
        raise UserError(f"--time-budget {text}: give a positive duration such as 10m, 90s or 1h")
    return float(m.group(1)) * {"s": 1, None: 1, "m": 60, "h": 3600}[m.group(2)]


@dataclass(kw_only=True)
class TuneRequest(OutputOptions, DataOptions, ModelOptions):
    """Everything `compress tune` was asked to do."""

    gate: Path
    out: Path
    time_budget: str = "10m"
    objective: str = "size"
    tokens: int = 1024
    eval_tokens: int = 1024
    seq_len: int | None = 256
    candidates: str | None = None
    min_bits: float = 2.5
    max_bits: float = 8.0
    resolution: float = 0.125


def _validate(req: TuneRequest) -> tuple[float, dict[str, float]]:
    from evals.gate import load_thresholds

    seconds = parse_duration(req.time_budget)
    if req.objective not in OBJECTIVES:
        raise UserError(f"--objective {req.objective}: use size or latency")
    if not 0 < req.min_bits < req.max_bits:
        raise UserError(f"--min-bits {req.min_bits} / --max-bits {req.max_bits}: need 0 < min < max")
    limits = load_thresholds(req.gate)
    if not limits:
        raise UserError(f"--gate {req.gate}: no thresholds in it (e.g. max_kl: 0.3)")
    if Path(req.out).exists() and not Path(req.out).is_dir():
        raise UserError(f"--out {req.out}: exists and is not a directory")
    return seconds, limits


def run_tune(req: TuneRequest, progress=None, log=print) -> dict:
    """Search, writing OUT/{best/, pareto.json, pareto.png, tune.json} as it goes; returns the summary."""
    from compress.atomic import ensure_workdir
    from compress.data import load_split
    from compress.evaluate import evaluate
    from compress.importance.context import ScoringContext
    from compress.models import layer_map, load_model
    from compress.quantize.distortion import measure_kl
    from compress.quantize.pipeline import Budget, plan_inputs
    from flows.quantize import QuantizeRequest, candidates_for

    seconds, limits = _validate(req)
    t0 = time.perf_counter()
    out = ensure_workdir(Path(req.out))
    target = "ort" if req.objective == "latency" else "torch"
    original = load_model(req.model, arch=req.arch, trust_pickle=req.trust_pickle)
    lmap = layer_map(original.module)
    calib, held = load_split(req.data, original, req.tokens, req.eval_tokens, req.seq_len, req.seed)
    baseline = evaluate(original, original, held).to_dict()
    cands = candidates_for(QuantizeRequest(model=req.model, layerwise=True, avg_bits=req.max_bits,
                                           candidates=req.candidates, target=target))
    if req.candidates is None:
        from compress.quantize.apply import quantizable
        from flows.quantize import fitting_defaults

        cands, _ = fitting_defaults(cands, original.module, quantizable(original.module, lmap))
    top = Budget.from_args(original.module, req.max_bits, None)
    cands, units, sizes, top, allowed = plan_inputs(original.module, lmap, cands, top, "block", True, target)
    ctx = ScoringContext(original, lmap, calib, progress)
    anchor = len(cands) // 2
    table = measure_kl(ctx, units, cands, allowed, anchor=anchor)
    del ctx
    state = {"model": req.model, "objective": req.objective, "target": target, "gate": limits,
             "time_budget_s": seconds, "baseline": _brief(baseline), "points": [], "best": None,
             "distortion_seconds": round(time.perf_counter() - t0, 1), "interrupted": False, "timed_out": False}
    log(f"distortion table: {len(units)} units × {len(cands)} candidates in {state['distortion_seconds']} s")
    lo_plan = sum(min(s for s, a in zip(row, mask, strict=True) if a) for row, mask in zip(sizes, allowed,
                                                                                            strict=True))
    lo_plan += top.fixed_bytes
    lo = max(req.min_bits, lo_plan * 8 / top.weight_params + 1e-3)
    hi = req.max_bits
    budgets = _grid(lo, hi) if req.objective == "latency" else None
    durations: list[float] = []
    try:
        while True:
            bits = _next_budget(state, lo, hi, req.resolution, budgets)
            if bits is None:
                break
            elapsed = time.perf_counter() - t0
            expected = sum(durations) / len(durations) if durations else 0.0
            if elapsed + expected > seconds:
                state["timed_out"] = True
                break
            c0 = time.perf_counter()
            point = _candidate(original, lmap, table, sizes, allowed, cands, units, bits, held, baseline, limits,
                               req, target, out)
            point["seconds"] = round(time.perf_counter() - c0, 1)
            durations.append(point["seconds"])
            state["points"].append(point)
            log(f"{bits:.3f} bpw: {point['size_bytes']:,} B, KL {point['kl_mean']:.4f}"
                + (f", decode {point['latency_ms']:.1f} ms" if point.get("latency_ms") else "")
                + f" -> {'pass' if point['passed'] else 'fail'} ({point['seconds']} s)")
            if point["passed"] and _better(point, state["best"], req.objective):
                _promote(out, point)
                state["best"] = point
            else:
                _discard(out, point)
            _publish(out, state, t0)
    except KeyboardInterrupt:
        state["interrupted"] = True
    _publish(out, state, t0)
    if state["best"] is None and state["points"]:
        state["closest"] = min(state["points"], key=lambda p: -p["worst_margin"])
    return state


def _grid(lo: float, hi: float) -> list[float]:
    """Budgets for the latency objective: from the top down, about 0.5 bpw apart."""
    n = max(2, int((hi - lo) / 0.5) + 1)
    return [hi - k * (hi - lo) / (n - 1) for k in range(n)]


def _next_budget(state: dict, lo: float, hi: float, resolution: float, grid: list[float] | None) -> float | None:
    """Grid: the next untried budget. Bisection: first the largest budget, then the smallest if that passes, then
    halfway between the smallest passing and the largest failing budget below it, until they are `resolution`
    apart. None when the search is over."""
    tried = [p["avg_bits"] for p in state["points"]]

    def untried(b: float) -> bool:
        return all(abs(b - t) > 1e-6 for t in tried)

    if grid is not None:
        return next((b for b in grid if untried(b)), None)
    if not tried:
        return hi
    passing = [p["avg_bits"] for p in state["points"] if p["passed"]]
    if not passing:
        return None  # even the largest budget fails: a smaller one will not pass
    upper = min(passing)
    failing = [p["avg_bits"] for p in state["points"] if not p["passed"] and p["avg_bits"] < upper]
    if not failing:
        return lo if untried(lo) and upper > lo else None
    lower = max(failing)
    return (upper + lower) / 2 if upper - lower > resolution + 1e-9 else None


def _candidate(original, lmap, table, sizes, allowed, cands, units, bits, held, baseline, limits, req, target,
               out: Path) -> dict:
    """Plan at `bits`, quantize a copy (RTN), evaluate, gate; the model is kept on disk as OUT/.candidate."""
    from compress.artifact import save_artifact
    from compress.evaluate import evaluate
    from compress.plan import Plan
    from compress.quantize.allocate import solve_dp
    from compress.quantize.pipeline import Budget, quantize
    from evals.gate import run_gate

    budget = Budget.from_args(original.module, bits, None).for_units(original.module, lmap, units)
    picks = solve_dp(table.distortion, sizes, budget.room)
    rules = {m: cands[c].to_dict() for u, c in zip(units, picks, strict=True) for m in u.modules}
    plan = Plan(rules, {"allocator": "dp", "budget_avg_bits": round(bits, 4), "target": target,
                        "units": {u.name: cands[c].label() for u, c in zip(units, picks, strict=True)}})
    cand = copy.deepcopy(original)
    specs, record = quantize(cand, lmap, plan)
    report = evaluate(cand, original, held).to_dict()
    gate = run_gate({**baseline, "_path": "baseline"}, {**report, "_path": f"{bits:.3f} bpw"}, limits)
    point = {"avg_bits": round(bits, 4), "size_bytes": report["size_bytes"], "bpw": report["bpw"],
             "kl_mean": report["kl_mean"], "kl_p99": report["kl_p99"], "top1": report["top1_agreement"],
             "ppl": report["ppl"], "emb_cosine": report["emb_cosine"], "passed": gate.passed,
             "worst_margin": min(_relative_margin(c) for c in gate.checks),
             "failed": [c.message for c in gate.checks if not c.passed], "label": f"{bits:.2f} bpw"}
    staging = out / ".candidate"
    save_artifact(cand, specs, staging, {"plan": plan.to_dict(), "metrics": report, "notes": record.notes,
                                         "bpw": report["bpw"], "size_bytes": report["size_bytes"],
                                         "tune": {"gate": gate.to_dict()}})
    if req.objective == "latency":
        point["latency_ms"] = _ort_latency(staging, out)
    return point


def _relative_margin(check) -> float:
    scale = max(abs(check.limit), 1e-9)
    return check.margin / scale


def _ort_latency(artifact: Path, out: Path) -> float:
    """Median batch-1 decode ms/token of the candidate's ONNX Runtime int4 export (16 steps after 4 warm-up)."""
    import shutil
    import statistics

    import numpy as np

    from exporters.graph import decoder_feed, session
    from flows.export import ExportRequest, run_export

    graph_dir = out / ".candidate-onnx"
    run_export(ExportRequest(model=str(artifact), out=graph_dir, fmt="int4", validate=False))
    sess = session(graph_dir / "model.onnx", 2)
    names = [o.name for o in sess.get_outputs()]
    ids = np.arange(1, 33, dtype=np.int64)[None]
    outs = dict(zip(names, sess.run(None, decoder_feed(sess, ids, None, 0)), strict=True))
    past_len, times = ids.shape[1], []
    for step in range(20):
        nxt = outs["logits"][:, -1:].argmax(-1)
        past = {n.replace("present", "past_key_values"): v for n, v in outs.items() if n.startswith("present")}
        feed = decoder_feed(sess, nxt, past, past_len)
        s0 = time.perf_counter()
        outs = dict(zip(names, sess.run(None, feed), strict=True))
        if step >= 4:
            times.append(time.perf_counter() - s0)
        past_len += 1
    del sess
    shutil.rmtree(graph_dir, ignore_errors=True)
    return 1000 * statistics.median(times)


def _better(point: dict, best: dict | None, objective: str) -> bool:
    if best is None:
        return True
    key = "latency_ms" if objective == "latency" else "size_bytes"
    return (point[key], point["kl_mean"]) < (best[key], best["kl_mean"])


def _promote(out: Path, point: dict) -> None:
    """The candidate just measured becomes OUT/best (swapped into place in one step; the old best removed after)."""
    from compress.atomic import move_into

    move_into(out / ".candidate", out / "best")
    point["path"] = str(out / "best")


def _discard(out: Path, point: dict) -> None:
    import shutil

    shutil.rmtree(out / ".candidate", ignore_errors=True)


def _brief(report: dict) -> dict:
    return {k: report.get(k) for k in ("ppl", "kl_mean", "top1_agreement", "emb_cosine", "size_bytes", "bpw")}


def _publish(out: Path, state: dict, t0: float) -> None:
    """pareto.json (every point, the non-dominated ones flagged), pareto.png, tune.json — each written atomically."""
    from compress.atomic import write_json

    state["seconds"] = round(time.perf_counter() - t0, 1)
    key = "latency_ms" if state["objective"] == "latency" else "size_bytes"
    pts = sorted(state["points"], key=lambda p: (p[key], p["kl_mean"]))
    front, best_kl = [], float("inf")
    for p in pts:
        if p["kl_mean"] < best_kl:
            front.append(p["label"])
            best_kl = p["kl_mean"]
    for p in state["points"]:
        p["pareto"] = p["label"] in front
    write_json(out / "pareto.json", [{k: p.get(k) for k in ("label", "avg_bits", "size_bytes", "latency_ms",
                                                            "kl_mean", "top1", "passed", "pareto")}
                                     for p in state["points"]])
    write_json(out / "tune.json", state)
    if state["points"]:
        _plot(out / "pareto.png", state, key)


def _plot(path: Path, state: dict, key: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from compress.plotting import save_png

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    scale = 1e6 if key == "size_bytes" else 1.0
    for passed, colour, label in ((True, "tab:green", "passes the gate"), (False, "tab:red", "fails the gate")):
        pts = [p for p in state["points"] if p["passed"] == passed]
        ax.scatter([p[key] / scale for p in pts], [p["kl_mean"] for p in pts], c=colour, label=label, s=28)
    front = sorted((p for p in state["points"] if p.get("pareto")), key=lambda p: p[key])
    ax.plot([p[key] / scale for p in front], [p["kl_mean"] for p in front], c="grey", lw=1, ls="--",
            label="Pareto front")
    if state["best"]:
        b = state["best"]
        ax.scatter([b[key] / scale], [b["kl_mean"]], facecolors="none", edgecolors="black", s=120, label="chosen")
    ax.set_xlabel("weight bytes (MB)" if key == "size_bytes" else "decode ms/token (ORT int4)")
    ax.set_ylabel("KL(original ‖ candidate)")
    ax.set_yscale("log")
    ax.set_title(f"compress tune {Path(str(state['model'])).name}: {len(state['points'])} candidates", fontsize=9,
                 loc="left")
    ax.legend(fontsize=7)
    save_png(fig, path)
