"""llama.cpp's K-quants (Q2_K … Q6_K) in torch, so a plan can measure and store them exactly as llama.cpp runs them.

A row is cut into super-blocks of 256 weights, each into sub-blocks of 16 or 32. Every sub-block gets its own
scale (and, for Q2_K/Q4_K/Q5_K, a min) by llama.cpp's search — make_qkx2_quants for the affine types, make_qx_quants
for the signed ones — weighted by the importance matrix when there is one; those scales are then themselves
rounded to 4–8-bit integers against one fp16 scale per super-block. `dequantize_k` computes what llama.cpp's
dequantize_row_q*_K computes, in the same float32 operations, so exporters/gguf_blocks writes these codes as they
are and the GGUF holds exactly the weights that were measured.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compress.quantize.spec import K_BLOCK, K_SUB, QuantSpec

# sub-block scale (and min) integer range; code range: [0, nmax] (affine) or [-nmax, nmax − 1] (signed)
SCALE_RANGE = {2: (0, 15), 3: (-32, 31), 4: (0, 63), 5: (0, 63), 6: (-128, 127)}
NMAX = {2: 3, 3: 4, 4: 15, 5: 31, 6: 32}
AFFINE_GRID = tuple(-1.0 + 0.1 * k for k in range(21))  # make_qkx2_quants(rmin=-1, rdelta=0.1, nstep=20)
SIGNED_GRID = tuple(0.1 * k for k in range(-9, 10))  # make_qx_quants: iscale = −(nmax + 0.1·is)/max
CHUNK_ELEMENTS = 1 << 17  # weights per step: temporaries under 1 MiB, as compress.quantize.rtn's (9× faster)


@dataclass
class KQuantWeight:
    """Codes [rows, cols] (uint8; signed types offset by nmax), fp16 super-block scales `d` (and `dmin`)
    [rows, super-blocks], integer sub-block scales (and mins) [rows, sub-blocks]."""

    codes: torch.Tensor
    d: torch.Tensor
    dmin: torch.Tensor | None
    sub_scales: torch.Tensor
    sub_mins: torch.Tensor | None
    spec: QuantSpec

    def dequantize(self) -> torch.Tensor:
        """The float32 weight these codes stand for (llama.cpp's dequantization)."""
        return dequantize_k(self.codes, self.d, self.dmin, self.sub_scales, self.sub_mins, self.spec)


def quantize_k(weight: torch.Tensor, spec: QuantSpec, importance: torch.Tensor | None = None) -> KQuantWeight:
    """Q{bits}_K codes of a [rows, cols] weight (cols a multiple of 256), rows in chunks; with `importance` (one
    weight per input column) every search minimizes the importance-weighted error, as llama-quantize --imatrix."""
    rows, cols = weight.shape
    if cols % K_BLOCK:
        raise ValueError(f"{cols} columns are not whole super-blocks of {K_BLOCK}: use spec.for_width first")
    bits, sub = spec.bits, K_SUB[spec.bits]
    signed = spec.symmetric
    dev = weight.device
    codes = torch.empty(rows, cols, dtype=torch.uint8, device=dev)
    d = torch.empty(rows, cols // K_BLOCK, dtype=torch.float16, device=dev)
    dmin = None if signed else torch.empty_like(d)
    sub_scales = torch.empty(rows, cols // sub, dtype=torch.int8 if signed else torch.uint8, device=dev)
    sub_mins = None if signed else torch.empty(rows, cols // sub, dtype=torch.uint8, device=dev)
    step = max(1, CHUNK_ELEMENTS // cols)
    imp = None if importance is None else importance.to(dev).float().clamp_min(0)
    for r in range(0, rows, step):
        x = weight[r:r + step].detach().float().reshape(-1, cols // K_BLOCK, K_BLOCK // sub, sub)
        w = _search_weights(x, imp, signed)
        if signed:
            q, dd, ls = _signed(x, w, bits)
        else:
            q, dd, ls, dm, lm = _affine(x, w, bits)
            dmin[r:r + step], sub_mins[r:r + step] = dm, lm.reshape(x.shape[0], -1).to(torch.uint8)
        codes[r:r + step] = q.reshape(x.shape[0], cols).to(torch.uint8)
        d[r:r + step] = dd
        sub_scales[r:r + step] = ls.reshape(x.shape[0], -1).to(sub_scales.dtype)
    return KQuantWeight(codes, d, dmin, sub_scales, sub_mins, spec)


def dequantize_k(codes: torch.Tensor, d: torch.Tensor, dmin: torch.Tensor | None, sub_scales: torch.Tensor,
                 sub_mins: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    """(d·sc)·q − dmin·m (affine) or (d·sc)·(code − nmax) (signed), in float32 as llama.cpp evaluates it."""
    rows, cols = codes.shape
    sub = K_SUB[spec.bits]
    per = K_BLOCK // sub
    q = codes.float().reshape(rows, -1, sub)
    d1 = (d.float().repeat_interleave(per, dim=1) * sub_scales.float()).unsqueeze(-1)
    if spec.symmetric:
        return (d1 * (q - NMAX[spec.bits])).reshape(rows, cols)
    m1 = (dmin.float().repeat_interleave(per, dim=1) * sub_mins.float()).unsqueeze(-1)
    return (d1 * q - m1).reshape(rows, cols)


def _search_weights(x: torch.Tensor, imp: torch.Tensor | None, signed: bool) -> torch.Tensor:
    """Per-weight importance of the scale searches [R, S, n, sub]: llama.cpp's av_x + |x| (affine) or x² (signed)
    without an importance matrix; imatrix · sqrt(σ² + x²) with one (σ² from the super-block)."""
    sigma2 = (x * x).sum(dim=(-2, -1), keepdim=True) / K_BLOCK * (1 if signed else 2)
    if imp is None:
        return x * x if signed else sigma2.sqrt() + x.abs()
    return imp.reshape(1, x.shape[1], x.shape[2], x.shape[3]) * (sigma2 + x * x).sqrt()


def _affine(x: torch.Tensor, w: torch.Tensor, bits: int):
    """Q2_K/Q4_K/Q5_K: per sub-block (scale, min) by make_qkx2_quants' search, then both quantized against the
    super-block's fp16 d and dmin; codes recomputed on the stored grid."""
    nmax, (_, smax) = NMAX[bits], SCALE_RANGE[bits]
    lo = x.amin(-1, keepdim=True).clamp_max(0)
    hi = x.amax(-1, keepdim=True)
    span = hi - lo
    live = span > 0
    safe = torch.where(live, span, torch.ones_like(span))
    sw, sx = w.sum(-1, keepdim=True), (w * x).sum(-1, keepdim=True)
    best_s, best_m = span / nmax, lo
    best_e = _affine_error(x, w, best_s, best_m, torch.clamp(torch.round((x - lo) * (nmax / safe)), 0, nmax))
    for r in AFFINE_GRID:
        q = torch.clamp(torch.round((x - lo) * ((nmax + r) / safe)), 0, nmax)
        sl, sl2, sxl = (w * q).sum(-1, keepdim=True), (w * q * q).sum(-1, keepdim=True), (w * x * q).sum(-1,
                                                                                                        keepdim=True)
        det = sw * sl2 - sl * sl
        ok = det > 0
        det = torch.where(ok, det, torch.ones_like(det))
        s = (sw * sxl - sx * sl) / det
        m = (sl2 * sx - sl * sxl) / det
        pos = m > 0  # a positive min is not representable: min 0, scale refit alone
        s = torch.where(pos, sxl / sl2.clamp_min(1e-30), s)
        m = torch.where(pos, torch.zeros_like(m), m)
        e = _affine_error(x, w, s, m, q)
        better = ok & (e < best_e)
        best_s, best_m, best_e = (torch.where(better, s, best_s), torch.where(better, m, best_m),
                                  torch.where(better, e, best_e))
    scale = torch.where(live, best_s, torch.zeros_like(best_s)).squeeze(-1).clamp_min(0)
    mins = (-best_m).squeeze(-1).clamp_min(0)
    d, ls = _quantize_scales(scale, smax)
    dmin, lm = _quantize_scales(mins, smax)
    d1 = (d.float().unsqueeze(-1) * ls.float()).unsqueeze(-1)
    m1 = (dmin.float().unsqueeze(-1) * lm.float()).unsqueeze(-1)
    inv = torch.where(d1 > 0, 1.0 / torch.where(d1 > 0, d1, torch.ones_like(d1)), torch.zeros_like(d1))
    q = torch.clamp(torch.round((x + m1) * inv), 0, nmax)
    return q, d, ls, dmin, lm


def _affine_error(x, w, s, m, q) -> torch.Tensor:
    return (w * (s * q + m - x) ** 2).sum(-1, keepdim=True)


def _quantize_scales(values: torch.Tensor, smax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-negative sub-block values [R, S, k] as fp16 d [R, S] × integers in [0, smax]."""
    d = (values.amax(-1) / smax).half()
    df = d.float().unsqueeze(-1)
    inv = torch.where(df > 0, 1.0 / torch.where(df > 0, df, torch.ones_like(df)), torch.zeros_like(df))
    return d, torch.clamp(torch.round(values * inv), 0, smax)


def _signed(x: torch.Tensor, w: torch.Tensor, bits: int):
    """Q3_K/Q6_K: per sub-block the signed scale of make_qx_quants' search, the scales rounded to signed
    integers against the super-block's fp16 d (the largest-magnitude one maps to the most negative integer)."""
    nmax, (smin, smax) = NMAX[bits], SCALE_RANGE[bits]
    idx = x.abs().argmax(-1, keepdim=True)
    peak = x.gather(-1, idx)
    live = peak.abs() > 1e-30
    safe = torch.where(live, peak, torch.ones_like(peak))
    best_num = torch.full_like(peak, -1.0)
    best_s = torch.zeros_like(peak)
    for r in SIGNED_GRID:
        q = torch.clamp(torch.round(x * (-(nmax + r) / safe)), -nmax, nmax - 1)
        sxl, sl2 = (w * x * q).sum(-1, keepdim=True), (w * q * q).sum(-1, keepdim=True)
        ok = sl2 > 0
        num = torch.where(ok, sxl * sxl / torch.where(ok, sl2, torch.ones_like(sl2)), torch.full_like(sl2, -1.0))
        better = num > best_num  # Σw(x − s·q)² at its best s is Σwx² − (Σwxq)²/Σwq²: maximize the second term
        best_num = torch.where(better, num, best_num)
        best_s = torch.where(better, sxl / torch.where(ok, sl2, torch.ones_like(sl2)), best_s)
    scale = torch.where(live, best_s, torch.zeros_like(best_s)).squeeze(-1)  # [R, S, k]
    big = scale.gather(-1, scale.abs().argmax(-1, keepdim=True))  # signed, the largest magnitude
    d = (big.squeeze(-1) / smin).half()
    df = d.float().unsqueeze(-1)
    inv = torch.where(df != 0, 1.0 / torch.where(df != 0, df, torch.ones_like(df)), torch.zeros_like(df))
    ls = torch.clamp(torch.round(scale * inv), smin, smax)
    d1 = (df * ls).unsqueeze(-1)
    inv1 = torch.where(d1 != 0, 1.0 / torch.where(d1 != 0, d1, torch.ones_like(d1)), torch.zeros_like(d1))
    q = torch.clamp(torch.round(x * inv1), -nmax, nmax - 1) + nmax
    return q, d, ls
