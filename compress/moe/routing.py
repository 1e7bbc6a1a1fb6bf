"""Routing of MoE models: the selection rule shared by every block we build, and forward hooks that capture, per
layer, which experts each token chose (and, when asked, the router scores s) on given token windows.

Scores are softmax (mixtral, qwen2_moe, qwen3_moe, olmoe) or sigmoid (deepseek_v3) of the router logits. Selection
is the top-k of (s − q) for a block's selection-only bias q (zero for an original block); weights come from s.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from compress.moe.bip import capacity_limit, fit_bias_bip
from compress.moe.layout import MoeLayer, moe_layers

if TYPE_CHECKING:
    from compress.data import Windows
    from compress.models.hf import LoadedModel


def as_module(model: nn.Module | LoadedModel) -> nn.Module:
    """The nn.Module of a LoadedModel, or the module itself."""
    return getattr(model, "module", model)


def router_scores(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    """Router scores s in float32: softmax or sigmoid of the logits over experts."""
    return F.softmax(logits, dim=-1, dtype=torch.float) if scoring == "softmax" else logits.float().sigmoid()


def select(scores: torch.Tensor, top_k: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the top-k experts of (s − bias) per token (of s when there is no bias)."""
    return torch.topk(scores if bias is None else scores - bias, top_k, dim=-1).indices


def route(scores: torch.Tensor, top_k: int, bias: torch.Tensor | None = None,
          runtime_capacity: float | None = None) -> torch.Tensor:
    """The experts each token of one forward pass takes: top-k of (s − bias), and with `runtime_capacity` the BIP
    solved again on these tokens (warm from the bias), so that no expert takes more than that multiple of the mean
    load whatever the text; skipped when the pass has too few tokens for the capacity to hold them."""
    tokens, experts = scores.shape
    cap = None if runtime_capacity is None else capacity_limit(tokens, top_k, experts, runtime_capacity)
    if cap is None or cap * experts < tokens * top_k:
        return select(scores, top_k, bias)
    c = scores - (0.0 if bias is None else bias)
    return _within_capacity(c - fit_bias_bip(c, top_k, runtime_capacity), top_k, cap)


def _within_capacity(c: torch.Tensor, top_k: int, cap: int) -> torch.Tensor:
    """Top-k of `c` with no expert over `cap` tokens: where the BIP's sweeps stopped short, an over-full expert
    keeps its `cap` tokens of highest margin and the rest move to their next choice, until none is over."""
    c = c.clone()
    for _ in range(2 * c.shape[-1]):
        values, idx = torch.topk(c, top_k + 1 if top_k < c.shape[-1] else top_k, dim=-1)
        chosen = idx[:, :top_k]
        load = torch.bincount(chosen.reshape(-1), minlength=c.shape[-1])
        if int(load.max()) <= cap:
            break
        rival = values[:, -1:]  # the (k+1)-th value: what a token falls back to
        for e in torch.nonzero(load > cap).flatten().tolist():
            tokens = torch.nonzero((chosen == e).any(-1)).flatten()
            margin = c[tokens, e] - rival[tokens, 0]
            c[tokens[torch.argsort(margin, stable=True)[:len(tokens) - cap]], e] = -math.inf
    return torch.topk(c, top_k, dim=-1).indices


def combine_weights(scores: torch.Tensor, indices: torch.Tensor, normalize: bool, scale: float = 1.0) -> torch.Tensor:
    """Weights of the chosen experts, from the original scores s; renormalised to sum 1 when the family does."""
    w = scores.gather(-1, indices)
    if normalize:
        w = w / w.sum(dim=-1, keepdim=True)
    return w * scale if scale != 1.0 else w


