"""Structured width pruning: remove whole attention KV groups and FFN channels, leaving a smaller dense model.

Units. Attention: a KV group = one key/value head and the query heads that share it (GQA); plain MHA has one query
head per group. Heads only ever go a whole group at a time, so `num_key_value_groups` (query heads per k/v head) and
`head_dim` never change. FFN: one intermediate channel (a row of gate/up, a column of down).

Importance (`width_importance`), per unit, from the calibration windows:
  activation  mean over tokens of the norm of the unit's contribution to its sublayer's output:
              KV group g: ‖W_o[:, cols(g)] · z[cols(g)]‖₂ (z = attention output before o_proj, cols(g) = its heads);
              FFN channel j: |a_j| · ‖W_down[:, j]‖₂ (a = act(gate(x)) * up(x), the input of down_proj).
              Block inputs come from the BlockRunner's cache, so it costs one forward over the windows.
  taylor      first-order estimate of the LM-loss change when the unit is zeroed: |Σ_tokens Σ_cols a · ∂L/∂a| per
              batch, averaged over batches (decoders only; one forward + backward per batch).

Layouts: llama-style decoders (`self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`) and BERT-style encoders
(`attention.self.{query,key,value}`, `attention.output.dense`, `intermediate.dense`, `output.dense`).

Ratios: per block (attention ratio, FFN ratio); a ratio removes round-half-up(ratio × count) query heads (which must
be a whole number of KV groups) and round-half-up(ratio × intermediate) channels. When every block ends with one shape
and the config can say so (llama-style; BERT only when its heads are untouched), the config is updated and
`save_pretrained` gives a plain transformers model; otherwise the shapes live in the record's `per_layer_shapes` and
`save_width_pruned` / `load_width_pruned` rebuild the model.

`adaptive_ratios` measures, for every block and candidate ratio (one ratio shared by attention and FFN of the block),
the divergence of the final output when only that block is pruned (replaying that block and the later ones from the
cached inputs), assumes the distortions add up across blocks and picks one ratio per block with the exact
multiple-choice knapsack (`compress.quantize.allocate.solve_dp`) so that at least as many parameters go as with the
uniform `target_ratio`.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.errors import UserError
from compress.importance.context import ScoringContext
from compress.models.layers import LayerMap
from compress.models.stack import count_params as _count
from compress.prune.choices import WIDTH_IMPORTANCE

FORMAT = "compress-width-v1"
METHODS = tuple(WIDTH_IMPORTANCE)
CHOICES = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75)
Ratios = dict[int, tuple[float, float]]


@dataclass(frozen=True)
class Layout:
    """Child paths (relative to a block) of the modules width pruning slices."""

    name: str
    attn: str  # the module holding head_dim / head-count attributes
    q: str
    k: str
    v: str
    o: str
    gate: str | None
    up: str
    down: str
    mlp: str


LAYOUTS = {
    "llama-style": Layout("llama-style", "self_attn", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                          "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "mlp"),
    "bert": Layout("bert", "attention.self", "attention.self.query", "attention.self.key", "attention.self.value",
                   "attention.output.dense", None, "intermediate.dense", "output.dense", "intermediate"),
}


@dataclass
class WidthImportance:
    """Per block: a score per KV group ([G]) and per FFN channel ([I]); higher = more important."""

    method: str
    groups: dict[int, torch.Tensor]
    channels: dict[int, torch.Tensor]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready scores."""
        return {"method": self.method, "groups": {i: v.tolist() for i, v in self.groups.items()},
                "channels": {i: v.tolist() for i, v in self.channels.items()}}


