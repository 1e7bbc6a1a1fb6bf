"""Importance scorers: a registry name -> scorer, each filling one ImportanceReport."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from compress.data import Windows
from compress.errors import UserError
from compress.importance import ablation, lim, sensitivity, zd
from compress.importance.context import ScoringContext
from compress.importance.report import ImportanceReport, Scores
from compress.models.hf import LoadedModel
from compress.models.layers import LayerMap, layer_map
from compress.version import __version__


@dataclass(frozen=True)
class Scorer:
    """A registered scorer: the function, which way is important, and whether it reads data."""

    fn: Callable[[ScoringContext], Scores]
    direction: str
    needs_data: bool


SCORERS: dict[str, Scorer] = {
    "lim": Scorer(lim.score, lim.DIRECTION, True),
    "zd": Scorer(zd.score, zd.DIRECTION, False),
    "ablation": Scorer(ablation.score, ablation.DIRECTION, True),
    "sensitivity": Scorer(sensitivity.score_sensitivity, sensitivity.DIRECTION, True),
    "hessian": Scorer(sensitivity.score_hessian, sensitivity.DIRECTION, True),
    "fisher": Scorer(sensitivity.score_fisher, sensitivity.DIRECTION, True),
    "imatrix": Scorer(sensitivity.score_imatrix, sensitivity.DIRECTION, True),
}
CHEAP = ("lim", "zd", "ablation", "hessian", "fisher", "imatrix")  # what `--check` compares with measured sensitivity
ALIASES = {"bi": "lim"}  # ShortGPT's Block Influence is the same quantity as LIM


def parse_methods(text: str) -> list[str]:
    """'lim,zd,bi' -> ['lim', 'zd', 'bi'], validated against the registry."""
    names = [m.strip().lower() for m in text.split(",") if m.strip()]
    if not names:
        raise UserError("--methods is empty: name one or more of " + ", ".join([*SCORERS, *ALIASES]))
    for m in names:
        if ALIASES.get(m, m) not in SCORERS:
            raise UserError(f"unknown scorer '{m}' in --methods: known are {', '.join([*SCORERS, *ALIASES])}")
    return list(dict.fromkeys(names))


def score_model(
    loaded: LoadedModel,
    windows: Windows | None,
    methods: list[str],
    lmap: LayerMap | None = None,
    progress: object | None = None,
) -> ImportanceReport:
    """Run `methods` on `loaded` over `windows` and collect everything into one ImportanceReport."""
    lmap = lmap or layer_map(loaded.module)
    ctx = ScoringContext(loaded, lmap, windows, progress)  # type: ignore[arg-type]
    results: dict[str, Scores] = {}
    timings: dict[str, float] = {}
    for m in methods:
        real = ALIASES.get(m, m)
        if real in results:
            results[m] = results[real]
            timings[m] = 0.0
            continue
        scorer = SCORERS[real]
        if scorer.needs_data and windows is None:
            raise UserError(f"scorer '{m}' needs data: pass --data")
        t0 = time.perf_counter()
        results[m] = scorer.fn(ctx)
        timings[m] = round(time.perf_counter() - t0, 3)
    report = _assemble(loaded, lmap, windows, ctx, methods, results, timings)
    if "sensitivity" in methods:
        report.checks = rank_check(report)
    return report


def rank_check(report: ImportanceReport) -> dict:
    """Spearman rank correlation of each cheap score with the measured per-block ΔKL at 3 bits (`sensitivity`)."""
    from scipy.stats import spearmanr

    target = report.block_scores("sensitivity")
    out = {"against": "sensitivity: measured divergence with one block RTN-quantized to 3 bits, group 32"}
    for m in report.methods:
        if m == "sensitivity" or ALIASES.get(m, m) not in CHEAP:
            continue
        values = report.block_scores(m)
        sign = 1.0 if report.direction[m].startswith("higher") else -1.0
        rho, p = spearmanr([sign * v for v in values], target)
        out[m] = {"spearman": round(float(rho), 4), "p_value": float(p)}
    return out


def _assemble(loaded, lmap, windows, ctx, methods, results, timings) -> ImportanceReport:
    blocks, sublayers, linears = [], [], []
    for blk in lmap.blocks:
        blocks.append({"index": blk.index, "path": blk.path, "params": blk.params,
                       "scores": {m: results[m].blocks.get(blk.index) for m in methods}})
        for name, sub in blk.sublayers.items():
            sublayers.append({"block": blk.index, "name": name, "path": sub.paths[0], "params": sub.params,
                              "scores": {m: results[m].sublayers.get((blk.index, name)) for m in methods}})
        for path in blk.linears:
            vals = {m: results[m].linears[path] for m in methods if path in results[m].linears}
            if vals:
                linears.append({"block": blk.index, "path": path, "scores": vals})
    return ImportanceReport(
        model=loaded.spec, family=lmap.family, kind=loaded.kind, divergence=ctx.divergence_name,
        data=windows.describe() if windows is not None else {}, methods=methods,
        direction={m: SCORERS[ALIASES.get(m, m)].direction for m in methods},
        blocks=blocks, sublayers=sublayers, linears=linears, timings_s=timings, tool_version=__version__,
    )


__all__ = ["ImportanceReport", "SCORERS", "Scorer", "Scores", "parse_methods", "register", "score_model"]
