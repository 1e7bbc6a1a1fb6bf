"""Run a model's block stack from cached block inputs, so changing block i recomputes only blocks i and after.

One full forward records, for every block, the hidden state it receives and the other arguments it is called with
(attention mask, position embeddings, ...). Scorers then replay any suffix of the stack from any hidden state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from compress.data import Windows
from compress.metrics import pool_embedding
from compress.models.hf import LoadedModel
from compress.models.layers import LayerMap, Sublayer


@dataclass
class CachedBatch:
    """Block inputs for one batch of windows: inputs[i] enters block i, inputs[-1] leaves the last block."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    inputs: list[torch.Tensor] = field(default_factory=list)
    call_args: list[tuple[tuple, dict]] = field(default_factory=list)


class BlockRunner:
    """Replays the block stack from cached inputs; builds the model's output (logits or pooled embedding)."""

    def __init__(self, loaded: LoadedModel, lmap: LayerMap, windows: Windows, batch_windows: int = 4):
        self.loaded = loaded
        self.lmap = lmap
        self.model = loaded.module
        self.blocks = self.model.get_submodule(lmap.blocks_path)
        self.batches: list[CachedBatch] = []
        with torch.inference_mode():
            for s in range(0, len(windows.input_ids), batch_windows):
                self.batches.append(self._capture(windows.input_ids[s:s + batch_windows],
                                                  windows.attention_mask[s:s + batch_windows]))

    def _capture(self, ids: torch.Tensor, mask: torch.Tensor) -> CachedBatch:
        batch = CachedBatch(ids, mask)
        n = len(self.blocks)
        hooks = []

        def pre(module, args, kwargs):
            hidden, rest_args, rest_kwargs = _split_hidden(args, kwargs)
            batch.inputs.append(hidden.detach())
            batch.call_args.append((rest_args, dict(rest_kwargs)))

        def post(module, args, kwargs, output):
            batch.inputs.append(hidden_of(output).detach())

        for blk in self.blocks:
            hooks.append(blk.register_forward_pre_hook(pre, with_kwargs=True))
        hooks.append(self.blocks[n - 1].register_forward_hook(post, with_kwargs=True))
        try:
            base = getattr(self.model, "base_model", self.model)
            if self.loaded.kind == "decoder":
                base(input_ids=ids, attention_mask=mask, use_cache=False)
            else:
                base(input_ids=ids, attention_mask=mask)
        finally:
            for h in hooks:
                h.remove()
        if len(batch.inputs) != n + 1:
            raise RuntimeError(f"captured {len(batch.inputs)} block inputs for {n} blocks: the stack is not "
                               "called once per block in order")
        for _, rest_kwargs in batch.call_args:
            for k in ("past_key_values", "past_key_value", "layer_past"):
                rest_kwargs.pop(k, None)
            if "use_cache" in rest_kwargs:
                rest_kwargs["use_cache"] = False
        return batch

    def run_block(self, batch: CachedBatch, i: int, hidden: torch.Tensor) -> torch.Tensor:
        """Block i applied to `hidden` with the arguments it had in the recorded forward."""
        rest_args, rest_kwargs = batch.call_args[i]
        return hidden_of(self.blocks[i](hidden, *rest_args, **rest_kwargs))

    def run_from(self, batch: CachedBatch, start: int, hidden: torch.Tensor) -> torch.Tensor:
        """Blocks start..N-1 applied to `hidden`; start == N returns `hidden`."""
        for i in range(start, len(self.blocks)):
            hidden = self.run_block(batch, i, hidden)
        return hidden

    def final_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """The final norm (if the family has one) applied to the last block's output."""
        if self.lmap.final_norm:
            return self.model.get_submodule(self.lmap.final_norm)(hidden)
        return hidden

    def logits(self, normed: torch.Tensor) -> torch.Tensor:
        """LM-head logits of already-normed hidden states (with Gemma-style soft-capping)."""
        logits = self.model.get_submodule(self.lmap.head)(normed)
        cap = self.lmap.logit_softcap
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def pooled(self, batch: CachedBatch, hidden: torch.Tensor) -> torch.Tensor:
        """Sentence embedding of each window: mean over tokens (or the CLS token), as the encoder is used."""
        return pool_embedding(hidden, batch.attention_mask, self.loaded.pooling)


@contextlib.contextmanager
def skipped(model: nn.Module, sub: Sublayer) -> Iterator[None]:
    """Within the block, make `sub` contribute nothing (its residual branch removed) while the context is open."""
    target = model.get_submodule(sub.hook_path)

    def hook(module, args, kwargs, output):
        if sub.skip == "zero":
            replacement = torch.zeros_like(hidden_of(output))
        elif sub.skip == "input":
            replacement = _split_hidden(args, kwargs)[0]
        else:  # residual: g(h, x) -> x
            replacement = args[1] if len(args) > 1 else kwargs["input_tensor"]
        if isinstance(output, tuple):
            return (replacement, *output[1:])
        return replacement

    handle = target.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _split_hidden(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    if args:
        return args[0], args[1:], kwargs
    rest = dict(kwargs)
    return rest.pop("hidden_states"), (), rest


def hidden_of(output) -> torch.Tensor:
    """The hidden-state tensor of a block's output (tensor, tuple or ModelOutput)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    return output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