@dataclass
class WidthTable:
    """What `adaptive_ratios` chooses from: per block and candidate ratio the (attention, FFN) ratios it resolves
    to (None: not allowed, e.g. it would remove every KV group), the measured divergence and the block's params."""

    choices: list[float]
    ratios: list[list[tuple[float, float] | None]]
    distortion: list[list[float]]
    params: list[list[int]]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (infinite distortions as None)."""
        return {"choices": self.choices, "ratios": self.ratios, "params": self.params,
                "distortion": [[None if math.isinf(d) else d for d in row] for row in self.distortion]}


# ---------------------------------------------------------------------------------------------------- shapes


def layout_of(model: nn.Module, lmap: LayerMap) -> Layout:
    """The width layout of the model's blocks; UserError when the family has none or a block lacks a projection."""
    layout = LAYOUTS.get(lmap.adapter)
    if layout is None:
        raise UserError(f"{lmap.family}: width pruning supports llama-style decoders and BERT-style encoders "
                        f"(layout '{lmap.adapter}' is not supported); prune whole blocks or sublayers instead")
    for b in lmap.blocks:
        blk = model.get_submodule(b.path)
        for path in (layout.q, layout.k, layout.v, layout.o, layout.gate, layout.up, layout.down):
            if path is None:
                continue
            try:
                mod = blk.get_submodule(path)
            except AttributeError:
                mod = None
            if not isinstance(mod, nn.Linear):
                raise UserError(f"{lmap.family}: block {b.index} has no nn.Linear '{path}'; width pruning needs "
                                "separate q/k/v/o and gate/up/down projections (fused ones are not supported)")
    return layout


def block_shape(block: nn.Module, layout: Layout) -> dict[str, int]:
    """{heads, kv_heads, head_dim, intermediate} of one block, read from its modules."""
    attn = block.get_submodule(layout.attn)
    hd = int(attn.head_dim if layout.name == "llama-style" else attn.attention_head_size)
    heads = block.get_submodule(layout.q).out_features // hd
    kv = block.get_submodule(layout.k).out_features // hd
    inter = block.get_submodule(layout.down).in_features
    return {"heads": heads, "kv_heads": kv, "head_dim": hd, "intermediate": inter}


def _heads_coupled(block: nn.Module, layout: Layout, shape: dict[str, int]) -> str | None:
    """A parameter inside the attention (other than q/k/v/o) sized by all heads together (e.g. OLMo 2's q_norm over
    num_heads*head_dim): removing heads would change how the remaining ones are computed. BERT's layout has none."""
    if layout.name != "llama-style":
        return None
    attn_path = layout.attn
    attn = block.get_submodule(attn_path)
    own = {p.rsplit(".", 1)[1] for p in (layout.q, layout.k, layout.v, layout.o) if p.startswith(attn_path + ".")}
    sizes = {shape["heads"] * shape["head_dim"], shape["kv_heads"] * shape["head_dim"]} - {shape["head_dim"]}
    for name, p in attn.named_parameters():
        if name.split(".", 1)[0] not in own and p.numel() in sizes:
            return f"{attn_path}.{name}"
    return None


def _round(x: float) -> int:
    return math.floor(x + 0.5 + 1e-9)


def _check_ratio(what: str, r: Any) -> float:
    if isinstance(r, bool) or not isinstance(r, int | float) or not 0 <= r < 1:
        raise UserError(f"{what} {r!r} is outside [0, 1); give the fraction to remove, e.g. 0.25")
    return float(r)


def resolve_ratios(ratios: Ratios | float, n: int) -> Ratios:
    """Per block (attention, FFN) ratios from a uniform float or a {block: (attn, ffn)} dict (missing blocks: 0)."""
    if isinstance(ratios, int | float) and not isinstance(ratios, bool):
        r = _check_ratio("ratios: uniform ratio", ratios)
        return {i: (r, r) for i in range(n)}
    if not isinstance(ratios, dict):
        raise UserError(f"ratios: {ratios!r} is neither a ratio in [0, 1) nor a {{block: (attention, ffn)}} dict")
    out = {i: (0.0, 0.0) for i in range(n)}
    for i, pair in ratios.items():
        if not isinstance(i, int) or not 0 <= i < n:
            raise UserError(f"ratios: block {i!r} does not exist (the model has blocks 0..{n - 1})")
        if not isinstance(pair, tuple | list) or len(pair) != 2:
            raise UserError(f"ratios: block {i} needs an (attention ratio, FFN ratio) pair, got {pair!r}")
        out[i] = (_check_ratio(f"ratios: block {i} attention ratio", pair[0]),
                  _check_ratio(f"ratios: block {i} FFN ratio", pair[1]))
    return out


