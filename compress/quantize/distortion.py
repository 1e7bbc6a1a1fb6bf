"""DistortionTable: per unit (a block's Linears, the embedding, the head) × candidate spec, the measured
divergence when only that unit is quantized, and the bytes it would take. Allocators read it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from compress.importance.context import ScoringContext
from compress.models.runner import hidden_of
from compress.quantize.apply import weight_matrix
from compress.quantize.rtn import quantize_rtn
from compress.quantize.spec import QuantSpec


@dataclass
class Unit:
    """Modules that always share one candidate: a block's Linears, the embedding (with a tied head), the head."""

    name: str
    modules: list[str]
    block: int | None = None


@dataclass
class DistortionTable:
    """distortion[u][c] and sizes[u][c] (bytes) for units × candidates."""

    units: list[Unit]
    candidates: list[QuantSpec]
    distortion: list[list[float]]
    sizes: list[list[int]]
    measure: str
    data: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON form (a candidate the unit may not take has distortion null)."""
        rows = [[None if d == float("inf") else d for d in row] for row in self.distortion]
        return {"units": [asdict(u) for u in self.units], "candidates": [c.to_dict() for c in self.candidates],
                "distortion": rows, "sizes": self.sizes, "measure": self.measure, "data": self.data}


def unit_bytes(model: torch.nn.Module, unit: Unit, spec: QuantSpec, target: str = "torch") -> int:
    """Stored bytes of all of the unit's matrices under `spec`, as `target`'s file stores them."""
    from compress.quantize.targets import stored_bytes

    total = 0
    for name in unit.modules:
        rows, cols = weight_matrix(model.get_submodule(name)).shape
        total += stored_bytes(spec, rows, cols, target)
    return total


@torch.inference_mode()
def measure_kl(ctx: ScoringContext, units: list[Unit], candidates: list[QuantSpec],
               allowed: list[list[bool]] | None = None, anchor: int | None = None,
               imatrix=None) -> DistortionTable:
    """Quantize one unit at a time to each candidate (RTN, fake-quant in place, then restored) and measure the
    divergence of the model's output from the reference on the calibration windows. Candidates a unit may not
    take (`allowed[u][c]` false, e.g. for the deployment target) get an infinite distortion, unmeasured.

    With `anchor` (a candidate index), only that candidate is measured per unit; the others are scaled from it by
    the ratio of the unit's weight quantization error energy Σ‖Q(W) − W‖² (divergence ∝ error energy for small
    errors): one measurement per unit instead of one per candidate.
    """
    from compress import distributed

    model = ctx.loaded.module
    _ = ctx.reference_probs
    allowed = allowed or [[True] * len(candidates) for _ in units]
    options = [[c for c in range(len(candidates)) if allowed[u][c]] for u in range(len(units))]
    picked = [min(opts, key=lambda c: abs(c - anchor)) if anchor is not None else None for opts in options]
    cells = [(u, c) for u, opts in enumerate(options) for c in (opts if anchor is None else [picked[u]])]
    task = ctx.task("distortion", len(distributed.mine(len(cells))))
    values = distributed.map_split(cells, lambda cell: _measure_one(ctx, units[cell[0]], candidates[cell[1]], task,
                                                                     imatrix))
    measured = dict(zip(cells, values, strict=True))  # with torchrun: each rank measured its share of the cells
    table = []
    for u, unit in enumerate(units):
        if anchor is None:
            row = [measured.get((u, c), float("inf")) for c in range(len(candidates))]
        else:
            a = picked[u]
            d = measured[u, a]
            energy = {c: error_energy(model, unit, candidates[c], imatrix=imatrix) for c in options[u]}
            row = [d * energy[c] / energy[a] if c in energy and energy[a] > 0 else (d if c in energy else float("inf"))
                   for c in range(len(candidates))]
        table.append(row)
    sizes = [[unit_bytes(model, unit, c) for c in candidates] for unit in units]
    measure = ctx.divergence_name + (", importance-weighted RTN" if imatrix is not None else "") + (
        "" if anchor is None else f" (measured at {candidates[anchor].label()}, "
                                                               "scaled by weight error energy)")
    return DistortionTable(units, candidates, table, sizes, measure, ctx.windows.describe())


def _measure_one(ctx: ScoringContext, unit: Unit, spec: QuantSpec, task, imatrix=None) -> float:
    """Divergence from the reference with only `unit` quantized to `spec` (weights restored afterwards)."""
    model, r = ctx.loaded.module, ctx.runner
    originals = {n: weight_matrix(model.get_submodule(n)).detach().clone() for n in unit.modules}
    try:
        for n, w in originals.items():
            weight_matrix(model.get_submodule(n)).copy_(_fake_quant(w, spec, importance_of(imatrix, n)))
        vals = []
        for b, batch in enumerate(r.batches):
            if unit.block is not None:
                last = r.run_from(batch, unit.block, batch.inputs[unit.block])
            else:
                last = _full_last_hidden(ctx, batch)
            vals.append(ctx.divergence(b, last))
    finally:
        for n, w in originals.items():
            weight_matrix(model.get_submodule(n)).copy_(w)
    ctx.advance(task)
    return float(torch.cat(vals).mean())


def _fake_quant(w: torch.Tensor, spec: QuantSpec, importance: torch.Tensor | None = None) -> torch.Tensor:
    if spec.is_float:
        return w.half().float() if spec.bits == 16 else w
    return quantize_rtn(w, spec, importance).dequantize()


def importance_of(imatrix, name: str) -> torch.Tensor | None:
    """The importance of module `name`'s input columns, or None (no matrix, or a module it has no entry for)."""
    if imatrix is None:
        return None
    return imatrix.mean(name)


def error_energy(model: torch.nn.Module, unit: Unit, spec: QuantSpec, row_step: int = 4, imatrix=None) -> float:
    """Σ‖Q(W) − W‖² over the unit's matrices under `spec` (each column weighted by its importance when `imatrix`
    is given), estimated from every `row_step`-th row (rows are quantized independently, so the estimate is
    unbiased and only ratios of it are used), scaled to all rows."""
    total = 0.0
    for n in unit.modules:
        w = weight_matrix(model.get_submodule(n)).detach().float()
        rows = w[::row_step]
        imp = importance_of(imatrix, n)
        err = (_fake_quant(rows, spec, imp) - rows) ** 2
        if imp is not None:
            err = err * imp.to(err.device)
        total += float(err.sum()) * w.shape[0] / rows.shape[0]
    return total


def _full_last_hidden(ctx: ScoringContext, batch) -> torch.Tensor:
    """Embedding changed: rerun the whole stack from the token ids; return the last block's output."""
    r = ctx.runner
    base = getattr(r.model, "base_model", r.model)
    kwargs = {"use_cache": False} if ctx.loaded.kind == "decoder" else {}
    captured = []
    handle = r.blocks[len(r.blocks) - 1].register_forward_hook(lambda m, a, out: captured.append(hidden_of(out)))
    try:
        base(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **kwargs)
    finally:
        handle.remove()
    return captured[0]
