"""`compress score` as a function: importance of every block and sublayer on calibration windows, used by the CLI and
by a recipe's `score` step."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compress.errors import UserError
from compress.progress import phase
from flows.options import DataOptions, ModelOptions

CHECK_METHODS = ("hessian", "fisher", "imatrix", "sensitivity")  # what --check measures each score against


@dataclass
class ScoreRequest(DataOptions, ModelOptions):
    """Everything `compress score` was asked to do."""

    methods: str = "lim,zd,ablation"
    check: bool = False
    out: Path | None = None
    plot: Path | None = None
    sign: bool = True  # mark --out as written by compress (a recipe's own workdir needs no mark)


def score_methods(req: ScoreRequest) -> list[str]:
    """The scorer names to run (UserError on an unknown one); --check adds the measured references."""
    from compress.importance import parse_methods

    names = parse_methods(req.methods)
    if req.check:
        names = [*names, *[m for m in CHECK_METHODS if m not in names]]
    return names


def run_score(req: ScoreRequest, progress: Any = None, load: Callable[[str], Any] | None = None):
    """Score the model (loaded with `load`, default `load_model`); write --out / --plot; return the report."""
    from compress.data import load_windows
    from compress.importance import ALIASES, SCORERS, score_model

    names = score_methods(req)
    req.check_data()
    loaded = (load or req.loader())(req.model)
    if loaded.kind != "decoder" and "fisher" in names:
        if not req.check:
            raise UserError(f"--methods fisher: {req.model} is an encoder; fisher needs a language-model loss")
        names.remove("fisher")
    windows = None
    if any(SCORERS[ALIASES.get(m, m)].needs_data for m in names):
        with phase("prepare data"):
            windows = load_windows(req.data, loaded, split="calibration", tokens=req.tokens, seq_len=req.seq_len,
                                   seed=req.seed)
    report = score_model(loaded, windows, names, progress=progress)
    if req.out is not None:
        report.save(req.out, sign=req.sign)
    if req.plot is not None:
        from evals.plots import plot_importance

        plot_importance(report, req.plot)
    return report
