"""Healing: a short distillation of a pruned model toward the original on calibration windows ("Model compression
via distillation and quantization"). Decoders minimise per-token KL(original ‖ pruned) over the full vocabulary;
encoders 1 − cosine of the pooled embeddings. CPU-sized: a few dozen steps of one window each, AdamW.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from compress.data import Windows
from compress.errors import UserError
from compress.metrics import pool_embedding
from compress.models.hf import LoadedModel


def heal(student: LoadedModel, teacher: LoadedModel, windows: Windows, steps: int, lr: float = 5e-5,
         progress=None) -> dict:
    """Train `student` in place for `steps` windows (cycling) toward `teacher`; returns the loss curve and time."""
    if steps < 1:
        raise UserError(f"--heal {steps}: give a positive number of steps")
    if student.kind != teacher.kind:
        raise UserError(f"cannot heal a {student.kind} toward a {teacher.kind}")
    model = student.module
    params = list(model.parameters())
    if not params:
        raise UserError(f"{student.spec}: no trainable parameters to heal")
    targets = [t.clone() for t in _teacher_outputs(teacher, windows)]  # normal tensors: autograd may save them
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    task = progress.add_task("heal", total=steps) if progress is not None else None
    losses, t0 = [], time.perf_counter()
    model.eval()  # no dropout: the teacher's targets are deterministic, so is the student
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        for step in range(steps):
            i = step % len(windows.input_ids)
            loss = _loss(student, windows, i, targets[i])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(float(loss.detach()))
            if progress is not None:
                progress.advance(task)
    finally:
        opt.zero_grad(set_to_none=True)
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)
    first = sum(losses[: len(windows.input_ids)]) / min(len(losses), len(windows.input_ids))
    last = sum(losses[-len(windows.input_ids):]) / min(len(losses), len(windows.input_ids))
    return {"steps": steps, "lr": lr, "windows": len(windows.input_ids), "tokens_per_step": windows.seq_len,
            "loss": "kl" if student.kind == "decoder" else "1-cos", "loss_first_pass": first,
            "loss_last_pass": last, "losses": losses, "seconds": round(time.perf_counter() - t0, 2)}


@torch.inference_mode()
def _teacher_outputs(teacher: LoadedModel, windows: Windows) -> list[torch.Tensor]:
    """Per window: the teacher's log-probs [1, L, V] (decoders) or pooled embedding [1, d] (encoders)."""
    out = []
    for ids, mask in zip(windows.input_ids, windows.attention_mask, strict=True):
        ids, mask = ids.unsqueeze(0), mask.unsqueeze(0)
        if teacher.kind == "decoder":
            logits = teacher.module(input_ids=ids, attention_mask=mask, use_cache=False).logits
            out.append(F.log_softmax(logits.float(), -1))
        else:
            hidden = teacher.module(input_ids=ids, attention_mask=mask).last_hidden_state
            out.append(pool_embedding(hidden, mask, teacher.pooling))
    return out


def _loss(student: LoadedModel, windows: Windows, i: int, target: torch.Tensor) -> torch.Tensor:
    ids, mask = windows.input_ids[i:i + 1].clone(), windows.attention_mask[i:i + 1].clone()  # may be inference
    if student.kind == "decoder":
        logits = student.module(input_ids=ids, attention_mask=mask, use_cache=False).logits
        logq = F.log_softmax(logits.float(), -1)
        kl = (target.exp() * (target - logq)).sum(-1)  # [1, L]
        return (kl * mask).sum() / mask.sum()
    hidden = student.module(input_ids=ids, attention_mask=mask).last_hidden_state
    emb = pool_embedding(hidden, mask, student.pooling)
    return 1 - F.cosine_similarity(emb, target, dim=-1).mean()
