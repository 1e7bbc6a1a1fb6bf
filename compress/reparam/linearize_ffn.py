"""RePaViT-style FFN linearization (post-training, lossy): in a GELU/ReLU FFN, the P% of channels whose activation is
closest to a straight line on calibration data are routed around the nonlinearity, and their path is merged into
one matrix added to the residual input, so the FFN's nonlinear width shrinks.

For a channel j with pre-activation z_j = W1[j]·x + c_j, act(z_j) ≈ a_j z_j + b_j (least squares on calibration
tokens). Its contribution W2[:, j] act(z_j) then becomes (a_j W2[:, j] W1[j]) x + W2[:, j] (a_j c_j + b_j), and the
linearized channels together are one d × d matrix M and bias m. Channels are ranked by the fit's residual energy
mean((act(z) − a z − b)²) × ‖W2[:, j]‖², so the ones whose nonlinearity matters least go first.

BERT-family encoders (MiniLM): `intermediate.dense` loses the linearized rows; `output` becomes a LinearizedOutput
computing LayerNorm(dense(h) + (I + M) x + m). The FFN's cost per token goes from 2·d·h to 2·d·(1 − P)·h + d², a
saving once P > d / (2h) (12.5% for h = 4d).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from compress.data import Windows
from compress.errors import UserError
from compress.models.layers import LayerMap


class LinearizedOutput(nn.Module):
    """BertOutput with a linear bypass: LayerNorm(dropout(dense(h)) + linear(x) + x)."""

    def __init__(self, original: nn.Module, kept: torch.Tensor, merged: nn.Linear):
        super().__init__()
        dense = original.dense
        self.dense = nn.Linear(len(kept), dense.out_features, bias=dense.bias is not None)
        with torch.no_grad():
            self.dense.weight.copy_(dense.weight[:, kept])
            if dense.bias is not None:
                self.dense.bias.copy_(dense.bias)
        self.linear = merged
        self.LayerNorm = original.LayerNorm
        self.dropout = original.dropout

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        h = self.dropout(self.dense(hidden_states))
        return self.LayerNorm(h + self.linear(input_tensor) + input_tensor)


def _ffn_parts(model: nn.Module, lmap: LayerMap) -> list[tuple[int, nn.Module, nn.Module]]:
    """(block index, intermediate, output) per block; UserError naming the block type when it is not BERT-style."""
    parts = []
    for b in lmap.blocks:
        block = model.get_submodule(b.path)
        inter, out = getattr(block, "intermediate", None), getattr(block, "output", None)
        ok = (isinstance(getattr(inter, "dense", None), nn.Linear) and hasattr(inter, "intermediate_act_fn")
              and isinstance(getattr(out, "dense", None), nn.Linear) and hasattr(out, "LayerNorm"))
        if not ok:
            raise UserError(f"--linearize-ffn: {b.path} is a {type(block).__name__}, not a BERT-style block with "
                            "intermediate(dense, act) and output(dense, LayerNorm); supported: BERT-family encoders")
        parts.append((b.index, inter, out))
    return parts


@torch.inference_mode()
def _preactivations(model: nn.Module, parts, windows: Windows, max_tokens: int = 8192) -> dict[int, torch.Tensor]:
    """Per block: pre-activations [tokens, h] of the FFN's first Linear on the calibration windows (padding out)."""
    seen: dict[int, list[torch.Tensor]] = {i: [] for i, _, _ in parts}
    current_mask: list[torch.Tensor] = []
    handles = []
    for i, inter, _ in parts:
        def hook(module, args, output, i=i):
            seen[i].append(output.reshape(-1, output.shape[-1])[current_mask[0].reshape(-1).bool()].float())
        handles.append(inter.dense.register_forward_hook(hook))
    try:
        for s in range(0, len(windows.input_ids), 8):
            ids, mask = windows.input_ids[s:s + 8], windows.attention_mask[s:s + 8]
            current_mask[:] = [mask]
            model(input_ids=ids, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
    return {i: torch.cat(v)[:max_tokens] for i, v in seen.items()}


def linear_fit(z: torch.Tensor, act) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per column of z [tokens, h]: slope a, intercept b of the least-squares line through act(z), and the mean
    squared residual."""
    g = act(z)
    zm, gm = z.mean(0), g.mean(0)
    var = ((z - zm) ** 2).mean(0).clamp_min(1e-12)
    a = ((z - zm) * (g - gm)).mean(0) / var
    b = gm - a * zm
    resid = ((g - (a * z + b)) ** 2).mean(0)
    return a, b, resid


def apply(model: nn.Module, lmap: LayerMap, windows: Windows, ratio: float) -> dict:
    """Linearize `ratio` of every block's FFN channels in place (see the module docstring); returns per block how
    many channels went and the fit residual of the chosen ones."""
    if not 0 < ratio < 1:
        raise UserError(f"--linearize-ffn {ratio:.0%}: give a share inside (0, 100%)")
    t0 = time.perf_counter()
    parts = _ffn_parts(model, lmap)
    pre = _preactivations(model, parts, windows)
    layers = {}
    for i, inter, out in parts:
        w1, c1 = inter.dense.weight.detach(), inter.dense.bias
        w2 = out.dense.weight.detach()
        h = w1.shape[0]
        k = int(round(ratio * h))
        if k < 1 or k >= h:
            raise UserError(f"--linearize-ffn {ratio:.0%} moves {k} of {h} channels of block {i}; pick a share "
                            "that moves at least one and keeps at least one")
        a, b, resid = linear_fit(pre[i], inter.intermediate_act_fn)
        energy = resid * (w2.float() ** 2).sum(0)
        order = torch.argsort(energy)
        lin, kept = order[:k].sort().values, order[k:].sort().values
        with torch.no_grad():
            merged = nn.Linear(w1.shape[1], w2.shape[0], bias=True)
            merged.weight.copy_((w2[:, lin] * a[lin]) @ w1[lin])
            cb = c1[lin] if c1 is not None else torch.zeros(k)
            merged.bias.copy_(w2[:, lin] @ (a[lin] * cb + b[lin]))
            new_dense = nn.Linear(w1.shape[1], len(kept), bias=c1 is not None)
            new_dense.weight.copy_(w1[kept])
            if c1 is not None:
                new_dense.bias.copy_(c1[kept])
        inter.dense = new_dense
        block = model.get_submodule(lmap.blocks[i].path)
        block.output = LinearizedOutput(out, kept, merged)
        layers[i] = {"linearized": k, "kept": len(kept), "fit_residual_chosen": float(energy[lin].sum()),
                     "fit_residual_kept": float(energy[kept].sum())}
    return {"pass": "linearize-ffn", "ratio": ratio, "layers": layers, "tokens": int(pre[parts[0][0]].shape[0]),
            "seconds": round(time.perf_counter() - t0, 2)}


def linearize_request(spec: str, ratio: float, data: str | None, tokens: int = 2048, eval_tokens: int = 2048,
                      seq_len: int | None = None, seed: int = 0, progress=None) -> dict:
    """Load `spec`, linearize on calibration windows, and measure the drift on held-out windows against the original
    (embedding cosine for encoders): `compress reparam --linearize-ffn` as a function. Nothing is saved."""
    import copy

    from compress.data import load_split
    from compress.evaluate import evaluate
    from compress.models import layer_map, load_model

    loaded = load_model(spec)
    if loaded.kind != "encoder":
        raise UserError(f"--linearize-ffn: {spec} is a {loaded.kind}; the pass handles BERT-family encoders (GELU/ReLU "
                        "FFNs)")
    calib, held = load_split(data, loaded, tokens, eval_tokens, seq_len, seed)
    reference = copy.deepcopy(loaded)
    params_before = sum(p.numel() for p in loaded.module.parameters())
    record = apply(loaded.module, layer_map(loaded.module), calib, ratio)
    report = evaluate(loaded, reference, held, progress)
    return {**record, "model": spec, "params_before": params_before,
            "params_after": sum(p.numel() for p in loaded.module.parameters()), "metrics": report.to_dict(),
            "calibration": calib.describe(), "notes": ["lossy pass: drift measured on held-out windows; the "
                                                       "linearized model is not saved yet (no loader)"]}
