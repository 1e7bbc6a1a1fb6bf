"""`compress eval`: a candidate against a reference on evaluation windows -> EvalReport (one JSON object)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

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
    task = progress.add_task("eval", total=len(windows.input_ids)) if progress is not None else None
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


@torch.inference_mode()
def _eval_decoder(cand: LoadedModel, ref: LoadedModel | None, windows: Windows, progress, task) -> dict:
    nll, nll_ref, kl, top1 = [], [], [], []
    for ids, mask in zip(windows.input_ids, windows.attention_mask, strict=True):
        ids, mask = ids.unsqueeze(0), mask.unsqueeze(0)
        logits = cand.module(input_ids=ids, attention_mask=mask, use_cache=False).logits
        nll.append(next_token_nll(logits, ids).reshape(-1))
        if ref is not None:
            ref_logits = ref.module(input_ids=ids, attention_mask=mask, use_cache=False).logits
            if ref_logits.shape[-1] != logits.shape[-1]:
                raise UserError(f"--reference {ref.spec} has a vocabulary of {ref_logits.shape[-1]} tokens, "
                                f"{cand.spec} of {logits.shape[-1]}: KL needs the same vocabulary")
            nll_ref.append(next_token_nll(ref_logits, ids).reshape(-1))
            kl.append(kl_per_token(log_softmax_chunked(ref_logits), logits).reshape(-1))
            top1.append(top1_agreement(ref_logits, logits).reshape(-1))
        if progress is not None:
            progress.advance(task)
    out: dict[str, float | None] = {"ppl": perplexity(torch.cat(nll)), "ppl_ref": None, "kl_mean": None,
                                    "kl_median": None, "kl_p99": None, "top1_agreement": None, "emb_cosine": None}
    if ref is not None:
        stats = summarize(torch.cat(kl))
        out.update(ppl_ref=perplexity(torch.cat(nll_ref)), kl_mean=stats["mean"], kl_median=stats["median"],
                   kl_p99=stats["p99"], top1_agreement=float(torch.cat(top1).mean()))
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
