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
from flows.options import DataOptions, ModelOptions, StreamOptions

PROTOCOLS = {"anchors": {"tokens": 3072, "seq_len": 512, "sequential": True}}  # ANCHORS.md: the first 6 x 512, in order


@dataclass
class EvalRequest(StreamOptions, DataOptions, ModelOptions):
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
    req.check_stream()


def run_eval(req: EvalRequest, progress: Any = None, load: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """{"candidate": report dict, "baseline": report dict (with req.baseline)}; --out gets the candidate's report."""
    from compress.data import load_windows
    from compress.evaluate import evaluate

    check_request(req)
    load = load or req.loader()
    window = {"tokens": req.tokens, "seq_len": req.seq_len, "sequential": False, **PROTOCOLS.get(req.protocol, {})}
    choices = [req.stream_choice(s) for s in (req.model, req.reference) if s]
    if any(c.stream for c in choices):
        return _run_streaming(req, choices, window, progress)
    req.compute_device(streamed=False)
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


def _run_streaming(req: EvalRequest, choices: list, window: dict, progress: Any) -> dict[str, Any]:
    """run_eval with both models read block by block from disk (either did not fit, or --stream on)."""
    from compress.data import load_windows
    from compress.stream.decide import decide
    from compress.stream.evaluate import evaluate_streaming
    from compress.stream.lazy import open_lazy

    if req.data in (None, "self"):
        raise UserError("--stream: --data self samples text from the whole model; pass --data FILE")
    paths = [c.path if c.stream else decide(s, "on").path for c, s in zip(choices, (req.model, req.reference),
                                                                           strict=False)]
    device = req.compute_device(streamed=True)
    cand = open_lazy(paths[0], req.model, device=device)
    ref = open_lazy(paths[1], req.reference, device=device) if req.reference else None
    with phase("prepare data"):
        windows = load_windows(req.data, (ref or cand).loaded, split=req.split, seed=req.seed, **window)
    result = {"candidate": evaluate_streaming(cand, ref, windows, progress).to_dict()}
    if req.baseline and ref is not None:
        result["baseline"] = evaluate_streaming(open_lazy(paths[1], req.reference, device=device),
                                                open_lazy(paths[1], req.reference, device=device),
                                                windows, progress).to_dict()
    if req.out is not None:
        from compress.atomic import write_json

        write_json(req.out, result["candidate"], sign=req.sign)
    return result
