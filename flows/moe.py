"""`compress moe` as functions: expert-load statistics, selection-bias rebalancing, expert pruning and expert-parallel
placement. Each checks its request before loading anything, runs, writes its outputs atomically (complete or absent)
and returns a JSON-ready dict.

Windows: `stats` reads a sample of all windows of --data; `rebalance`, `prune` and `place` fit on the calibration
split of --data and measure on the evaluation split (of --eval-data when given), so the two never overlap.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compress.errors import UserError
from compress.inputs import check_data
from compress.progress import phase
from flows.options import DataOptions, ModelOptions, OutputOptions

if TYPE_CHECKING:
    from compress.data import Windows
    from compress.models.hf import LoadedModel
    from compress.moe.layout import MoeLayer
    from compress.moe.place import LayerPlacement

STATS_JSON = "stats.json"
LOAD_PNG = "load.png"
COACTIVATION_PNG = "coactivation.png"
REBALANCE_JSON = "moe_rebalance.json"
PRUNE_JSON = "moe_prune.json"


# ------------------------------------------------------------------------------------------------------ requests


@dataclass(kw_only=True)
class MoeStatsRequest(OutputOptions, DataOptions, ModelOptions):
    """Everything `compress moe stats` was asked to do."""


@dataclass(kw_only=True)
class RebalanceRequest(OutputOptions, DataOptions, ModelOptions):
    """Everything `compress moe rebalance` was asked to do."""

    method: str = "bip"  # bip | greedy
    capacity: float = 1.1  # most tokens per expert, as a multiple of the mean load
    eval_data: str | None = None  # held-out text (evaluation split); default: the evaluation split of data
    eval_tokens: int = 2048
    max_iter: int = 100
    lr: float = 1e-3  # greedy's step
    margin: float = 0.0  # fit to capacity − margin: room for text other than the calibration's
    runtime_capacity: float | None = None  # also re-solve the BIP on every forward pass (a bound on any text)


@dataclass(kw_only=True)
class MoePruneRequest(OutputOptions, DataOptions, ModelOptions):
    """Everything `compress moe prune` was asked to do."""

    experts: str  # "25%" of all routed experts, or a count such as "8"
    schedule: str = "uniform"
    merge: bool = False
    importance: str = "usefulness"  # usefulness | kl | random
    eval_data: str | None = None
    eval_tokens: int = 2048


@dataclass(kw_only=True)
class PlaceRequest(OutputOptions, DataOptions, ModelOptions):
    """Everything `compress moe place` was asked to do."""

    devices: int
    replicas: int = 0
    eval_data: str | None = None  # held-out text the plans are checked on; default: the evaluation split of data
    eval_tokens: int = 2048


# ------------------------------------------------------------------------------------------------------ checks


def _check_common(data: str | None, seq_len: int | None, seed: int, **tokens: int) -> None:
    for flag, n in tokens.items():
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise UserError(f"--{flag.replace('_', '-')} {n}: must be a positive number of tokens")
    if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2):
        raise UserError(f"--seq-len {seq_len}: give a window length of at least 2 tokens")
    if not isinstance(seed, int):
        raise UserError(f"--seed {seed!r}: must be an integer")
    check_data(data)


def _check_out_dir(out: Path | None, required: bool = False) -> None:
    if out is None:
        if required:
            raise UserError("--out: give the directory to write")
        return
    if Path(out).exists() and not Path(out).is_dir():
        raise UserError(f"--out {out}: exists and is not a directory; pass a directory path")


def check_stats(req: MoeStatsRequest) -> None:
    """Check everything that needs no model."""
    _check_common(req.data, req.seq_len, req.seed, tokens=req.tokens)
    _check_out_dir(req.out)


def check_rebalance(req: RebalanceRequest) -> None:
    """Check everything that needs no model (capacity < 1.0 cannot hold every token)."""
    from compress.moe.balanced import METHODS

    if req.method not in METHODS:
        raise UserError(f"--method {req.method}: unknown rebalancing method; use one of {', '.join(METHODS)}")
    if isinstance(req.capacity, bool) or not isinstance(req.capacity, int | float) or not math.isfinite(
            req.capacity) or req.capacity < 1.0:
        raise UserError(f"--capacity {req.capacity}: must be ≥ 1.0 (a multiple of the mean expert load; below 1.0 "
                        "the experts cannot hold every token); try 1.1")
    if isinstance(req.max_iter, bool) or not isinstance(req.max_iter, int) or req.max_iter < 1:
        raise UserError(f"--max-iter {req.max_iter}: give at least 1 sweep")
    if not (isinstance(req.lr, int | float) and math.isfinite(req.lr) and req.lr > 0):
        raise UserError(f"--lr {req.lr}: give a positive step for --method greedy, e.g. 1e-3")
    if not (math.isfinite(req.margin) and 0.0 <= req.margin < req.capacity - 1.0 + 1e-9):
        raise UserError(f"--margin {req.margin}: give 0 ≤ margin ≤ capacity − 1 (the bias is fitted to capacity − "
                        f"margin ≥ 1.0), e.g. 0.05")
    if req.runtime_capacity is not None and not (math.isfinite(req.runtime_capacity) and req.runtime_capacity >= 1.0):
        raise UserError(f"--runtime-capacity {req.runtime_capacity}: must be ≥ 1.0 (a multiple of the mean load), "
                        "e.g. the --capacity")
    _check_common(req.data, req.seq_len, req.seed, tokens=req.tokens, eval_tokens=req.eval_tokens)
    check_data(req.eval_data, "--eval-data")
    _check_out_dir(req.out)


def check_prune(req: MoePruneRequest) -> tuple[float, bool]:
    """Check everything that needs no model; return the parsed --experts amount (value, is a percentage)."""
    from compress.moe.prune import IMPORTANCES
    from compress.moe.schedule import SCHEDULES
    from flows.prune import parse_amount

    amount = parse_amount(req.experts, "--experts")
    if req.schedule not in SCHEDULES:
        raise UserError(f"--schedule {req.schedule}: unknown expert schedule; use one of {', '.join(SCHEDULES)}")
    if req.importance not in IMPORTANCES:
        raise UserError(f"--importance {req.importance}: unknown expert importance; use one of "
                        f"{', '.join(IMPORTANCES)}")
    _check_common(req.data, req.seq_len, req.seed, tokens=req.tokens, eval_tokens=req.eval_tokens)
    check_data(req.eval_data, "--eval-data")
    _check_out_dir(req.out)
    return amount


def check_place(req: PlaceRequest) -> None:
    """Check everything that needs no model."""
    if isinstance(req.devices, bool) or not isinstance(req.devices, int) or req.devices < 1:
        raise UserError(f"--devices {req.devices}: need at least 1 device")
    if isinstance(req.replicas, bool) or not isinstance(req.replicas, int) or req.replicas < 0:
        raise UserError(f"--replicas {req.replicas}: give a number of extra expert copies per layer ≥ 0")
    _check_common(req.data, req.seq_len, req.seed, tokens=req.tokens, eval_tokens=req.eval_tokens)
    check_data(req.eval_data, "--eval-data")
    if req.out is not None and Path(req.out).is_dir():
        raise UserError(f"--out {req.out}: is a directory; pass the JSON file to write, e.g. plan.json")


# ------------------------------------------------------------------------------------------------------ helpers


def load_moe(spec: str, fresh: bool = False, arch: str | None = None,
             trust_pickle: bool = False) -> tuple[LoadedModel, list[MoeLayer]]:
    """Load `spec` (zoo name, HF dir or artifact dir) and its MoE layers; UserError for a dense model, and for an
    artifact when `fresh` (the verb edits the original model)."""
    from compress.moe.layout import MOE_FAMILIES, moe_layers

    loaded, _ = ModelOptions(spec, arch, trust_pickle).load_source()
    family = getattr(getattr(loaded.module, "config", None), "model_type", None) or loaded.family
    if family not in MOE_FAMILIES:
        raise UserError(f"{spec}: has no experts (a dense {family} model; the moe verbs need one of "
                        f"{', '.join(MOE_FAMILIES)}); use compress prune / quantize for dense models")
    manifest = loaded.extra.get("manifest")
    if fresh and manifest is not None:
        raise UserError(f"{spec}: already a compress artifact ({manifest.get('format')}); run this verb on the "
                        f"original model ({manifest.get('base') or 'its base'})")
    return loaded, moe_layers(loaded.module)


@contextlib.contextmanager
def _phase(progress: Any, name: str) -> Iterator[None]:
    """One progress line per phase (nothing when `progress` is None)."""
    with phase(name, progress=progress):
        yield


def _windows(spec: str | None, loaded: LoadedModel, split: str, tokens: int, seq_len: int | None,
             seed: int) -> Windows:
    from compress.data import load_windows

    return load_windows(spec, loaded, split=split, tokens=tokens, seq_len=seq_len, seed=seed)


def _prepare(req: RebalanceRequest | MoePruneRequest | PlaceRequest, fresh: bool,
             check: Any = None) -> tuple[LoadedModel, list[MoeLayer], Windows, Windows]:
    """The MoE model and its layers, the calibration windows of --data and the held-out evaluation windows (of
    --eval-data when given): what rebalance, prune and place all start from. `check(loaded, layers)` runs before
    any text is read or sampled, so a request the model cannot meet fails at once."""
    loaded, layers = load_moe(req.model, fresh=fresh, arch=req.arch, trust_pickle=req.trust_pickle)
    if check is not None:
        check(loaded, layers)
    calib = _windows(req.data, loaded, "calibration", req.tokens, req.seq_len, req.seed)
    heldout = _windows(req.eval_data or req.data, loaded, "evaluation", req.eval_tokens, req.seq_len, req.seed)
    return loaded, layers, calib, heldout


def _measure(original: LoadedModel, changed: LoadedModel, heldout: Windows, progress: Any) -> tuple:
    """Expert load before/after and KL / top-1 of the changed model against the original, on held-out windows."""
    from compress.evaluate import evaluate
    from compress.moe.balanced import evaluate_balance

    with _phase(progress, "evaluate"):
        return evaluate_balance(original, changed, heldout), evaluate(changed, original, heldout).to_dict()


def _params(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


def _summary(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Worst and mean per-layer max/mean load, before and after."""
    out = {}
    for key in ("before", "after"):
        vals = [r[key] for r in rows if r.get(key) is not None and math.isfinite(r[key])]
        out[f"max_over_mean_worst_{key}"] = max(vals) if vals else None
        out[f"max_over_mean_mean_{key}"] = sum(vals) / len(vals) if vals else None
    return out


