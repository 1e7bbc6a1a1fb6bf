"""AWQ (activation-aware weight quantization, Lin et al. 2023): per-input-channel scales s = a^α, with a the mean
|x| of each input channel on the calibration windows, multiply the weights of the Linears that read one tensor
(W ← W·diag(s)) and divide the producer of that tensor (the preceding norm's weight, or the rows of the preceding
Linear), so the float model computes the same function and the graph keeps its shape. α is searched per group on
a grid, minimising the output error of the group's Linears quantized as the plan will quantize them.

Groups per block (from the norm folding's family table, compress.reparam.norm_fold.FAMILY_TARGETS): the input norm
→ Q/K/V, the post-attention norm → gate/up, and up → down. O's input comes from V through attention; with grouped
KV heads one V row feeds several O columns, so O keeps scale 1 (noted)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from compress.errors import UserError
from compress.quantize.spec import QuantSpec

GRID = 20  # α = 0, 0.05, ..., 0.95 (llm-awq's n_grid)
ROWS = 1024  # calibration rows the error is measured on, per group (evenly spaced over the tokens)


@dataclass
class AwqGroup:
    """Linears reading one tensor, and its producer: a norm (`kind` 'norm') or a Linear whose rows make it."""

    producer: str
    linears: list[str]
    kind: str


@dataclass
class AwqRecord:
    """What AWQ did: α per group (0 = left as it was), the error reduction, notes."""

    alphas: dict[str, float] = field(default_factory=dict)
    error_ratio: dict[str, float] = field(default_factory=dict)  # best error / error at α = 0
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict:
        """JSON form for the result and the manifest."""
        scaled = {k: a for k, a in self.alphas.items() if a > 0}
        ratios = list(self.error_ratio.values())
        return {"groups": len(self.alphas), "scaled": len(scaled), "alphas": self.alphas,
                "mean_error_ratio": round(sum(ratios) / len(ratios), 4) if ratios else None,
                "seconds": self.seconds}


def groups_of(model, lmap) -> list[list[AwqGroup]]:
    """Per block, the groups AWQ can scale; UserError when the family has none (no foldable predecessor)."""
    from compress.reparam.norm_fold import FAMILY_TARGETS

    targets = FAMILY_TARGETS.get(lmap.family)
    if targets is None:
        raise UserError(f"--method awq: the {lmap.family} family has no known norm → Linear layout to fold scales "
                        "into; use --method rtn or gptq")
    out = []
    for blk in lmap.blocks:
        mods = dict(model.get_submodule(blk.path).named_modules())
        groups = []
        for norm, readers in targets:
            if norm in mods and all(r in mods for r in readers):
                groups.append(AwqGroup(f"{blk.path}.{norm}", [f"{blk.path}.{r}" for r in readers], "norm"))
        if "mlp.up_proj" in mods and "mlp.down_proj" in mods:
            groups.append(AwqGroup(f"{blk.path}.mlp.up_proj", [f"{blk.path}.mlp.down_proj"], "linear"))
        out.append(groups)
    return out


@torch.no_grad()  # not inference_mode: the folded weights stay ordinary tensors (the Fisher pass needs autograd)
def awq_scale(lazy, windows, spec_of: Callable[[str], QuantSpec | None], progress=None) -> AwqRecord:
    """Search and fold AWQ scales into the model of `lazy` (a compress.stream LazyModel, in memory) in place, block
    by block on the calibration `windows`; `spec_of(name)` is how the plan will quantize a Linear (None: float)."""
    import time

    from compress.quantize.imatrix import capture_batches

    t0 = time.perf_counter()
    lmap, model = lazy.lmap, lazy.model
    if lazy.streamed:
        raise UserError("--method awq runs on a model in memory: add --stream off (or use --method rtn)")
    groups = groups_of(model, lmap)
    record = AwqRecord(notes=["AWQ: o_proj keeps scale 1 (its input comes from V through attention, shared by "
                              "grouped KV heads)"])
    batches, masks = capture_batches(lazy, windows)
    hidden = [c.hidden for c in batches]
    task = progress.add_task("AWQ scales", total=len(lmap.blocks)) if progress is not None else None
    for blk, blk_groups in zip(lmap.blocks, groups, strict=True):
        inputs = _inputs(model, lazy, blk.index, blk_groups, batches, hidden, masks)
        for g in blk_groups:
            specs = [spec_of(n) for n in g.linears]
            if any(s is None or s.is_float for s in specs):
                continue
            alpha, ratio, scales = _search(model, g, specs, inputs[g.linears[0]])
            record.alphas[g.producer] = alpha
            record.error_ratio[g.producer] = ratio
            if alpha > 0:
                _fold(model, g, scales)
        hidden = [lazy.run_block(blk.index, calls, h) for calls, h in zip(batches, hidden, strict=True)]
        if progress is not None:
            progress.advance(task)
    record.seconds = round(time.perf_counter() - t0, 2)
    return record


def _inputs(model, lazy, index: int, groups: list[AwqGroup], batches, hidden, masks) -> dict[str, torch.Tensor]:
    """The input rows (real tokens) of each group's first Linear, from one pass of the block."""
    wanted = {g.linears[0] for g in groups}
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in wanted}
    current: list[torch.Tensor] = []

    def hook(name):
        def pre(mod, args):
            x = args[0]
            mask = current[0]
            rows[name].append((x[mask] if x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape) else
                               x.reshape(-1, x.shape[-1])).float())
        return pre

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in wanted]
    try:
        for calls, h, mask in zip(batches, hidden, masks, strict=True):
            current[:] = [mask.to(h.device)]
            lazy.run_block(index, calls, h)
    finally:
        for hd in handles:
            hd.remove()
    return {n: torch.cat(r) for n, r in rows.items()}


