"""What scorers share: the model, its LayerMap, the windows, a BlockRunner and the reference outputs."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

from compress.data import Windows
from compress.metrics import cosine_distance, kl_per_token, log_softmax_chunked
from compress.models.hf import LoadedModel
from compress.models.layers import LayerMap
from compress.models.runner import BlockRunner, CachedBatch

KL_NAME = "kl"
EMB_NAME = "1-cos(mean-pooled embedding)"


@dataclass
class ScoringContext:
    """Built once per `compress score`; expensive parts (runner, reference outputs) are made on first use."""

    loaded: LoadedModel
    lmap: LayerMap
    windows: Windows
    progress: object | None = None  # a rich Progress, or None for silence
    cache: dict = field(default_factory=dict)

    @property
    def divergence_name(self) -> str:
        """KL of the next-token distribution for decoders, 1 − cosine of pooled embeddings for encoders."""
        return KL_NAME if self.loaded.kind == "decoder" else EMB_NAME

    @cached_property
    def runner(self) -> BlockRunner:
        """Block inputs of every window, recorded by one forward pass."""
        return BlockRunner(self.loaded, self.lmap, self.windows)

    @cached_property
    def reference(self) -> list[torch.Tensor]:
        """Per batch: reference log-probs [b, L, V] (decoder) or pooled embeddings [b, d] (encoder)."""
        with torch.inference_mode():
            return [self._output(batch, batch.inputs[-1], raw=True) for batch in self.runner.batches]

    @cached_property
    def reference_probs(self) -> list[torch.Tensor | None]:
        """Per batch: exp of the reference log-probs (decoders), kept so each KL skips an exp pass."""
        if self.loaded.kind != "decoder":
            return [None] * len(self.reference)
        with torch.inference_mode():
            return [lp.exp() for lp in self.reference]

    def _output(self, batch: CachedBatch, last_hidden: torch.Tensor, raw: bool = False) -> torch.Tensor:
        r = self.runner
        if self.loaded.kind == "decoder":
            logits = r.logits(r.final_hidden(last_hidden))
            return log_softmax_chunked(logits) if raw else logits
        return r.pooled(batch, last_hidden)

    def divergence(self, batch_index: int, last_hidden: torch.Tensor) -> torch.Tensor:
        """Per-token KL (decoder) or per-window 1 − cosine (encoder) of a changed stack vs the reference."""
        batch = self.runner.batches[batch_index]
        out = self._output(batch, last_hidden)
        ref = self.reference[batch_index]
        if self.loaded.kind == "decoder":
            return kl_per_token(ref, out, self.reference_probs[batch_index]).reshape(-1)
        return cosine_distance(ref, out)

    def task(self, description: str, total: int):
        """A progress task id (or None when silent)."""
        return self.progress.add_task(description, total=total) if self.progress is not None else None

    def advance(self, task) -> None:
        """Advance a progress task by one step."""
        if self.progress is not None and task is not None:
            self.progress.advance(task)