def _save_with(out: Path, save: Any, name: str, result: dict[str, Any]) -> None:
    """Write an artifact via `save(tmp)` plus `name` (the result JSON) into `out`, all or nothing."""
    from compress.atomic import atomic_dir, write_json

    with atomic_dir(Path(out)) as tmp:
        save(tmp)  # save_dir is atomic itself: it replaces the (empty) tmp dir, which we then fill and rename
        write_json(tmp / name, result)


# ------------------------------------------------------------------------------------------------------ verbs


def run_stats(req: MoeStatsRequest, progress: Any = None) -> dict[str, Any]:
    """Per-layer expert load of the model on windows of --data; with `out`, stats.json and two PNGs."""
    check_stats(req)
    from compress.atomic import atomic_dir, write_json
    from compress.moe.stats import moe_stats

    t0 = time.perf_counter()
    # loading and every input check come before any progress line
    loaded, _ = load_moe(req.model, arch=req.arch, trust_pickle=req.trust_pickle)
    windows = _windows(req.data, loaded, "all", req.tokens, req.seq_len, req.seed)
    with _phase(progress, "route"):
        stats = moe_stats(loaded, windows)
    result = {"model": req.model, "family": loaded.module.config.model_type, "data": windows.describe(),
              **stats.to_dict()}
    result["seconds"] = round(time.perf_counter() - t0, 2)
    if req.out is not None:
        from compress.moe.plot import plot_coactivation, plot_load

        result["out"] = str(req.out)
        result["files"] = [STATS_JSON, LOAD_PNG, COACTIVATION_PNG]
        with _phase(progress, "write"), atomic_dir(Path(req.out)) as tmp:
            write_json(tmp / STATS_JSON, result)
            plot_load(stats, tmp / LOAD_PNG, f"{Path(req.model).name}: expert load over {stats.tokens} tokens")
            plot_coactivation(stats, tmp / COACTIVATION_PNG)
    return result


