"""`compress eval`: a candidate against a reference on evaluation windows -> EvalReport (one JSON object)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from compress import distributed
from compress.data import Windows
from compress.errors import UserError
from compress.metrics import (
    cosine_distance,
    kl_per_token,
    log_softmax_chunked,
    next_token_nll,
    perplexity,
    pool_embedding,
    state_hash,
    summarize,
    top1_agreement,
    weight_footprint,
)
from compress.models.hf import LoadedModel
from compress.version import __version__


@dataclass
class EvalReport:
    """Quality and size of a candidate, relative to a reference where one is given (null where not applicable)."""

    model: str
    reference: str | None
    ppl: float | None
    ppl_ref: float | None
    kl_mean: float | None
    kl_median: float | None
    kl_p99: float | None
    top1_agreement: float | None
    emb_cosine: float | None
    size_bytes: int
    bpw: float
    tokens: int
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def evaluate(candidate: LoadedModel, reference: LoadedModel | None, windows: Windows,
             progress: object | None = None) -> EvalReport:
    """Run both models window by window; KL and top-1 per token over the full vocabulary (decoders)."""
    if reference is not None and reference.kind != candidate.kind:
        raise UserError(f"--reference {reference.spec} is a {reference.kind} but {candidate.spec} is a "
                        f"{candidate.kind}: compare models of the same kind")
    foot = weight_footprint(candidate.module)
    share = len(distributed.mine(len(windows.input_ids))) if candidate.kind == "decoder" else len(windows.input_ids)
    task = progress.add_task("eval", total=share) if progress is not None else None
    fn = _eval_decoder if candidate.kind == "decoder" else _eval_encoder
    metrics = fn(candidate, reference, windows, progress, task)
    provenance = {
        "tool_version": __version__,
        "data": windows.describe(),
        "windows_sha256": windows.data_hash,
        "model_sha256": state_hash(candidate.module),
        "reference_sha256": state_hash(reference.module) if reference is not None else None,
    }
    return EvalReport(model=candidate.spec, reference=reference.spec if reference else None,
                      size_bytes=int(foot["size_bytes"]), bpw=round(float(foot["bpw"]), 4),
                      tokens=windows.num_tokens, provenance=provenance, **metrics)


def _eval_decoder(cand: LoadedModel, ref: LoadedModel | None, windows: Windows, progress, task) -> dict:
    """Per-token NLL, KL and top-1 of each window, then their summaries. Under torchrun each rank runs its share of
    the windows and all receive every window's values (compress.distributed.map_split): the same numbers as one
    process, since each window is computed alone."""

    @torch.inference_mode()
    def one(w: int) -> tuple[torch.Tensor, ...]:
        ids, mask = windows.input_ids[w].unsqueeze(0), windows.attention_mask[w].unsqueeze(0)
        logits = cand.module(input_ids=ids, attention_mask=mask, use_cache=False).logits
        out = (next_token_nll(logits, ids).reshape(-1),)
        if ref is not None:
            ref_logits = ref.module(input_ids=ids, attention_mask=mask, use_cache=False).logits
            if ref_logits.shape[-1] != logits.shape[-1]:
                raise UserError(f"--reference {ref.spec} has a vocabulary of {ref_logits.shape[-1]} tokens, "
                                f"{cand.spec} of {logits.shape[-1]}: KL needs the same vocabulary")
            out += (next_token_nll(ref_logits, ids).reshape(-1),
                    kl_per_token(log_softmax_chunked(ref_logits), logits).reshape(-1),
                    top1_agreement(ref_logits, logits).reshape(-1))
        if progress is not None:
            progress.advance(task)
        return out

    per_window = distributed.map_split(range(len(windows.input_ids)), one)
    return window_metrics(per_window, ref is not None)


def window_metrics(per_window: list[tuple[torch.Tensor, ...]], with_reference: bool) -> dict:
    """The report's metrics from each window's (NLL[, reference NLL, KL, top-1]) per token, windows in order."""
    cols = [torch.cat(c) for c in zip(*per_window, strict=True)]
    out: dict[str, float | None] = {"ppl": perplexity(cols[0]), "ppl_ref": None, "kl_mean": None,
                                    "kl_median": None, "kl_p99": None, "top1_agreement": None, "emb_cosine": None}
    if with_reference:
        stats = summarize(cols[2])
        out.update(ppl_ref=perplexity(cols[1]), kl_mean=stats["mean"], kl_median=stats["median"],
                   kl_p99=stats["p99"], top1_agreement=float(cols[3].mean()))
    return out


@torch.inference_mode()
def _eval_encoder(cand: LoadedModel, ref: LoadedModel | None, windows: Windows, progress, task) -> dict:
    if ref is None:
        raise UserError(f"{cand.spec} is an encoder: its metric is embedding cosine to a reference; pass --reference")
    cos = []
    for s in range(0, len(windows.input_ids), 8):
        ids, mask = windows.input_ids[s:s + 8], windows.attention_mask[s:s + 8]
        a = pool_embedding(cand.module(input_ids=ids, attention_mask=mask).last_hidden_state, mask, cand.pooling)
        b = pool_embedding(ref.module(input_ids=ids, attention_mask=mask).last_hidden_state, mask, ref.pooling)
        cos.append(1.0 - cosine_distance(b, a))
        if progress is not None:
            progress.advance(task, len(ids))
    return {"ppl": None, "ppl_ref": None, "kl_mean": None, "kl_median": None, "kl_p99": None,
            "top1_agreement": None, "emb_cosine": float(torch.cat(cos).mean())}
