"""From a model and a budget to a Plan (uniform, layerwise by DP, or the seed's ranking), and applying it."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from compress.data import Windows
from compress.errors import UserError
from compress.importance.context import ScoringContext
from compress.importance.report import ImportanceReport
from compress.models.hf import LoadedModel
from compress.models.layers import LayerMap
from compress.plan import Plan
from compress.quantize.allocate import allocate_by_rank, solve_dp
from compress.quantize.apply import apply_plan, is_tied, quantizable, weight_matrix
from compress.quantize.budget import Budget
from compress.quantize.choices import ALLOCATOR, MEASURE
from compress.quantize.distortion import DistortionTable, Unit, measure_kl
from compress.quantize.fisher import predict_fisher
from compress.quantize.spec import QuantSpec


def units_for(model, lmap: LayerMap, granularity: str, embeddings: bool) -> list[Unit]:
    """Allocation units: per block (all its Linears share a width) or per Linear; plus embedding / head."""
    units: list[Unit] = []
    for b in lmap.blocks:
        if granularity == "block":
            units.append(Unit(f"block {b.index}", list(b.linears), b.index))
        elif granularity == "linear":
            units.extend(Unit(p, [p], b.index) for p in b.linears)
        else:
            raise UserError(f"--granularity {granularity}: use block or linear")
    if embeddings:
        if lmap.embeddings:
            units.append(Unit("embedding" + (" + tied head" if is_tied(model, lmap) else ""), [lmap.embeddings]))
        if lmap.head and not is_tied(model, lmap):
            units.append(Unit("head", [lmap.head]))
    return units


def layerwise_plan(loaded: LoadedModel, lmap: LayerMap, windows: Windows, candidates: list[QuantSpec],
                   budget: Budget, allocator: str = "dp", granularity: str = "block", embeddings: bool = True,
                   ranking: ImportanceReport | None = None, rank_by: str = "lim", progress=None,
                   inputs: tuple | None = None, target: str = "torch",
                   measure: str = "full", lazy=None, offload_dir=None,
                   imatrix=None) -> tuple[Plan, DistortionTable | None]:
    """Choose one candidate per unit under the budget: exact DP on measured divergence, or the seed's ranking.

    `inputs` is what `plan_inputs` returned for the same arguments, when the caller validated the budget already.
    `measure` 'full' measures every unit × candidate; 'fast' one candidate per unit (see measure_kl's anchor);
    'fisher' predicts every cell from the diagonal Fisher and the weight error, measuring nothing; block by block
    on `lazy` (a compress.stream LazyModel) when given, hidden states spilled under `offload_dir` when large.
    `imatrix` (an ImportanceMatrix) makes every measured or predicted candidate importance-weighted RTN.
    """
    ALLOCATOR.check(allocator)
    MEASURE.check(measure)
    model = loaded.module
    inputs = inputs or plan_inputs(model, lmap, candidates, budget, granularity, embeddings, target)
    candidates, units, sizes, budget, allowed = inputs
    t0 = time.perf_counter()
    table = None
    if allocator == "dp" and measure == "fisher":
        table = predict_fisher(loaded, lmap, windows, units, candidates, allowed, progress, lazy, offload_dir,
                               imatrix)
        picks = solve_dp(table.distortion, sizes, budget.room)
    elif allocator == "dp":
        ctx = ScoringContext(loaded, lmap, windows, progress)
        anchor = anchor_candidate(candidates, budget, target) if measure == "fast" else None
        table = measure_kl(ctx, units, candidates, allowed, anchor, imatrix)
        picks = solve_dp(table.distortion, sizes, budget.room)
    else:
        picks = allocate_by_rank(_rank_order(units, ranking, rank_by), sizes, budget.room, allowed)
    if table is not None:
        table.sizes = sizes  # as the target stores them: what the plan was solved on
    rules = {m: candidates[c].for_width(weight_matrix(model.get_submodule(m)).shape[1]).to_dict()
             for u, c in zip(units, picks, strict=True) for m in u.modules}  # a K-quant's fallback by width
    meta = {"allocator": allocator, "granularity": granularity, "measure": measure if allocator == "dp" else None,
            **budget.meta(sum(sizes[i][c] for i, c in enumerate(picks))),
            "bytes_as": "onnx (fp32 scales)" if target == "ort" else "artifact",
            "candidates": [c.label() for c in candidates], "target": target, "units": {u.name: candidates[c].label()
                                                                     for u, c in zip(units, picks, strict=True)},
            "seconds": round(time.perf_counter() - t0, 2)}
    if allocator == "rank":
        meta["rank_by"] = rank_by
    return Plan(rules, meta), table


def anchor_candidate(candidates: list[QuantSpec], budget: Budget, target: str = "torch") -> int:
    """The candidate where the budget's decisions are made: the largest one at or below the average bits (as
    `target` stores them)."""
    from compress.quantize.targets import bits_per_weight

    below = [i for i, c in enumerate(candidates) if bits_per_weight(c, 4096, target) <= budget.avg_bits]
    return below[0] if below else len(candidates) - 1


def plan_inputs(model, lmap: LayerMap, candidates: list[QuantSpec], budget: Budget, granularity: str = "block",
                embeddings: bool = True, target: str = "torch"):
    """Candidates (largest first), units, their sizes per candidate, the budget with its room for them, and which
    candidates each unit may take on `target`; validates shapes and the budget before anything is measured."""
    from compress.quantize.distortion import unit_bytes
    from compress.quantize.targets import EMBEDDING, LINEAR, bits_per_weight, check_candidates, problem

    check_candidates(candidates, target)
    candidates = sorted(candidates, key=lambda c: -bits_per_weight(c, 4096, target))
    units = units_for(model, lmap, granularity, embeddings)
    for u in units:
        for m in u.modules:
            for c in candidates:
                c.check_shape(m, weight_matrix(model.get_submodule(m)).shape[1])
    allowed = [[problem(c, target, LINEAR if u.block is not None or u.name == "head" else EMBEDDING) is None
                for c in candidates] for u in units]
    allowed = [_first_of_equals(model, u, candidates, a) for u, a in zip(units, allowed, strict=True)]
    keep = [i for i, a in enumerate(allowed) if any(a)]  # a unit the target can't quantize stays as it is
    units, allowed = [units[i] for i in keep], [allowed[i] for i in keep]
    sizes = [[unit_bytes(model, u, c, target) for c in candidates] for u in units]
    budget = budget.for_units(model, lmap, units)
    _check_budget(sizes, budget, allowed)
    return candidates, units, sizes, budget, allowed


def _first_of_equals(model, unit: Unit, candidates: list[QuantSpec], allowed: list[bool]) -> list[bool]:
    """`allowed` without the candidates that quantize every matrix of the unit exactly as an earlier one does (a
    K-quant on widths of no whole super-blocks is its group fallback: 4k is q5 there), so each is measured once."""
    widths = [weight_matrix(model.get_submodule(m)).shape[1] for m in unit.modules]
    seen, out = set(), []
    for c, ok in zip(candidates, allowed, strict=True):
        key = tuple(c.for_width(w) for w in widths)
        out.append(ok and key not in seen)
        if ok:
            seen.add(key)
    return out


def _check_budget(sizes: list[list[int]], budget: Budget, allowed: list[list[bool]]) -> None:
    ok = [[s for s, a in zip(row, mask, strict=True) if a] for row, mask in zip(sizes, allowed, strict=True)]
    lo, hi = sum(min(r) for r in ok), sum(max(r) for r in ok)
    if budget.room < lo:
        raise UserError(f"budget {budget.bytes:,} bytes ({budget.avg_bits:.3f} bpw) is below the smallest plan the "
                        f"candidates allow; raise --avg-bits/--max-size or add a smaller candidate")
    if budget.room >= hi:
        raise UserError(f"budget {budget.bytes:,} bytes ({budget.avg_bits:.3f} bpw) fits every unit at the largest "
                        "candidate: nothing to allocate; lower the budget or use --bits for uniform quantization")


def _rank_order(units: list[Unit], report: ImportanceReport | None, method: str) -> list[int]:
    """Units from least to most important by a block score; non-block units (embedding) are kept last."""
    if report is None:
        raise UserError("--allocator rank needs importance scores: pass --scores scores.json from `compress score`")
    if method not in report.methods:
        raise UserError(f"--rank-by {method}: the scores file has {', '.join(report.methods)}")
    most_first = report.ranking(method)
    position = {b: i for i, b in enumerate(most_first)}
    block_units = [i for i, u in enumerate(units) if u.block is not None]
    others = [i for i, u in enumerate(units) if u.block is None]
    block_units.sort(key=lambda i: -position.get(units[i].block, 0))
    return block_units + others


@dataclass(frozen=True)
class MethodHandler:
    """How a --method makes its codes: `codes(loaded, lmap, specs, windows, progress)` returns QuantizedWeights for
    the modules in `specs` (all of this method); None means plain RTN, done while the modules are swapped."""

    needs_data: bool = False
    codes: Callable[..., dict] | None = None


def hqq_codes(loaded: LoadedModel, lmap: LayerMap, specs: dict[str, QuantSpec], windows=None, progress=None) -> dict:
    """HQQ: each matrix alone, data-free (zero points optimised against the weight error)."""
    from compress.quantize.hqq import hqq_quantize

    return {n: hqq_quantize(weight_matrix(loaded.module.get_submodule(n)), s) for n, s in specs.items()}


def quantize(loaded: LoadedModel, lmap: LayerMap, plan: Plan, windows: Windows | None = None, progress=None,
             imatrix=None):
    """Apply `plan` to the model in place, each method's codes made by its handler (METHOD_HANDLERS); returns
    (specs, Record). Methods that need data (GPTQ's Hessians) use `windows`; RTN weights its rounding by
    `imatrix` (an ImportanceMatrix) when given."""
    t0 = time.perf_counter()
    specs = plan.resolve(quantizable(loaded.module, lmap))
    quantized = {}
    for method, handler in METHOD_HANDLERS.items():
        mine = {n: s for n, s in specs.items() if s.method == method and not s.is_float}
        if not mine or handler.codes is None:
            continue
        if handler.needs_data and windows is None:
            raise UserError(f"{method} needs calibration data: pass --data")
        quantized.update(handler.codes(loaded, lmap, mine, windows, progress))
    if imatrix is not None:
        quantized.update(weighted_rtn(loaded.module, specs, imatrix))
    record = apply_plan(loaded.module, lmap, specs, quantized)
    record.seconds = round(time.perf_counter() - t0, 2)
    return specs, record


def weighted_rtn(model, specs: dict[str, QuantSpec], imatrix) -> dict:
    """Importance-weighted RTN codes of the RTN modules `imatrix` has an entry for (the others stay plain RTN)."""
    from compress.quantize.distortion import importance_of
    from compress.quantize.rtn import quantize_rtn

    out = {}
    for n, s in specs.items():
        imp = importance_of(imatrix, n) if s.method == "rtn" and not s.is_float else None
        if imp is not None:
            out[n] = quantize_rtn(weight_matrix(model.get_submodule(n)), s, imp)
    return out


def needs_data(specs: dict[str, QuantSpec]) -> bool:
    """True when some spec's method makes its codes from calibration data."""
    return any(METHOD_HANDLERS[s.method].needs_data and not s.is_float for s in specs.values())


def gptq_pass(loaded: LoadedModel, lmap: LayerMap, specs: dict[str, QuantSpec], windows: Windows,
              progress=None) -> dict:
    """GPTQ block by block; each block sees the outputs of the already-quantized blocks before it."""
    import torch

    from compress.models.runner import BlockRunner

    model = loaded.module
    runner = BlockRunner(loaded, lmap, windows)
    hidden = [b.inputs[0] for b in runner.batches]
    out = {}
    task = progress.add_task("gptq", total=len(lmap.blocks)) if progress is not None else None
    with torch.inference_mode():
        for blk in lmap.blocks:
            def feed(i=blk.index, hidden=hidden):
                for b, batch in enumerate(runner.batches):
                    runner.run_block(batch, i, hidden[b])

            out.update(gptq_block(model, blk.linears, specs, feed))
            hidden = [runner.run_block(batch, blk.index, hidden[b]) for b, batch in enumerate(runner.batches)]
            if progress is not None:
                progress.advance(task)
        out.update(gptq_head(model, lmap, specs, [runner.final_hidden(h) for h in hidden]))
    return out


def gptq_block(model, linears: list[str], specs: dict[str, QuantSpec], feed: Callable[[], None]) -> dict:
    """GPTQ of one block's Linears: `feed()` runs the calibration batches through the block once while their
    Hessians are collected; each weight is then replaced by its dequantized codes (what later blocks see)."""
    from compress.quantize.gptq import HessianCollector, gptq_quantize

    targets = [p for p in linears if p in specs and specs[p].method == "gptq" and not specs[p].is_float]
    collectors = {p: HessianCollector(model.get_submodule(p), weight_matrix(model.get_submodule(p)).shape[1])
                  for p in targets}
    feed()
    from compress import distributed

    # each Linear's codes depend only on its own weight and Hessian: under torchrun the ranks split them
    codes = distributed.map_split(targets, lambda p: gptq_quantize(weight_matrix(model.get_submodule(p)),
                                                                   collectors[p].result(), specs[p]))
    out = {}
    for p, q in zip(targets, codes, strict=True):
        out[p] = q
        weight_matrix(model.get_submodule(p)).copy_(q.dequantize())
    return out


def gptq_head(model, lmap: LayerMap, specs: dict[str, QuantSpec], finals: list) -> dict:
    """GPTQ of the LM head (or the embedding tied to it) when its spec asks, from the final normed hidden states
    of the quantized stack; {} otherwise."""
    import torch

    from compress.quantize.gptq import gptq_quantize

    head_name = _gptq_head_target(model, lmap, specs)
    if head_name is None:
        return {}
    x = torch.cat([h.reshape(-1, h.shape[-1]) for h in finals]).double()
    w = weight_matrix(model.get_submodule(head_name))
    return {head_name: gptq_quantize(w, 2.0 * x.T @ x / len(x), specs[head_name])}


def _gptq_head_target(model, lmap: LayerMap, specs: dict[str, QuantSpec]) -> str | None:
    """The module whose weight is the LM head's, if its spec asks for GPTQ: the head, or the embedding tied to it."""
    for name in (lmap.head, lmap.embeddings):
        spec = specs.get(name) if name else None
        if spec is not None and spec.method == "gptq" and not spec.is_float:
            if name == lmap.embeddings and not is_tied(model, lmap):
                return None  # an untied embedding is a lookup table: no Hessian, RTN
            return name
    return None


# --method -> handler; the names and their help are compress.quantize.choices.METHOD (checked equal in the tests)
METHOD_HANDLERS: dict[str, MethodHandler] = {
    "rtn": MethodHandler(),
    "hqq": MethodHandler(codes=hqq_codes),
    "gptq": MethodHandler(needs_data=True, codes=gptq_pass),
}
