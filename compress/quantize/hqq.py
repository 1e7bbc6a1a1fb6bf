"""HQQ-style data-free quantization (Badri & Shaji 2023): keep the min/max scale, optimise a float zero point
per group by half-quadratic splitting on an l_p (p < 1) reconstruction error, which ignores outliers."""

from __future__ import annotations

import torch

from compress.errors import UserError
from compress.quantize.rtn import QuantizedWeight
from compress.quantize.spec import QuantSpec


def _shrink(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Proximal operator of |x|^p: generalised soft thresholding."""
    return torch.sign(x) * torch.relu(x.abs() - (1.0 / beta) * x.abs().clamp_min(1e-12).pow(p - 1))


def hqq_quantize(weight: torch.Tensor, spec: QuantSpec, iters: int = 20, p: float = 0.7, beta: float = 10.0,
                 kappa: float = 1.01) -> QuantizedWeight:
    """Asymmetric codes with an fp16 scale and an optimised fp16 zero point per group."""
    if spec.symmetric:
        raise UserError("the hqq method optimises a zero point: use it with --asymmetric")
    rows, cols = weight.shape
    g = spec.group_for(cols)
    levels = 2**spec.bits - 1
    W = weight.detach().float().reshape(rows, cols // g, g)
    lo, hi = W.amin(-1, keepdim=True), W.amax(-1, keepdim=True)
    scale = ((hi - lo) / levels).half().float().clamp_min(1e-8)
    zero = -lo / scale
    best_zero, best_err = zero.clone(), float("inf")
    for _ in range(iters):
        Wq = torch.clamp(torch.round(W / scale + zero), 0, levels)
        Wr = (Wq - zero) * scale
        err = float((W - Wr).abs().mean())
        if err < best_err:
            best_err, best_zero = err, zero.clone()
        else:
            break
        We = _shrink(W - Wr, beta, p)
        zero = torch.mean(Wq - (W - We) / scale, dim=-1, keepdim=True)
        beta *= kappa
    zero16 = best_zero.half()
    q = torch.clamp(torch.round(W / scale + zero16.float()), 0, levels)
    return QuantizedWeight(q.to(torch.uint8).reshape(rows, cols), scale.half().squeeze(-1), zero16.squeeze(-1), spec)