def held_out_advice(rows: list[dict], req: RebalanceRequest) -> list[str]:
    """A note when the held-out load is over the capacity although calibration met it: the bias alone does not
    carry over to this text, and what to do next."""
    worst = max(r["after"] for r in rows)
    if worst <= req.capacity + 0.05 or req.runtime_capacity is not None:
        return []
    return [f"held-out max/mean {worst:.2f} is over the capacity {req.capacity:g}: the bias fitted on the "
            "calibration text does not hold on this text (a router this skewed moves with the text). Next steps: "
            f"--runtime-capacity {req.capacity:g} re-solves the routing on every forward pass (bounded on any "
            "text; not exportable yet); calibrate on several sources (--data a,b,self) with --margin 0.05; or "
            "replicate the hot experts (`compress moe place --replicas N`)."]


def run_rebalance(req: RebalanceRequest, progress: Any = None) -> dict[str, Any]:
    """Fit a selection bias per layer on calibration windows, measure load / KL / top-1 against the original on
    held-out windows, save a compress-moe-v1 artifact (+ moe_rebalance.json) when `out` is given."""
    check_rebalance(req)
    from compress.moe.balanced import rebalance, save_balanced
    from compress.moe.bip import capacity_tokens

    t0 = time.perf_counter()
    loaded, layers, calib, heldout = _prepare(req, fresh=True)
    for ly in layers:  # an infeasible capacity (too few calibration tokens) fails here, not mid-fit
        capacity_tokens(calib.num_tokens, ly.top_k, ly.num_experts, req.capacity)
    original = copy.deepcopy(loaded)
    with _phase(progress, f"fit {req.method}"):
        fit = rebalance(loaded, calib, req.method, req.capacity, max_iter=req.max_iter, lr=req.lr, margin=req.margin,
                        runtime_capacity=req.runtime_capacity)
    balance, metrics = _measure(original, loaded, heldout, progress)
    fitted = {r["index"]: r for r in fit.layers}
    rows = [{**row, "calib_before": fitted[row["index"]]["before"], "calib_after": fitted[row["index"]]["after"],
             "iterations": fitted[row["index"]]["iterations"]} for row in balance.layers]
    result = {"model": req.model, "family": fit.family, "method": req.method, "capacity": req.capacity,
              "calibration": calib.describe(), "evaluation": heldout.describe(), "layers": rows,
              "summary": {**_summary(rows), "calib_max_over_mean_worst_after": max(r["after"] for r in fit.layers),
                          "kl_mean": balance.kl_mean, "kl_p99": balance.kl_p99,
                          "top1_agreement": balance.top1_agreement},
              "bias": fit.bias, "fit_seconds": fit.seconds, "notes": fit.notes + held_out_advice(rows, req),
              "margin": req.margin, "runtime_capacity": req.runtime_capacity, "metrics": metrics}
    result["seconds"] = round(time.perf_counter() - t0, 2)
    if req.out is not None:
        result["out"] = str(req.out)
        manifest = {"metrics": metrics, "moe_rebalance": {k: result[k] for k in ("summary", "layers", "calibration",
                                                                                   "evaluation")}}
        with _phase(progress, "write"):
            _save_with(req.out, lambda tmp: save_balanced(loaded, tmp, fit, manifest), REBALANCE_JSON, result)
    return result


