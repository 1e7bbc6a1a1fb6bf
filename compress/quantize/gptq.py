"""GPTQ (Frantar et al. 2022): quantize columns one by one, spreading each column's error over the columns not
yet quantized through the inverse Hessian H = 2XᵀX of the layer's calibration inputs.

Blocks are processed in order, each fed with the outputs of the already-quantized blocks before it, so memory
holds one block's Hessians at a time. Columns go in decreasing order of H's diagonal (act-order: the most active
inputs are rounded first, while the most columns are left to absorb their error), and every group's scale (and
zero) is fixed beforehand from the original weights (static groups), chosen to minimise the error weighted by H's
diagonal as importance-weighted RTN does (compress.quantize.rtn.weighted_params): the codes fit the same packed
format and exporters as round-to-nearest. On SmolLM2 at 3 bits (g32, after AWQ) the two together took the
blocks' KL from 0.545 to 0.378 (BENCHMARKS.md, issue 17).
"""

from __future__ import annotations

import torch

from compress.quantize.rtn import QuantizedWeight, codes_for, quantize_rtn
from compress.quantize.spec import QuantSpec


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, block: int = 128,
                  damp: float = 0.01) -> QuantizedWeight:
    """GPTQ of a [rows, cols] weight with Hessian [cols, cols]; returns codes, scales, zeros like RTN."""
    rows, cols = weight.shape
    g = spec.group_for(cols)
    W = weight.detach().double().clone()
    H = hessian.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=H.dtype, device=H.device)
    scales, zeros = _static_groups(W, torch.diag(H), spec)
    order = torch.argsort(torch.diag(H), descending=True, stable=True)
    W, H = W[:, order], H[order][:, order]
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    group = order // g  # the group of each column, in processing order
    col_scale = scales.float()[:, group]  # [rows, cols] in processing order
    col_zero = (zeros.float()[:, group] if zeros is not None
                else torch.full_like(col_scale, float(2 ** (spec.bits - 1))))
    codes = torch.zeros(rows, cols, dtype=torch.uint8, device=W.device)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            s, z = col_scale[:, j:j + 1], col_zero[:, j:j + 1]
            q = codes_for(W1[:, i:i + 1].float(), s.half(), None if zeros is None else z, spec)
            codes[:, order[j]] = q.squeeze(-1).to(torch.uint8)
            err = (W1[:, i:i + 1] - ((q - z) * s).double()) / Hinv1[i, i]
            W1[:, i:] -= err @ Hinv1[i:i + 1, i:]
            Err1[:, i:i + 1] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return QuantizedWeight(codes, scales, zeros, spec)


def _static_groups(W: torch.Tensor, importance: torch.Tensor,
                   spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Every group's fp16 scale [rows, groups] (and uint8 zero, asymmetric) from the original weights: those of
    RTN weighted by each column's importance (H's diagonal), rows in chunks."""
    q = quantize_rtn(W.float(), spec, importance.float())
    return q.scales, q.zeros


class HessianCollector:
    """Accumulates XᵀX of a Linear's inputs over calibration batches (forward pre-hook)."""

    def __init__(self, module: torch.nn.Module, cols: int):
        self.H: torch.Tensor | None = None  # made on the device of the first input
        self.cols = cols
        self.n = 0
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
        if self.H is None:
            self.H = torch.zeros(self.cols, self.cols, dtype=torch.float64, device=x.device)
        self.H += 2.0 * x.T @ x
        self.n += x.shape[0]

    def result(self) -> torch.Tensor:
        """The mean Hessian 2XᵀX / n."""
        self.handle.remove()
        if self.H is None:
            return torch.zeros(self.cols, self.cols, dtype=torch.float64)
        return self.H / max(self.n, 1)
