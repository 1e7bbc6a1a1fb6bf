"""GPTQ (Frantar et al. 2022): quantize columns one by one, spreading each column's error over the columns not
yet quantized through the inverse Hessian H = 2XᵀX of the layer's calibration inputs.

Blocks are processed in order, each fed with the outputs of the already-quantized blocks before it, so memory
holds one block's Hessians at a time. Within a Linear, groups go in decreasing order of their share of H's
diagonal (act-order by group: the most active inputs are rounded while the most columns are left to absorb their
error), each group's columns in order; a group's scale (and zero) is chosen when its first column is reached, from
the weights as the error spread so far left them, minimising the error weighted by H's diagonal as
importance-weighted RTN does (compress.quantize.rtn.weighted_params). Groups stay contiguous runs of columns, so
the codes fit the same packed format and exporters as round-to-nearest. Measured on SmolLM2 at 3.5 bpw (KL 0.876
with min/max scales in column order → 0.493) and the project's float decoder (0.0077 → 0.0081), where
per-column act-order with scales fixed before the error spread (static groups) lost (0.0113): BENCHMARKS.md.
"""

from __future__ import annotations

import torch

from compress.quantize.rtn import QuantizedWeight, codes_for, weighted_params
from compress.quantize.spec import QuantSpec


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, block: int = 128,
                  damp: float = 0.01) -> QuantizedWeight:
    """GPTQ of a [rows, cols] weight with Hessian [cols, cols]; returns codes, scales, zeros like RTN."""
    rows, cols = weight.shape
    g = spec.group_for(cols)
    block = g if g > block or block % g else block  # a group never straddles two blocks
    W = weight.detach().double().clone()
    H = hessian.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=H.dtype, device=H.device)
    order = group_order(torch.diag(H), g)
    W, H = W[:, order], H[order][:, order]
    importance = torch.diag(H).float()  # each column's weight in its group's scale search, in processing order
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    dev = W.device
    codes = torch.zeros(rows, cols, dtype=torch.uint8, device=dev)
    scales = torch.zeros(rows, cols // g, dtype=torch.float16, device=dev)
    zeros = None if spec.symmetric else torch.zeros(rows, cols // g, dtype=torch.uint8, device=dev)
    scale = zero = None
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            col = int(order[j])
            if j % g == 0:  # a group's first column: its scale from the group as the error spread left it
                scale, zero = weighted_params(W1[:, i:i + g].float().reshape(rows, 1, g), spec,
                                              importance[j:j + g].reshape(1, 1, g))
                scale, zero = scale.reshape(rows, 1), None if zero is None else zero.reshape(rows, 1)
                scales[:, col // g] = scale.squeeze(-1)
                if zeros is not None:
                    zeros[:, col // g] = zero.squeeze(-1).to(torch.uint8)
            q = codes_for(W1[:, i:i + 1].float(), scale, zero, spec)
            codes[:, col] = q.squeeze(-1).to(torch.uint8)
            offset = 2 ** (spec.bits - 1) if zero is None else zero
            err = (W1[:, i:i + 1] - ((q - offset) * scale.float()).double()) / Hinv1[i, i]
            W1[:, i:] -= err @ Hinv1[i:i + 1, i:]
            Err1[:, i:i + 1] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return QuantizedWeight(codes, scales, zeros, spec)


def group_order(diag: torch.Tensor, g: int) -> torch.Tensor:
    """The column order GPTQ takes: groups of `g` by decreasing Σ of H's diagonal over them (ties: in place), each
    group's columns in order."""
    groups = torch.argsort(diag.reshape(-1, g).sum(1), descending=True, stable=True)
    return (groups[:, None] * g + torch.arange(g, device=diag.device)).reshape(-1)


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