def _prune_count(req: MoePruneRequest, amount: tuple[float, bool], loaded: LoadedModel,
                 layers: list[MoeLayer]) -> float:
    """The percentage of routed experts prune_moe removes; UserError when nothing or too much would go."""
    from compress.moe.prune import _n_group, min_keep
    from compress.moe.schedule import removal_budget, removal_caps

    value, pct = amount
    sizes = [ly.num_experts for ly in layers]
    total = sum(sizes)
    percent = value if pct else 100.0 * value / total
    multiple = max(_n_group(loaded.module, ly) for ly in layers)
    floors = [min_keep(loaded.module, ly) for ly in layers]
    most = sum(removal_caps(sizes, floors, multiple)) * multiple
    if not pct and value >= total:
        raise UserError(f"--experts {req.experts}: the model has {total} routed experts; each layer must keep at "
                        f"least its top-k, so remove at most {most}")
    removed = removal_budget(sizes, percent, multiple)
    if removed == 0:
        raise UserError(f"--experts {req.experts}: rounds to 0 of {total} routed experts"
                        + (f" (removed in groups of {multiple})" if multiple > 1 else "") + "; ask for more")
    if removed > most:
        raise UserError(f"--experts {req.experts}: would remove {removed} of {total} routed experts, but every layer "
                        f"must keep at least {min(floors)} (its top-k); remove at most {most} "
                        f"({100 * most / total:.4g}%)")
    return percent


