"""Equivalence of a model before and after a pass: max abs difference relative to the output scale, cosine, and a
pass flag for exact passes (max|a - b| <= rtol * max|a| + atol, fp32)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compress.errors import UserError

RTOL = 1e-4
ATOL = 1e-6


def equivalence(before_model: nn.Module, after_model: nn.Module, sample_inputs: Any, rtol: float = RTOL,
                atol: float = ATOL) -> dict[str, Any]:
    """Run both models (in eval mode) on `sample_inputs` and compare their outputs."""
    return compare(outputs(before_model, sample_inputs), outputs(after_model, sample_inputs), rtol, atol)


@torch.no_grad()
def outputs(model: nn.Module, inputs: Any) -> list[torch.Tensor]:
    """The model's output tensors on `inputs` (a tensor, a tuple of positional args or a dict of kwargs)."""
    was_training = model.training
    model.eval()
    try:
        if isinstance(inputs, dict):
            out = model(**inputs)
        elif isinstance(inputs, (tuple, list)):
            out = model(*inputs)
        else:
            out = model(inputs)
    finally:
        model.train(was_training)
    tensors = _tensors(out)
    if not tensors:
        raise UserError(f"{type(model).__name__}: its output has no tensors to compare ({type(out).__name__})")
    return [t.detach().clone() for t in tensors]


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "to_tuple") and hasattr(out, "keys"):  # transformers ModelOutput
        for key in ("logits", "last_hidden_state"):
            if getattr(out, key, None) is not None:
                return [getattr(out, key)]
        return [t for v in out.to_tuple() for t in _tensors(v)]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _tensors(v)]
    return []


def compare(reference: list[torch.Tensor], actual: list[torch.Tensor], rtol: float = RTOL,
            atol: float = ATOL) -> dict[str, Any]:
    """Max abs diff, output scale, their ratio, cosine and the pass flag over all output tensors together."""
    if len(reference) != len(actual) or any(a.shape != b.shape for a, b in zip(reference, actual, strict=True)):
        return {"checked": True, "pass": False, "reason": "output shapes differ",
                "shapes_before": [list(t.shape) for t in reference], "shapes_after": [list(t.shape) for t in actual]}
    a = torch.cat([t.detach().double().flatten() for t in reference])
    b = torch.cat([t.detach().double().flatten() for t in actual])
    finite = bool(torch.isfinite(a).all() and torch.isfinite(b).all())
    diff = float((a - b).abs().max()) if a.numel() else 0.0
    scale = float(a.abs().max()) if a.numel() else 0.0
    denom = float(a.norm() * b.norm())
    cosine = float(a @ b) / denom if denom > 0 else (1.0 if diff == 0 else 0.0)
    tolerance = rtol * scale + atol
    return {"checked": True, "pass": finite and diff <= tolerance, "max_abs_diff": diff, "output_scale": scale,
            "rel_diff": diff / scale if scale > 0 else diff, "cosine": cosine, "tolerance": tolerance,
            "rtol": rtol, "atol": atol, "finite": finite, "outputs": len(reference),
            "elements": int(a.numel())}


def default_inputs(model: nn.Module, batch: int = 2, seed: int = 0, size: int = 64, seq_len: int = 12) -> Any:
    """Random inputs guessed from the model: token ids for transformers models, images/sequences/vectors from the
    first Conv/Linear layer otherwise. UserError when nothing fits (pass sample_inputs)."""
    g = torch.Generator().manual_seed(seed)
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if vocab:
        ids = torch.randint(0, int(vocab), (batch, seq_len), generator=g)
        inputs: dict[str, Any] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if getattr(config, "is_decoder", False) or "CausalLM" in type(model).__name__:
            inputs["use_cache"] = False
        return inputs
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            dims = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}.get(type(m), len(m.kernel_size))
            in_ch = m.in_channels if not isinstance(m, nn.modules.conv._ConvTransposeNd) else m.in_channels
            side = size if dims < 3 else 16
            return torch.randn(batch, in_ch, *([side] * dims), generator=g).to(dtype)
        if isinstance(m, nn.Linear):
            return torch.randn(batch, m.in_features, generator=g).to(dtype)
        if isinstance(m, nn.Embedding):
            return torch.randint(0, m.num_embeddings, (batch, seq_len), generator=g)
    raise UserError(f"{type(model).__name__}: cannot guess sample inputs (no Conv, Linear or Embedding found); "
                    "pass sample_inputs")
