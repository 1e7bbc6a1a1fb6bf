"""The diagonal Fisher of the calibration loss, and the distortion table it predicts (`--measure fisher`): every
unit × candidate as ½ Σ F ΔW², with no replay of the model."""

from __future__ import annotations

import torch

from compress.quantize.apply import weight_matrix
from compress.quantize.distortion import DistortionTable, Unit, _fake_quant, unit_bytes
from compress.quantize.spec import QuantSpec


def fisher_squares(model: torch.nn.Module, names: list[str], windows, advance=None) -> dict[str, torch.Tensor]:
    """The diagonal empirical Fisher of each named module's weight: the mean over calibration windows of the squared
    gradient of the window's next-token NLL, in weight_matrix orientation ([out, in]; tied weights once)."""
    raw = {p: model.get_submodule(p).weight for p in names}
    flags = {p: w.requires_grad for p, w in raw.items()}
    sq = {p: torch.zeros_like(raw[p], dtype=torch.float32) for p in names}
    try:
        for p in names:
            raw[p].requires_grad_(True)
        with torch.enable_grad():
            for ids, mask in zip(windows.input_ids, windows.attention_mask, strict=True):
                model.zero_grad(set_to_none=True)
                loss = model(input_ids=ids[None], attention_mask=mask[None], labels=ids[None], use_cache=False).loss
                loss.backward()
                done: set[int] = set()
                for p in names:
                    if id(raw[p]) not in done:  # a tied weight's gradient holds both uses: count it once
                        sq[p] += raw[p].grad.detach().float() ** 2
                        done.add(id(raw[p]))
                if advance is not None:
                    advance()
    finally:
        model.zero_grad(set_to_none=True)
        for p, f in flags.items():
            raw[p].requires_grad_(f)
    n = len(windows.input_ids)
    return {p: (sq[p] / n).t() if type(model.get_submodule(p)).__name__ == "Conv1D" else sq[p] / n for p in names}


def predict_fisher(loaded, lmap, windows, units: list[Unit], candidates: list[QuantSpec],
                   allowed: list[list[bool]] | None = None, progress=None) -> DistortionTable:
    """Predicted divergence of every unit × candidate with no replay: ½ Σ F ΔW² over the unit's weights, F the
    diagonal Fisher of the calibration NLL (one forward and backward per window), ΔW the candidate's RTN error.
    KL(p ‖ p + δ) ≈ ½ δᵀ F δ to second order; the diagonal drops the cross terms."""
    model = loaded.module
    if loaded.kind != "decoder":
        from compress.errors import UserError

        raise UserError("--measure fisher needs a language-model loss: decoders only; use full or fast")
    allowed = allowed or [[True] * len(candidates) for _ in units]
    names = list(dict.fromkeys(m for u in units for m in u.modules))
    task = progress.add_task("fisher", total=len(windows.input_ids)) if progress is not None else None
    g2 = fisher_squares(model, names, windows, (lambda: progress.advance(task)) if progress is not None else None)
    table = []
    with torch.inference_mode():
        for u, unit in enumerate(units):
            row = []
            for c, spec in enumerate(candidates):
                if not allowed[u][c]:
                    row.append(float("inf"))
                    continue
                total = 0.0
                for n in unit.modules:
                    w = weight_matrix(model.get_submodule(n)).detach().float()
                    total += 0.5 * float((g2[n] * (_fake_quant(w, spec) - w) ** 2).sum())
                row.append(total)
            table.append(row)
    sizes = [[unit_bytes(model, unit, c) for c in candidates] for unit in units]
    return DistortionTable(units, candidates, table, sizes, "predicted kl (½ Σ F ΔW², diagonal Fisher of the "
                           "calibration NLL)", windows.describe())