def run_prune(req: MoePruneRequest, progress: Any = None) -> dict[str, Any]:
    """Drop (or merge) the least useful routed experts by --schedule, measure KL / top-1 against the original on
    held-out windows, save a compress-moe-pruned-v1 artifact (+ moe_prune.json) when `out` is given."""
    amount = check_prune(req)
    from compress.moe.prune import prune_moe
    from compress.moe.prune_artifact import save_moe_pruned

    t0 = time.perf_counter()
    loaded, layers, calib, heldout = _prepare(req, fresh=True,
                                              check=lambda lo, ly: _prune_count(req, amount, lo, ly))
    percent = _prune_count(req, amount, loaded, layers)
    original = copy.deepcopy(loaded)
    params_before = _params(loaded.module)
    with _phase(progress, f"prune {req.schedule}"):
        t1 = time.perf_counter()
        plan, _ = prune_moe(loaded.module, calib, percent, req.schedule, merge=req.merge, importance=req.importance,
                            seed=req.seed)
        prune_seconds = round(time.perf_counter() - t1, 2)
    balance, metrics = _measure(original, loaded, heldout, progress)
    loads = {r["index"]: r for r in balance.layers}
    rows = []
    for ly in layers:
        p = plan.layers[ly.index]
        rows.append({"index": ly.index, "experts_before": ly.num_experts, "kept": len(p["kept"]),
                     "kept_ids": p["kept"], "dropped": p["dropped"], "merged_into": p["merged_into"],
                     "before": loads[ly.index]["before"], "after": loads[ly.index]["after"]})
    result = {"model": req.model, "family": loaded.module.config.model_type, "requested": req.experts,
              "percent": percent, "removed": plan.removed, "total": plan.total, "schedule": req.schedule,
              "importance": req.importance, "merge": req.merge, "calibration": calib.describe(),
              "evaluation": heldout.describe(), "layers": rows,
              "summary": {**_summary(rows), "kl_mean": balance.kl_mean, "kl_p99": balance.kl_p99,
                          "top1_agreement": balance.top1_agreement},
              "params_before": params_before, "params_after": _params(loaded.module),
              "config_updated": plan.config_updated, "plan": plan.to_dict(), "prune_seconds": prune_seconds,
              "metrics": metrics}
    result["seconds"] = round(time.perf_counter() - t0, 2)
    if req.out is not None:
        result["out"] = str(req.out)
        manifest = {"metrics": metrics, "moe_prune_summary": result["summary"]}
        with _phase(progress, "write"):
            _save_with(req.out, lambda tmp: save_moe_pruned(loaded, plan, tmp, manifest), PRUNE_JSON, result)
    return result