def removal_counts(i: int, shape: dict[str, int], ratio: tuple[float, float]) -> tuple[int, int]:
    """(KV groups, FFN channels) that (attention ratio, FFN ratio) removes from block i; UserError when it would
    split a KV group or remove every group or channel."""
    a, f = ratio
    heads, kv, inter = shape["heads"], shape["kv_heads"], shape["intermediate"]
    per = heads // kv
    h = _round(a * heads)
    if h % per:
        raise UserError(f"ratios: block {i} attention ratio {a:g} removes {h} of {heads} query heads, but heads are "
                        f"removed a whole KV group ({per} query heads sharing one key/value head) at a time: use a "
                        f"multiple of 1/{kv} = {1 / kv:g}")
    g = h // per
    if g >= kv:
        raise UserError(f"ratios: block {i} attention ratio {a:g} removes all {kv} KV groups ({heads} heads); at "
                        f"least one must stay: use at most {(kv - 1) / kv:g}")
    c = _round(f * inter)
    if c >= inter:
        raise UserError(f"ratios: block {i} FFN ratio {f:g} removes all {inter} FFN channels; at least one must "
                        f"stay: use at most {(inter - 1) / inter:g}")
    return g, c


def snap_ratio(shape: dict[str, int], r: float) -> tuple[float, float] | None:
    """One ratio for a block as the (attention, FFN) pair prune_width accepts: attention rounded to whole KV groups;
    None when it would remove every group or channel."""
    g, c = _round(r * shape["kv_heads"]), _round(r * shape["intermediate"])
    if g >= shape["kv_heads"] or c >= shape["intermediate"]:
        return None
    return g / shape["kv_heads"], c / shape["intermediate"]


# --------------------------------------------------------------------------------------------------- slicing


def _slice(lin: nn.Linear, dim: int, idx: torch.Tensor) -> None:
    """Keep rows (dim 0, with the bias) or columns (dim 1) `idx` of a Linear, in place."""
    with torch.no_grad():
        lin.weight = nn.Parameter(lin.weight.index_select(dim, idx.to(lin.weight.device)).clone(),
                                  requires_grad=lin.weight.requires_grad)
        if dim == 0 and lin.bias is not None:
            lin.bias = nn.Parameter(lin.bias.index_select(0, idx.to(lin.bias.device)).clone(),
                                    requires_grad=lin.bias.requires_grad)
    if dim == 0:
        lin.out_features = len(idx)
    else:
        lin.in_features = len(idx)


def _rows(units: list[int], size: int) -> torch.Tensor:
    return torch.tensor([u * size + d for u in units for d in range(size)], dtype=torch.long)


def slice_block(block: nn.Module, layout: Layout, kept_groups: list[int], kept_channels: list[int]) -> None:
    """Physically keep only `kept_groups` (KV groups, with their query heads) and `kept_channels` of one block."""
    shape = block_shape(block, layout)
    hd, per = shape["head_dim"], shape["heads"] // shape["kv_heads"]
    if len(kept_groups) != shape["kv_heads"]:
        heads = [g * per + r for g in kept_groups for r in range(per)]
        q_idx, kv_idx = _rows(heads, hd), _rows(kept_groups, hd)
        for path, idx in ((layout.q, q_idx), (layout.k, kv_idx), (layout.v, kv_idx)):
            _slice(block.get_submodule(path), 0, idx)
        _slice(block.get_submodule(layout.o), 1, q_idx)
        attn = block.get_submodule(layout.attn)
        for attr, value in (("num_heads", len(heads)), ("num_attention_heads", len(heads)),
                            ("num_key_value_heads", len(kept_groups)), ("all_head_size", len(heads) * hd)):
            if isinstance(getattr(attn, attr, None), int):
                setattr(attn, attr, value)
    if len(kept_channels) != shape["intermediate"]:
        idx = torch.tensor(kept_channels, dtype=torch.long)
        for path in (layout.gate, layout.up):
            if path is not None:
                _slice(block.get_submodule(path), 0, idx)
        _slice(block.get_submodule(layout.down), 1, idx)
        mlp = block.get_submodule(layout.mlp)
        if isinstance(getattr(mlp, "intermediate_size", None), int):
            mlp.intermediate_size = len(kept_channels)


def _kept(scores: torch.Tensor, remove: int) -> list[int]:
    """Indices kept after removing the `remove` lowest-scored units (ties: lower index goes first), ascending."""
    n = len(scores)
    order = sorted(range(n), key=lambda j: (float(scores[j]), j))
    gone = set(order[:remove])
    return [j for j in range(n) if j not in gone]


