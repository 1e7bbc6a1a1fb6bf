"""Round-to-nearest group-wise quantization (symmetric and asymmetric) and its exact dequantization.

Symmetric uses llama.cpp's Q4_0 rule generalised to b bits: per group, the scale maps the largest-magnitude
weight (with its sign) to −2^(b−1), so the full signed range [−2^(b−1), 2^(b−1)−1] is used (`positive_scale`:
the smallest positive scale that keeps both signs in range, for TensorRT) — except at 8 bits,
which use the narrow range [−127, 127] (scale = absmax / 127) that TensorRT INT8 and GGUF Q8_0 require; at 8 bits
the lost level costs nothing measurable. Asymmetric maps
[min, max] onto [0, 2^b − 1] with an integer zero point. Scales are fp16 and codes are computed with the fp16
scale actually stored, so dequantization reproduces exactly what was evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compress.quantize.spec import QuantSpec

NARROW_8 = 127  # symmetric 8-bit codes span [-127, 127]


@dataclass
class QuantizedWeight:
    """Unpacked codes [rows, cols] (uint8), fp16 scales [rows, groups], zeros [rows, groups] (uint8, fp16 or None)."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    spec: QuantSpec

    def dequantize(self) -> torch.Tensor:
        """The float32 weight these codes stand for."""
        return dequantize(self.codes, self.scales, self.zeros, self.spec)


def group_params(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (fp16) and integer zero point (float tensor, None if symmetric) of groups along the last axis."""
    if spec.symmetric:
        if spec.bits == 8:
            return (w.abs().amax(dim=-1, keepdim=True) / NARROW_8).half(), None
        half = 2 ** (spec.bits - 1)
        if spec.positive_scale:  # the widest side sets the step: positives reach half − 1, negatives −half
            pos, neg = w.amax(dim=-1, keepdim=True).clamp_min(0), (-w).amax(dim=-1, keepdim=True).clamp_min(0)
            return torch.maximum(pos / (half - 1), neg / half).half(), None
        idx = w.abs().argmax(dim=-1, keepdim=True)
        return (w.gather(-1, idx) / -half).half(), None
    levels = 2**spec.bits - 1
    lo, hi = w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True)
    scale = ((hi - lo) / levels).half()
    zero = torch.clamp(torch.floor(-lo * _inverse(scale) + 0.5), 0, levels)
    return scale, zero


def codes_for(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    """Integer codes (as float) of `w` on the grid of (scale, zero); symmetric codes are offset by 2^(b−1)."""
    inv = _inverse(scale)
    if zero is None:
        half = 2 ** (spec.bits - 1)
        lo, hi = (-NARROW_8, NARROW_8) if spec.bits == 8 else (-half, half - 1)
        return torch.clamp(torch.floor(w * inv + 0.5), lo, hi) + half
    return torch.clamp(torch.floor(w * inv + 0.5) + zero, 0, 2**spec.bits - 1)


CHUNK_ELEMENTS = 1 << 22  # weights per step of quantize / dequantize: bounds the float temporaries to 16 MB


def quantize_rtn(weight: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
    """Round-to-nearest quantization of a [rows, cols] weight along groups of its input axis (rows in chunks:
    groups never cross rows, so the result is the same as in one step)."""
    rows, cols = weight.shape
    g = spec.group_for(cols)
    step = max(1, CHUNK_ELEMENTS // cols)
    codes = torch.empty(rows, cols, dtype=torch.uint8)
    scales = torch.empty(rows, cols // g, dtype=torch.float16)
    zeros = None if spec.symmetric else torch.empty(rows, cols // g, dtype=torch.uint8)
    for r in range(0, rows, step):
        w = weight[r:r + step].detach().float().reshape(-1, cols // g, g)
        scale, zero = group_params(w, spec)
        codes[r:r + step] = codes_for(w, scale, zero, spec).to(torch.uint8).reshape(-1, cols)
        scales[r:r + step] = scale.squeeze(-1)
        if zeros is not None:
            zeros[r:r + step] = zero.squeeze(-1).to(torch.uint8)
    return QuantizedWeight(codes, scales, zeros, spec)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    """(code − zero) × scale per group; symmetric codes are offset by 2^(b−1)."""
    rows, cols = codes.shape
    g = spec.group_for(cols)
    step = max(1, CHUNK_ELEMENTS // cols)
    out = torch.empty(rows, cols, dtype=torch.float32)
    for r in range(0, rows, step):
        zero = 2 ** (spec.bits - 1) if zeros is None else zeros[r:r + step].float().unsqueeze(-1)
        q = codes[r:r + step].reshape(-1, cols // g, g).float() - zero
        out[r:r + step] = (q * scales[r:r + step].float().unsqueeze(-1)).reshape(-1, cols)
    return out


def _inverse(scale: torch.Tensor) -> torch.Tensor:
    s = scale.float()
    return torch.where(s != 0, 1.0 / s, torch.zeros_like(s))
