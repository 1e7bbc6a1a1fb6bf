"""FinerCut: attention and FFN sublayers of every block are separate candidates, removed greedily by the divergence of
the final distribution. A removed sublayer is replaced by a `Removed` module, so its residual branch contributes
nothing and its weights are gone; measuring a candidate in block i replays only blocks i.. from cached states.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch
from torch import nn

from compress.importance.context import ScoringContext
from compress.models.layers import LayerMap
from compress.prune.selection import Selection

SubUnit = tuple[int, str]  # (block index, sublayer name)


class Removed(nn.Module):
    """Stands in for a removed sublayer (rules as in layers.SKIP_RULES): zeros for a pre-norm residual branch, its
    input for a post-norm part, the residual argument for BERT-style output parts; tuple-shaped like the original."""

    def __init__(self, rule: str = "zero", tuple_len: int = 0, attrs: dict | None = None):
        super().__init__()
        self.rule, self.tuple_len, self.attrs = rule, tuple_len, dict(attrs or {})
        for k, v in self.attrs.items():  # flags the block reads from its sublayer (e.g. Gemma 3's is_sliding)
            setattr(self, k, v)

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if self.rule == "zero":
            out = torch.zeros_like(hidden)
            self._keep_cache_length(hidden, kwargs)
        elif self.rule == "input":
            out = hidden
        else:  # residual: g(h, x) -> x
            out = args[1] if len(args) > 1 else kwargs["input_tensor"]
        return (out, *([None] * (self.tuple_len - 1))) if self.tuple_len else out

    def _keep_cache_length(self, hidden: torch.Tensor, kwargs: dict) -> None:
        """A removed attention still appends zero keys/values per token to the KV cache, so the cache's length (read
        from layer 0 for masks and positions) stays right when generating. They have the layer's original shape
        (`cache_heads` × `cache_dim`) when known, so an exported graph's past inputs keep one shape per layer."""
        cache = kwargs.get("past_key_values", kwargs.get("past_key_value"))
        if self.tuple_len and cache is not None and hasattr(cache, "update") and isinstance(self.attrs.get(
                "layer_idx"), int):
            heads, dim = self.attrs.get("cache_heads", 1), self.attrs.get("cache_dim", 1)
            empty = hidden.new_zeros(hidden.shape[0], heads, hidden.shape[1], dim)
            cache.update(empty, empty, self.attrs["layer_idx"], {"cache_position": kwargs.get("cache_position")})

    def spec(self) -> dict:
        """How to rebuild this module (stored in the artifact manifest)."""
        return {"rule": self.rule, "tuple_len": self.tuple_len, "attrs": self.attrs}

    def extra_repr(self) -> str:
        return f"rule={self.rule}, tuple_len={self.tuple_len}"


def candidates(lmap: LayerMap) -> list[SubUnit]:
    """Every (block, sublayer) pair of the stack."""
    return [(b.index, name) for b in lmap.blocks for name in b.sublayers]


def replacements(model: nn.Module, lmap: LayerMap, units: list[SubUnit], arity: dict[str, int]) -> dict[str, Removed]:
    """Module path -> Removed stand-in for every child of the sublayers in `units` (the hooked child takes the
    sublayer's skip rule; other children, e.g. BERT's intermediate, pass their input through)."""
    out: dict[str, Removed] = {}
    for i, name in units:
        sub = lmap.blocks[i].sublayers[name]
        for path in sub.paths:
            rule, arity_ = (sub.skip, arity.get(path, 0)) if path == sub.hook_path else ("input", 0)
            module = model.get_submodule(path)
            out[path] = Removed(rule, arity_, {**plain_attributes(module), **cache_shape(module)})
    return out