def _plan_block(i: int, block: nn.Module, layout: Layout, ratio: tuple[float, float],
                importance: WidthImportance) -> tuple[list[int], list[int]]:
    """(kept groups, kept channels) of block i, validated."""
    shape = block_shape(block, layout)
    g, c = removal_counts(i, shape, ratio)
    if g and (where := _heads_coupled(block, layout, shape)):
        raise UserError(f"ratios: block {i}: '{where}' is sized by all heads together, so heads cannot be removed "
                        "exactly in this family; use attention ratio 0 (FFN-only width pruning)")
    out = []
    for remove, n, scores, what in ((g, shape["kv_heads"], importance.groups.get(i), "KV groups"),
                                    (c, shape["intermediate"], importance.channels.get(i), "FFN channels")):
        if not remove:
            out.append(list(range(n)))
            continue
        if scores is None or len(scores) != n:
            raise UserError(f"importance: block {i} has {n} {what} but the scores have "
                            f"{'none' if scores is None else len(scores)}; recompute width_importance on this model")
        out.append(_kept(scores, remove))
    return out[0], out[1]


def prune_width(model: nn.Module, lmap: LayerMap, ratios: Ratios | float, importance: WidthImportance) -> dict:
    """Slice every block's attention (whole KV groups) and FFN channels in place, keeping the most important units;
    return the record: per block what stayed, `per_layer_shapes`, params before/after, whether the config was updated.
    Everything is validated before anything is changed."""
    layout = layout_of(model, lmap)
    per_block = resolve_ratios(ratios, lmap.num_blocks)
    blocks = [model.get_submodule(b.path) for b in lmap.blocks]
    plans = {i: _plan_block(i, blk, layout, per_block[i], importance) for i, blk in enumerate(blocks)}
    before = _count(model)
    layers, shapes = {}, {}
    for i, blk in enumerate(blocks):
        groups, channels = plans[i]
        per = block_shape(blk, layout)
        per = per["heads"] // per["kv_heads"]
        slice_block(blk, layout, groups, channels)
        shapes[i] = block_shape(blk, layout)
        layers[i] = {"kept_groups": groups, "kept_heads": [g * per + r for g in groups for r in range(per)],
                     "kept_channels": channels}
    _refresh(model, lmap)
    uniform = len({tuple(s.values()) for s in shapes.values()}) == 1
    config_updated = uniform and _update_config(model, layout, shapes[0])
    return {"method": importance.method, "layout": layout.name,
            "ratios": {i: list(r) for i, r in per_block.items()}, "layers": layers, "per_layer_shapes": shapes,
            "uniform": uniform, "config_updated": config_updated, "params_before": before,
            "params_after": _count(model)}


def _update_config(model: nn.Module, layout: Layout, shape: dict[str, int]) -> bool:
    """Write one shape for all blocks into the HF config when the config can express it; True when done."""
    config = getattr(model, "config", None)
    if config is None:
        return False
    if layout.name == "llama-style":
        config.head_dim = shape["head_dim"]  # explicit: no longer derivable from hidden_size / num_attention_heads
        config.num_attention_heads = shape["heads"]
        config.num_key_value_heads = shape["kv_heads"]
    elif shape["heads"] != config.num_attention_heads:  # BERT derives its head size from the head count
        return False
    config.intermediate_size = shape["intermediate"]
    return True


def _refresh(model: nn.Module, lmap: LayerMap) -> None:
    """Parameter counts of the LayerMap after slicing."""
    for b in lmap.blocks:
        b.params = _count(model.get_submodule(b.path))
        for sub in b.sublayers.values():
            sub.params = sum(_count(model.get_submodule(p)) for p in sub.paths)
    lmap.total_params = _count(model)


# ------------------------------------------------------------------------------------------------ importance


def width_importance(ctx: ScoringContext, method: str = "activation") -> WidthImportance:
    """Score every KV group and FFN channel of every block on the calibration windows (see the module docstring)."""
    if method not in METHODS:
        raise UserError(f"unknown width importance '{method}': use {', '.join(METHODS)}")
    model, lmap = ctx.loaded.module, ctx.lmap
    layout = layout_of(model, lmap)
    if method == "taylor":
        if ctx.loaded.kind != "decoder":
            raise UserError("width importance 'taylor' needs a language-model loss: use 'activation' for encoders")
        return _taylor(ctx, layout)
    return _activation(ctx, layout)