def _check_devices(req: PlaceRequest, layers: list[MoeLayer]) -> None:
    """Every layer must fill the devices and hold its replicas (one copy of an expert per device)."""
    fewest = min(ly.num_experts for ly in layers)
    if fewest + req.replicas < req.devices:
        raise UserError(f"--devices {req.devices}: a layer has only {fewest} experts + {req.replicas} replicas; use "
                        f"at most {fewest + req.replicas} devices or more --replicas")
    if req.replicas > fewest * (req.devices - 1):
        raise UserError(f"--replicas {req.replicas}: a layer of {fewest} experts on {req.devices} devices holds at "
                        f"most {fewest * (req.devices - 1)} extra copies (one per device each); use fewer replicas")


def device_loads(placement: LayerPlacement, load: list[float]) -> list[float]:
    """What each device of `placement` carries under another expert load (a copy takes load / copies)."""
    out = [0.0] * len(placement.device_load)
    for e, devs in enumerate(placement.experts):
        for d in devs:
            out[d] += load[e] / len(devs)
    return out


def _ratio(dev: list[float]) -> float:
    mean = sum(dev) / len(dev)
    return max(dev) / mean if mean > 0 else 1.0


def run_place(req: PlaceRequest, progress: Any = None) -> dict[str, Any]:
    """Expert-parallel plan from the routed load on calibration windows, balanced vs round-robin, both also measured
    under the held-out load; writes the JSON plan to `out` when given."""
    check_place(req)
    from compress.atomic import write_json
    from compress.moe.place import place_experts, round_robin
    from compress.moe.routing import capture_routing
    from compress.moe.stats import load_of

    t0 = time.perf_counter()
    loaded, layers, calib, heldout = _prepare(req, fresh=False, check=lambda _, ly: _check_devices(req, ly))
    with _phase(progress, "route"):
        loads = [[float(x) for x in load_of(r.indices, r.layer.num_experts)]
                 for r in capture_routing(loaded, calib).values()]
        held = [[float(x) for x in load_of(r.indices, r.layer.num_experts)]
                for r in capture_routing(loaded, heldout).values()]
    ours, rr = place_experts(loads, req.devices, req.replicas), round_robin(loads, req.devices)
    rows = []
    for ly, a, b, h in zip(layers, ours.layers, rr.layers, held, strict=True):
        rows.append({"index": ly.index, "experts": ly.num_experts, "copies": sum(len(d) for d in a.experts),
                     "ours": a.imbalance, "round_robin": b.imbalance, "heldout_ours": _ratio(device_loads(a, h)),
                     "heldout_round_robin": _ratio(device_loads(b, h))})
    summary = {}
    for key in ("ours", "round_robin", "heldout_ours", "heldout_round_robin"):
        summary[f"{key}_mean"] = sum(r[key] for r in rows) / len(rows)
        summary[f"{key}_worst"] = max(r[key] for r in rows)
    result = {"model": req.model, "family": loaded.module.config.model_type, "devices": req.devices,
              "replicas": req.replicas, "calibration": calib.describe(), "evaluation": heldout.describe(),
              "layers": rows, "summary": summary, "loads": loads, "heldout_loads": held,
              "placement": {**ours.to_dict(), "layer_index": [ly.index for ly in layers]},
              "round_robin": {**rr.to_dict(), "layer_index": [ly.index for ly in layers]}}
    result["seconds"] = round(time.perf_counter() - t0, 2)
    if req.out is not None:
        result["out"] = str(req.out)
        write_json(Path(req.out), result, sign=True)
    return result
