"""`compress eval` as a function: a model against a reference on the same windows, used by the CLI and by a recipe's
`eval` step, so both measure the same thing.

The text: --data when given; without it (or with 'self') text sampled from the **reference** — never from the
candidate, whose own samples would flatter it. With no reference, from the model itself (there is nothing to flatter).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compress.errors import UserError
from compress.progress import phase
from flows.options import DataOptions, ModelOptions

PROTOCOLS = {"anchors": {"tokens": 3072, "seq_len": 512, "sequential": True}}  # ANCHORS.md: the first 6 x 512, in order


@dataclass
class EvalRequest(DataOptions, ModelOptions):
    """Everything `compress eval` was asked to do."""

    reference: str | None = None
    split: str = "evaluation"
    protocol: str | None = None
    baseline: bool = False  # also evaluate the reference against itself on the same windows (for `compress gate`)
    out: Path | None = None
    sign: bool = True


def check_request(req: EvalRequest) -> None:
    """Everything about the request that needs no model (UserError on bad input)."""
    from compress.inputs import SPLITS

    if req.protocol is not None and req.protocol not in PROTOCOLS:
        raise UserError(f"unknown --protocol '{req.protocol}': use {' or '.join(PROTOCOLS)}")
    if req.split not in SPLITS:
        raise UserError(f"--split {req.split}: use one of {', '.join(SPLITS)}")
    req.check_data()


def run_eval(req: EvalRequest, progress: Any = None, load: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """{"candidate": report dict, "baseline": report dict (with req.baseline)}; --out gets the candidate's report."""
    from compress.data import load_windows
    from compress.evaluate import evaluate

    check_request(req)
    load = load or req.loader()
    window = {"tokens": req.tokens, "seq_len": req.seq_len, "sequential": False, **PROTOCOLS.get(req.protocol, {})}
    cand = load(req.model)
    ref = load(req.reference) if req.reference else None
    with phase("prepare data"):
        windows = load_windows(req.data, ref or cand, split=req.split, seed=req.seed, **window)
    result = {"candidate": evaluate(cand, ref, windows, progress).to_dict()}
    if req.baseline and ref is not None:
        result["baseline"] = evaluate(ref, ref, windows, progress).to_dict()
    if req.out is not None:
        from compress.atomic import write_json

        write_json(req.out, result["candidate"], sign=req.sign)
    return result