def _group_view(z: torch.Tensor, shape: dict[str, int]) -> torch.Tensor:
    """[..., heads*head_dim] -> [..., G, heads_per_group*head_dim] (a group's heads are contiguous)."""
    return z.reshape(*z.shape[:-1], shape["kv_heads"], -1)


def _activation(ctx: ScoringContext, layout: Layout) -> WidthImportance:
    r = ctx.runner
    n = len(r.blocks)
    shapes = [block_shape(r.blocks[i], layout) for i in range(n)]
    groups = [torch.zeros(s["kv_heads"], dtype=torch.float64) for s in shapes]
    channels = [torch.zeros(s["intermediate"], dtype=torch.float64) for s in shapes]
    tokens = 0.0
    task = ctx.task("width importance", n * len(r.batches))
    seen: dict[str, torch.Tensor] = {}

    def grab(key):
        def hook(module, args):
            seen[key] = args[0]
        return hook

    with torch.inference_mode():
        for batch in r.batches:
            w = batch.attention_mask.reshape(-1).to(torch.float64)
            tokens += float(w.sum())
            for i in range(n):
                blk = r.blocks[i]
                o, down = blk.get_submodule(layout.o), blk.get_submodule(layout.down)
                handles = [o.register_forward_pre_hook(grab("o")), down.register_forward_pre_hook(grab("down"))]
                try:
                    r.run_block(batch, i, batch.inputs[i])
                finally:
                    for h in handles:
                        h.remove()
                z = _group_view(seen["o"].reshape(len(w), -1).float(), shapes[i])  # [T, G, per*hd]
                wo = _group_view(o.weight.float(), shapes[i])  # [hidden, G, per*hd]
                for g in range(shapes[i]["kv_heads"]):
                    contrib = (z[:, g] @ wo[:, g].T).norm(dim=-1).to(torch.float64)
                    groups[i][g] += (contrib * w).sum()
                a = seen["down"].reshape(len(w), -1).abs().to(torch.float64)
                col = down.weight.float().norm(dim=0).to(torch.float64)
                channels[i] += (w @ a) * col
                ctx.advance(task)
    tokens = max(tokens, 1.0)
    return WidthImportance("activation", {i: g / tokens for i, g in enumerate(groups)},
                           {i: c / tokens for i, c in enumerate(channels)})


def _taylor(ctx: ScoringContext, layout: Layout, batch_windows: int = 4) -> WidthImportance:
    model, lmap = ctx.loaded.module, ctx.lmap
    blocks = [model.get_submodule(b.path) for b in lmap.blocks]
    shapes = [block_shape(b, layout) for b in blocks]
    groups = [torch.zeros(s["kv_heads"], dtype=torch.float64) for s in shapes]
    channels = [torch.zeros(s["intermediate"], dtype=torch.float64) for s in shapes]
    acts: dict[tuple[int, str], torch.Tensor] = {}

    def grab(key):
        def hook(module, args):
            acts[key] = args[0]
        return hook

    handles = []
    for i, blk in enumerate(blocks):
        handles.append(blk.get_submodule(layout.o).register_forward_pre_hook(grab((i, "o"))))
        handles.append(blk.get_submodule(layout.down).register_forward_pre_hook(grab((i, "down"))))
    flags = [(p, p.requires_grad) for p in model.parameters()]
    ids_all, mask_all = ctx.windows.input_ids, ctx.windows.attention_mask
    batches = 0
    try:
        for p, _ in flags:
            p.requires_grad_(True)  # so every recorded activation is part of the graph
        with torch.enable_grad():
            for s in range(0, len(ids_all), batch_windows):
                ids, mask = ids_all[s:s + batch_windows], mask_all[s:s + batch_windows]
                acts.clear()
                labels = ids.masked_fill(mask == 0, -100)
                loss = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
                keys = sorted(acts)
                grads = torch.autograd.grad(loss, [acts[k] for k in keys], allow_unused=True)
                for (i, kind), grad in zip(keys, grads, strict=True):
                    if grad is None:
                        continue
                    prod = (acts[(i, kind)] * grad).detach().to(torch.float64)
                    prod = prod.reshape(-1, prod.shape[-1]).sum(0)  # Σ over tokens, per column
                    if kind == "o":
                        groups[i] += _group_view(prod, shapes[i]).sum(-1).abs()
                    else:
                        channels[i] += prod.abs()
                batches += 1
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
        acts.clear()
    batches = max(batches, 1)
    return WidthImportance("taylor", {i: g / batches for i, g in enumerate(groups)},
                           {i: c / batches for i, c in enumerate(channels)})