def cache_shape(module: nn.Module) -> dict:
    """KV heads and head dim of an attention module with a key projection (what its cache entries look like)."""
    key = next((getattr(module, n) for n in ("k_proj", "key") if isinstance(getattr(module, n, None), nn.Linear)),
               None)
    dim = getattr(module, "head_dim", None)
    if key is None or not isinstance(dim, int) or dim <= 0 or key.out_features % dim:
        return {}
    return {"cache_heads": key.out_features // dim, "cache_dim": dim}


def plain_attributes(module: nn.Module) -> dict:
    """The module's public bool/int/float/str attributes (what a block may read from its sublayer)."""
    return {k: v for k, v in vars(module).items()
            if not k.startswith("_") and k != "training" and isinstance(v, bool | int | float | str)}


def swap(model: nn.Module, modules: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Put `modules` at their paths; return what was there before."""
    old = {}
    for path, mod in modules.items():
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        old[path] = getattr(parent, attr)
        setattr(parent, attr, mod)
    return old


@contextlib.contextmanager
def without(model: nn.Module, lmap: LayerMap, units: list[SubUnit], arity: dict[str, int]) -> Iterator[None]:
    """Within the context, the sublayers in `units` are swapped for Removed modules (they cost no compute)."""
    old = swap(model, replacements(model, lmap, units, arity))
    try:
        yield
    finally:
        swap(model, old)


def output_arity(model: nn.Module, lmap: LayerMap, kind: str) -> dict[str, int]:
    """Hooked child path -> tuple length of its output (0 for a tensor), from one forward of 4 dummy tokens."""
    paths = [s.hook_path for b in lmap.blocks for s in b.sublayers.values()]
    seen: dict[str, int] = {}
    handles = []
    for p in paths:
        def hook(module, args, output, p=p):
            seen[p] = len(output) if isinstance(output, tuple) else 0
        handles.append(model.get_submodule(p).register_forward_hook(hook))
    ids = torch.zeros(1, 4, dtype=torch.long)
    try:
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=torch.ones_like(ids), **({"use_cache": False} if kind == "decoder"
                                                                         else {}))
    finally:
        for h in handles:
            h.remove()
    return seen


def finercut(ctx: ScoringContext, count: int | None = None, max_params: int | None = None) -> Selection:
    """Remove sublayers one at a time, each step the one whose removal (with the earlier ones gone) moves the
    output least; stop after `count` removals or once the model has at most `max_params` parameters."""
    t0 = time.perf_counter()
    lmap, r = ctx.lmap, ctx.runner
    arity = output_arity(r.model, lmap, ctx.loaded.kind)
    params = {u: lmap.blocks[u[0]].sublayers[u[1]].params for u in candidates(lmap)}
    total = sum(p.numel() for p in r.model.parameters())
    sel = Selection("finercut", [])
    per_step = len(r.batches)
    task = ctx.task("finercut", sum(len(params) - s for s in range(count)) * per_step if count else None)
    while len(sel.removed) < len(params):
        if count is not None and len(sel.removed) >= count:
            break
        if max_params is not None and total - sum(params[u] for u in sel.removed) <= max_params:
            break
        remaining = [u for u in params if u not in sel.removed]
        scores = _removal_divergence(ctx, sel.removed, remaining, arity, task)
        best = min(remaining, key=lambda u: (scores[u], u))
        sel.removed.append(best)
        sel.scores.append(scores)
        sel.divergence.append(scores[best])
    sel.seconds = time.perf_counter() - t0
    return sel


def _removal_divergence(ctx: ScoringContext, removed: list[SubUnit], remaining: list[SubUnit],
                        arity: dict[str, int], task=None) -> dict[SubUnit, float]:
    """Divergence with `removed` + {u} gone, for every u in `remaining`: block i is rerun from the cached (current)
    input of block i, then the blocks after it."""
    r, lmap = ctx.runner, ctx.lmap
    n = len(r.blocks)
    first = min((i for i, _ in removed), default=n)
    vals: dict[SubUnit, list[torch.Tensor]] = {u: [] for u in remaining}
    with torch.inference_mode(), without(r.model, lmap, removed, arity):
        for b, batch in enumerate(r.batches):
            hs = list(batch.inputs[:first + 1])
            for k in range(first, n):
                hs.append(r.run_block(batch, k, hs[-1]))
            for u in remaining:
                with without(r.model, lmap, [u], arity):
                    h = r.run_block(batch, u[0], hs[u[0]])
                vals[u].append(ctx.divergence(b, r.run_from(batch, u[0] + 1, h)))
                ctx.advance(task)
    return {u: float(torch.cat(v).mean()) for u, v in vals.items()}


def remove_sublayers(model: nn.Module, lmap: LayerMap, units: list[SubUnit], kind: str) -> dict[str, dict]:
    """Replace the sublayers in `units` by Removed modules in place; return {module path: Removed spec}."""
    mods = replacements(model, lmap, units, output_arity(model, lmap, kind))
    swap(model, mods)
    return {p: m.spec() for p, m in mods.items()}