def group_mask(choice: torch.Tensor, n_group: int, topk_group: int) -> torch.Tensor:
    """deepseek_v3's group-limited routing: bool [tokens, E], True in the `topk_group` groups whose two best
    selection scores (`choice` = s − q) sum highest."""
    tokens, n_exp = choice.shape
    group_scores = choice.view(tokens, n_group, n_exp // n_group).topk(2, dim=-1).values.sum(dim=-1)
    keep = torch.zeros_like(group_scores, dtype=torch.bool)
    keep.scatter_(1, torch.topk(group_scores, topk_group, dim=-1, sorted=False).indices, True)
    return keep.unsqueeze(-1).expand(-1, -1, n_exp // n_group).reshape(tokens, n_exp)


def block_bias(block: nn.Module) -> torch.Tensor | None:
    """The selection-only bias q of a sparse block we built (None for an original block)."""
    return getattr(block, "selection_bias", None)


def block_route(block: nn.Module, scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """`route` with a block's own selection bias and runtime capacity (none for an original block)."""
    return route(scores, top_k, block_bias(block), getattr(block, "runtime_capacity", None))


@dataclass
class LayerRouting:
    """What one layer's router did on the captured tokens."""

    layer: MoeLayer
    chunks: list[torch.Tensor] = field(default_factory=list)  # chosen expert indices, [tokens, k] int16/int32
    weight_chunks: list[torch.Tensor] = field(default_factory=list)  # their routing weights, float32
    score_chunks: list[torch.Tensor] | None = None  # router scores s, [tokens, E] float32, when kept
    entropy_sum: float = 0.0  # sum over tokens of the entropy (nats) of s (normalised to sum 1 for sigmoid)

    @property
    def tokens(self) -> int:
        """Tokens captured."""
        return sum(len(c) for c in self.chunks)

    @property
    def indices(self) -> torch.Tensor:
        """Chosen experts [tokens, k] (int64)."""
        return _cat(self.chunks, (0, self.layer.top_k), torch.int64)

    @property
    def weights(self) -> torch.Tensor:
        """Routing weights of the chosen experts [tokens, k]."""
        return _cat(self.weight_chunks, (0, self.layer.top_k), torch.float32)

    @property
    def scores(self) -> torch.Tensor:
        """Router scores [tokens, E] (only when captured with keep_scores)."""
        if self.score_chunks is None:
            raise ValueError("router scores were not kept: capture with keep_scores=True")
        return _cat(self.score_chunks, (0, self.layer.num_experts), torch.float32)


class _Stop(Exception):
    """Raised by a hook to end the forward pass once the last wanted layer is captured."""


class RoutingCapture:
    """Forward hooks on the routers of `model` (every MoE layer, or `layers`) recording a LayerRouting per layer
    index while open; the caller sets `mask` (flattened attention mask) before each forward pass."""

    def __init__(self, model: nn.Module | LoadedModel, keep_scores: bool | set[int] = False,
                 layers: set[int] | None = None, stop_after: int | None = None):
        self.model = as_module(model)
        self.keep_scores = keep_scores
        self.stop_after = stop_after
        self.mask: torch.Tensor | None = None  # flattened attention mask of the running forward, set by the caller
        self.enabled = True
        wanted = [m for m in moe_layers(self.model) if layers is None or m.index in layers]
        keep = {m.index for m in wanted} if keep_scores is True else set(keep_scores or ())
        self.layers = {m.index: LayerRouting(m, score_chunks=[] if m.index in keep else None) for m in wanted}
        self._handles: list = []

    def __enter__(self) -> RoutingCapture:
        for rec in self.layers.values():
            router = self.model.get_submodule(rec.layer.router)
            block = self.model.get_submodule(rec.layer.path)
            self._handles.append(router.register_forward_hook(self._hook(rec, router, block)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Record nothing while open (another capture on the same model is running its forward)."""
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = True

    def _hook(self, rec: LayerRouting, router: nn.Module, block: nn.Module):
        width = torch.int16 if rec.layer.num_experts < 2 ** 15 else torch.int32

        def hook(module, args, output):
            if not self.enabled:
                return
            x = args[0].reshape(-1, args[0].shape[-1])
            if isinstance(output, tuple):  # deepseek_v3: the router returns (indices, weights) itself
                indices, weights = output
                scores = router_scores(F.linear(x.float(), router.weight.float()), rec.layer.scoring)
            else:
                scores = router_scores(output.reshape(-1, output.shape[-1]), rec.layer.scoring)
                indices = block_route(block, scores, rec.layer.top_k)
                weights = combine_weights(scores, indices, rec.layer.normalize)
            keep = self.mask if self.mask is not None and self.mask.numel() == len(scores) else None
            if keep is not None:
                scores, indices, weights = scores[keep], indices[keep], weights[keep]
            rec.chunks.append(indices.detach().to(width))
            rec.weight_chunks.append(weights.detach().float())
            if rec.score_chunks is not None:
                rec.score_chunks.append(scores.detach())
            rec.entropy_sum += float(_entropy(scores).sum())
            if self.stop_after is not None and rec.layer.index == self.stop_after:
                raise _Stop

        return hook


@torch.inference_mode()
def capture_routing(model: nn.Module | LoadedModel, windows: Windows, keep_scores: bool | set[int] = False,
                    layers: set[int] | None = None, stop_after: int | None = None) -> dict[int, LayerRouting]:
    """Run `windows` (compress.data.Windows) one by one and return each MoE layer's routing, keyed by layer index;
    `keep_scores`: all layers' router scores (True) or those of the given layer indices; `stop_after` ends every
    forward pass after that layer (cheaper when only early layers are wanted)."""
    module = as_module(model)
    if getattr(getattr(module, "config", None), "output_router_logits", False):
        stop_after = None  # transformers restores its router-logit recorders only after a forward that returns
    with RoutingCapture(module, keep_scores, layers, stop_after) as cap:
        for ids, mask in zip(windows.input_ids, windows.attention_mask, strict=True):
            with _stopping():
                forward(module, cap, ids.unsqueeze(0), mask.unsqueeze(0))
    return cap.layers


def forward(module: nn.Module, cap: RoutingCapture | None, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One forward pass of a causal LM (logits returned), telling `cap` which tokens are real."""
    if cap is not None:
        cap.mask = mask.reshape(-1).bool()
    return module(input_ids=ids, attention_mask=mask, use_cache=False).logits


@contextlib.contextmanager
def _stopping() -> Iterator[None]:
    with contextlib.suppress(_Stop):
        yield


def _entropy(scores: torch.Tensor) -> torch.Tensor:
    p = scores / scores.sum(dim=-1, keepdim=True)
    return -(p * p.clamp_min(1e-30).log()).sum(dim=-1).double()


def _cat(chunks: list[torch.Tensor], empty_shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    return torch.cat(chunks).to(dtype) if chunks else torch.zeros(empty_shape, dtype=dtype)


def max_entropy(num_experts: int) -> float:
    """Entropy (nats) of a uniform distribution over `num_experts`."""
    return math.log(num_experts)