# ------------------------------------------------------------------------------------------------ adaptive


def distortion_table(ctx: ScoringContext, importance: WidthImportance, choices: tuple[float, ...] = CHOICES
                     ) -> WidthTable:
    """Per block and candidate ratio: divergence of the final output with only that block width-pruned (a pruned
    deepcopy swapped in, that block and the later ones replayed from cached inputs) and the block's params after.
    Cached in ctx.cache per (choices, importance)."""
    key = ("width-table", tuple(float(c) for c in choices))
    hit = ctx.cache.get(key)
    if hit is not None and hit[0] is importance:
        return hit[1]
    for c in choices:
        _check_ratio("choices: candidate ratio", c)
    r, lmap = ctx.runner, ctx.lmap
    layout = layout_of(r.model, lmap)
    n = len(r.blocks)
    table = WidthTable([float(c) for c in choices], [], [], [])
    task = ctx.task("width distortion", n * len(choices))
    with torch.inference_mode():
        for i in range(n):
            orig = r.blocks[i]
            shape, size = block_shape(orig, layout), _count(orig)
            measured: dict[tuple[float, float], tuple[float, int]] = {(0.0, 0.0): (0.0, size)}
            rats, dists, params = [], [], []
            for c in choices:
                pair = snap_ratio(shape, float(c))
                if pair is not None and pair not in measured:
                    measured[pair] = _measure(ctx, i, layout, pair, importance)
                d, p = measured[pair] if pair is not None else (math.inf, size)
                rats.append(pair)
                dists.append(d)
                params.append(p)
                ctx.advance(task)
            table.ratios.append(rats)
            table.distortion.append(dists)
            table.params.append(params)
    ctx.cache[key] = (importance, table)
    return table


def _measure(ctx: ScoringContext, i: int, layout: Layout, pair: tuple[float, float],
             importance: WidthImportance) -> tuple[float, int]:
    """(mean divergence, block params) with block i alone pruned at `pair`; the model is restored afterwards."""
    r = ctx.runner
    orig = r.blocks[i]
    pruned = copy.deepcopy(orig)
    groups, channels = _plan_block(i, pruned, layout, pair, importance)
    slice_block(pruned, layout, groups, channels)
    vals = []
    r.blocks[i] = pruned
    try:
        for b, batch in enumerate(r.batches):
            h = r.run_block(batch, i, batch.inputs[i])
            vals.append(ctx.divergence(b, r.run_from(batch, i + 1, h)))
    finally:
        r.blocks[i] = orig
    return float(torch.cat(vals).mean()), _count(pruned)


def adaptive_ratios(ctx: ScoringContext, importance: WidthImportance, target_ratio: float,
                    choices: tuple[float, ...] = CHOICES) -> Ratios:
    """One ratio per block (shared by its attention and FFN, attention rounded to whole KV groups) minimising the
    summed per-block divergence while removing at least as many parameters as the uniform `target_ratio`."""
    from compress.quantize.allocate import solve_dp

    target = _check_ratio("target_ratio", target_ratio)
    table = distortion_table(ctx, importance, choices)
    layout = layout_of(ctx.runner.model, ctx.lmap)
    n = len(table.ratios)
    uniform, budget = [], 0
    for i in range(n):
        blk = ctx.runner.blocks[i]
        pair = snap_ratio(block_shape(blk, layout), target)
        if pair is None:
            raise UserError(f"target_ratio {target:g} would remove every KV group or FFN channel of block {i}; "
                            "use a smaller target")
        uniform.append(pair)
        budget += _pruned_params(blk, layout, pair)
    allowed = [[p for p, d in zip(ps, ds, strict=True) if not math.isinf(d)]
               for ps, ds in zip(table.params, table.distortion, strict=True)]
    if any(not row for row in allowed):
        raise UserError("choices: some block has no allowed candidate ratio; include 0 in choices")
    floor = [min(row) for row in allowed]
    if sum(floor) > budget:
        raise UserError(f"target_ratio {target:g} removes more than the largest candidate ratio in choices "
                        f"({max(choices):g}) can; add larger choices or lower the target")
    sizes = [[max(0, p - floor[i]) for p in row] for i, row in enumerate(table.params)]
    picks = solve_dp(table.distortion, sizes, budget - sum(floor), resolution=1 << 16)
    out = {i: table.ratios[i][c] for i, c in enumerate(picks)}
    # The DP rounds sizes up to its resolution; if that ever hides the uniform solution and it is better, keep it.
    cols = [table.ratios[i].index(uniform[i]) if uniform[i] in table.ratios[i] else None for i in range(n)]
    if None not in cols:
        uni_d = sum(table.distortion[i][c] for i, c in enumerate(cols))
        if uni_d < sum(table.distortion[i][c] for i, c in enumerate(picks)):
            out = dict(enumerate(uniform))
    return out