def _search(model, group: AwqGroup, specs: list[QuantSpec], x: torch.Tensor) -> tuple[float, float, torch.Tensor]:
    """(best α, its error / the error at α = 0, its scales) for one group on its input rows `x`."""
    from compress.quantize.apply import weight_matrix
    from compress.quantize.rtn import quantize_rtn

    weights = [weight_matrix(model.get_submodule(n)).float() for n in group.linears]
    step = max(1, x.shape[0] // ROWS)
    xs = x[::step][:ROWS]
    mean_abs = x.abs().mean(0).clamp(min=1e-8)
    ref = [xs @ w.T for w in weights]
    best = (0.0, float("inf"), torch.ones_like(mean_abs))
    base = None
    for i in range(GRID):
        alpha = i / GRID
        s = mean_abs.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        xq = xs / s
        importance = (x / s).square().mean(0)
        err = 0.0
        for w, spec, r in zip(weights, specs, ref, strict=True):
            wq = quantize_rtn(w * s, spec, importance).dequantize().float()
            err += float((xq @ wq.T - r).square().sum())
        if base is None:
            base = err
        if err < best[1]:
            best = (alpha, err, s)
    return best[0], best[1] / base if base else 1.0, best[2]


def _fold(model, group: AwqGroup, s: torch.Tensor) -> None:
    """W ← W·diag(s) for the readers; the producer divided by s (norm weight or Linear rows), exactly."""
    from compress.reparam.norm_fold import affine_style

    for n in group.linears:
        lin = model.get_submodule(n)
        lin.weight.data = (lin.weight.data.float() * s).to(lin.weight.dtype)
    prod = model.get_submodule(group.producer)
    w = prod.weight.data.float()
    if group.kind == "norm":
        style = affine_style(prod)
        new = (1 + w) / s - 1 if style == "offset" else w / s
    else:
        new = w / s[:, None]
    prod.weight.data = new.to(prod.weight.dtype)
    if getattr(prod, "bias", None) is not None:
        prod.bias.data = (prod.bias.data.float() / s).to(prod.bias.dtype)
