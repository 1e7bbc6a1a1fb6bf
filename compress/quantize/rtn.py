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


# Weights per step of quantize / dequantize: 512 KB float temporaries. They stay in cache, and under 1 MiB they come
# from the heap even after release_freed_memory (compress.stream.lazy) has every allocation of 1 MiB or more mapped
# and unmapped on its own: with 16 MB steps the importance-weighted search ran 9× slower in a streamed run, each
# temporary a fresh mapping. The result is the same whatever the step (rows are independent).
CHUNK_ELEMENTS = 1 << 17


def quantize_rtn(weight: torch.Tensor, spec: QuantSpec, importance: torch.Tensor | None = None):
    """Round-to-nearest quantization of a [rows, cols] weight along groups of its input axis (rows in chunks:
    groups never cross rows, so the result is the same as in one step). With `importance` (one weight per input
    column: the importance matrix), each group's scale and zero minimize the importance-weighted error
    (`weighted_params`) instead of spanning min/max. A K-quant spec gives llama.cpp's K-quant codes (a
    KQuantWeight, compress.quantize.kquant) or, for a width that is not whole super-blocks, its group fallback."""
    rows, cols = weight.shape
    spec = spec.for_width(cols)
    if spec.kquant:
        from compress.quantize.kquant import quantize_k

        return quantize_k(weight, spec, importance)
    g = spec.group_for(cols)
    step = max(1, CHUNK_ELEMENTS // cols)
    dev = weight.device
    codes = torch.empty(rows, cols, dtype=torch.uint8, device=dev)
    scales = torch.empty(rows, cols // g, dtype=torch.float16, device=dev)
    zeros = None if spec.symmetric else torch.empty(rows, cols // g, dtype=torch.uint8, device=dev)
    for r in range(0, rows, step):
        w = weight[r:r + step].detach().float().reshape(-1, cols // g, g)
        if importance is None:
            scale, zero = group_params(w, spec)
        else:
            scale, zero = weighted_params(w, spec, _column_weights(importance.to(dev), cols, g))
        codes[r:r + step] = codes_for(w, scale, zero, spec).to(torch.uint8).reshape(-1, cols)
        scales[r:r + step] = scale.squeeze(-1)
        if zeros is not None:
            zeros[r:r + step] = zero.squeeze(-1).to(torch.uint8)
    return QuantizedWeight(codes, scales, zeros, spec)


SCALE_GRID = tuple(0.80 + 0.02 * k for k in range(16))  # 0.80 … 1.10: scale factors tried around min/max's


def weighted_params(w: torch.Tensor, spec: QuantSpec, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per group of `w` [rows, groups, g], the (fp16 scale, zero) minimizing Σ a·(w − dequant(codes))², `a`
    [1, groups, g] the column weights: min/max's scale times each factor of SCALE_GRID, then a weighted
    least-squares refit of the best one's codes (llama.cpp's make_qx_quants; llm-compressor's imatrix_mse). Each
    candidate is judged on its own codes with its fp16 scale, min/max's among them: never worse than plain RTN."""
    base, base_zero = group_params(w, spec)
    best_s, best_z, best_e = base, base_zero, _weighted_error(w, spec, a, base, base_zero)
    levels = 2**spec.bits - 1
    for f in SCALE_GRID:
        s = (base.float() * f).half()
        z = None if base_zero is None else _zero_for(w, s, levels)
        best_s, best_z, best_e = _keep_better(w, spec, a, s, z, best_s, best_z, best_e)
    s, z = _refit(w, spec, a, best_s, best_z)
    return _keep_better(w, spec, a, s, z, best_s, best_z, best_e)[:2]


def _column_weights(importance: torch.Tensor, cols: int, g: int) -> torch.Tensor:
    """The importance as [1, groups, g] weights, floored at 1e-6 of its mean so no column is ignored entirely."""
    a = importance.float().reshape(1, cols // g, g)
    return a.clamp_min(float(a.mean()) * 1e-6 + 1e-30)


def _zero_for(w: torch.Tensor, scale: torch.Tensor, levels: int) -> torch.Tensor:
    """The integer zero point that puts each group's minimum on code 0 at `scale`."""
    return torch.clamp(torch.floor(-w.amin(dim=-1, keepdim=True) * _inverse(scale) + 0.5), 0, levels)


def _weighted_error(w, spec, a, scale, zero) -> torch.Tensor:
    """Σ a·(w − dequant)² per group with the codes `scale` and `zero` give."""
    q = codes_for(w, scale, zero, spec)
    off = 2 ** (spec.bits - 1) if zero is None else zero
    return (a * (w - (q - off) * scale.float()) ** 2).sum(-1, keepdim=True)


def _keep_better(w, spec, a, scale, zero, best_s, best_z, best_e):
    """The better of (scale, zero) and the best so far, group by group."""
    valid = torch.isfinite(scale.float())
    if spec.symmetric and spec.positive_scale:
        valid &= scale.float() > 0
    e = torch.where(valid, _weighted_error(w, spec, a, scale, zero), torch.full_like(best_e, float("inf")))
    better = e < best_e
    best_s = torch.where(better, scale, best_s)
    if zero is not None:
        best_z = torch.where(better, zero, best_z)
    return best_s, best_z, torch.where(better, e, best_e)


def _refit(w, spec, a, scale, zero) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weighted least squares for the grid given by the codes of (scale, zero): w ≈ s·q (symmetric) or
    w ≈ s·c + m with zero = −m/s rounded (asymmetric)."""
    q = codes_for(w, scale, zero, spec)
    if zero is None:
        q = q - 2 ** (spec.bits - 1)
        den = (a * q * q).sum(-1, keepdim=True)
        s = torch.where(den > 0, (a * w * q).sum(-1, keepdim=True) / den.clamp_min(1e-30), scale.float())
        return s.half(), None
    sa, sc, sw = a.sum(-1, keepdim=True), (a * q).sum(-1, keepdim=True), (a * w).sum(-1, keepdim=True)
    scc, scw = (a * q * q).sum(-1, keepdim=True), (a * q * w).sum(-1, keepdim=True)
    det = sa * scc - sc * sc
    ok = det.abs() > 1e-30
    s = torch.where(ok, (sa * scw - sc * sw) / torch.where(ok, det, torch.ones_like(det)), scale.float())
    m = torch.where(ok, (sw - s * sc) / sa.clamp_min(1e-30), -zero * scale.float())
    s16 = s.half()
    inv = _inverse(s16)
    z = torch.clamp(torch.floor(-m * inv + 0.5), 0, 2**spec.bits - 1)
    return s16, z


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    """(code − zero) × scale per group; symmetric codes are offset by 2^(b−1)."""
    rows, cols = codes.shape
    g = spec.group_for(cols)
    step = max(1, CHUNK_ELEMENTS // cols)
    out = torch.empty(rows, cols, dtype=torch.float32, device=codes.device)
    for r in range(0, rows, step):
        zero = 2 ** (spec.bits - 1) if zeros is None else zeros[r:r + step].float().unsqueeze(-1)
        q = codes[r:r + step].reshape(-1, cols // g, g).float() - zero
        out[r:r + step] = (q * scales[r:r + step].float().unsqueeze(-1)).reshape(-1, cols)
    return out


def _inverse(scale: torch.Tensor) -> torch.Tensor:
    s = scale.float()
    return torch.where(s != 0, 1.0 / s, torch.zeros_like(s))