def _pruned_params(block: nn.Module, layout: Layout, pair: tuple[float, float]) -> int:
    """Params of `block` after pruning at `pair` (counted from the shapes, no copy)."""
    s = block_shape(block, layout)
    g, c = removal_counts(0, s, pair)
    per, hd = s["heads"] // s["kv_heads"], s["head_dim"]
    removed = 0
    heads = g * per
    for path, rows in ((layout.q, heads * hd), (layout.k, g * hd), (layout.v, g * hd)):
        lin = block.get_submodule(path)
        removed += rows * (lin.in_features + (lin.bias is not None))
    removed += heads * hd * block.get_submodule(layout.o).out_features
    for path in (layout.gate, layout.up):
        if path is not None:
            lin = block.get_submodule(path)
            removed += c * (lin.in_features + (lin.bias is not None))
    removed += c * block.get_submodule(layout.down).out_features
    return _count(block) - removed


# ------------------------------------------------------------------------------------------------- artifact


def save_width_pruned(loaded, record: dict, out_dir: Path, manifest: dict[str, Any] | None = None) -> Path:
    """Write the width-pruned model in `loaded` to `out_dir` atomically: safetensors + config + tokenizer +
    compress.json (format compress-width-v1, with `per_layer_shapes`). When the config describes the shapes the
    weights are tagged as plain PyTorch ones, so transformers' from_pretrained loads the directory too; otherwise
    it refuses them instead of loading mismatched shapes."""
    from compress.artifact import save_dir

    plain = bool(record.get("uniform") and record.get("config_updated"))
    fields = {"per_layer_shapes": {str(i): s for i, s in record["per_layer_shapes"].items()}, "width": record,
              **(manifest or {})}
    return save_dir(loaded, out_dir, FORMAT, fields, "pt" if plain else FORMAT)


def load_width_pruned(path: Path, manifest: dict[str, Any] | None = None):
    """Rebuild a model saved by `save_width_pruned`: skeleton from config, every block sliced to its stored shape,
    then the weights loaded strictly. Returns a LoadedModel."""
    from compress.artifact import MANIFEST, rebuild
    from compress.models.layers import layer_map

    path = Path(path)
    if manifest is None:
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"{path}/{MANIFEST}: cannot read the manifest ({exc})") from exc
    if manifest.get("format") != FORMAT:
        raise UserError(f"{path}: artifact format {manifest.get('format')!r} is not {FORMAT}")

    def slice_to_shapes(model) -> None:
        lmap = layer_map(model)
        layout = layout_of(model, lmap)
        shapes = {int(k): v for k, v in manifest.get("per_layer_shapes", {}).items()}
        if sorted(shapes) != list(range(lmap.num_blocks)):
            raise UserError(f"{path}/{MANIFEST}: per_layer_shapes cover blocks {sorted(shapes)}, but config.json "
                            f"has {lmap.num_blocks} blocks")
        for b in lmap.blocks:
            blk = model.get_submodule(b.path)
            want, have = shapes[b.index], block_shape(blk, layout)
            ok = (want["head_dim"] == have["head_dim"] and want["kv_heads"] <= have["kv_heads"]
                  and want["intermediate"] <= have["intermediate"] and want["kv_heads"] > 0
                  and want["heads"] * have["kv_heads"] == have["heads"] * want["kv_heads"])
            if not ok:
                raise UserError(f"{path}/{MANIFEST}: block {b.index} shape {want} does not fit the model in "
                                f"config.json ({have})")
            slice_block(blk, layout, list(range(want["kv_heads"])), list(range(want["intermediate"])))

    return rebuild(path, manifest, slice_to_shapes, "per_layer_shapes")
