"""The library's transforms as plain calls, in torchao's manner: each changes a model in place and only transforms —
no loading, evaluating or saving (the flows do those once, around them).

    import compress
    model = AutoModelForCausalLM.from_pretrained(...)
    compress.quantize_(model, QuantSpec(4, 32))                 # or a Plan (per-module rules)
    compress.prune_(model, blocks=[20, 21])                      # or sublayers=[(3, "attn")]
    compress.reparam_(model, ["fold-norm"], untie=True)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from compress.data import Windows
    from compress.models.hf import LoadedModel
    from compress.plan import Plan
    from compress.quantize.spec import QuantSpec
    from compress.reparam.record import Record


def as_loaded(model: nn.Module | LoadedModel) -> LoadedModel:
    """A LoadedModel around a bare module (kind from its config: encoder, decoder, or a plain module)."""
    from compress.models.hf import ENCODER_TYPES, LoadedModel

    if isinstance(model, LoadedModel):
        return model
    from torch import nn

    family = getattr(getattr(model, "config", None), "model_type", None)
    if family is None:
        kind = "cnn" if any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules()) else "module"
    else:
        kind = "encoder" if family in ENCODER_TYPES else "decoder"
    return LoadedModel(model, None, kind, family or type(model).__name__, type(model).__name__)


def quantize_(model: nn.Module | LoadedModel, plan: Plan | QuantSpec, calibration: Windows | None = None,
              progress: Any = None) -> dict[str, QuantSpec]:
    """Quantize in place by `plan` (a Plan, or one QuantSpec for every block Linear); methods that need data (GPTQ)
    use `calibration`. Returns the spec each quantized module got."""
    from compress.models.layers import layer_map
    from compress.plan import Plan
    from compress.quantize.pipeline import quantize

    loaded = as_loaded(model)
    lmap = layer_map(loaded.module)
    if not isinstance(plan, Plan):
        plan = Plan.uniform(plan, [p for b in lmap.blocks for p in b.linears])
    specs, _ = quantize(loaded, lmap, plan, calibration, progress)
    return specs


def prune_(model: nn.Module | LoadedModel, blocks: Sequence[int] = (),
           sublayers: Sequence[tuple[int, str]] = ()) -> dict[str, Any]:
    """Remove whole blocks (renumbered, config trimmed) and/or sublayers ((block, 'attn' | 'mlp'), replaced by
    their skip) in place; returns what was removed."""
    from compress.models.layers import layer_map
    from compress.prune.blocks import remove_blocks
    from compress.prune.sublayers import remove_sublayers

    loaded = as_loaded(model)
    out: dict[str, Any] = {}
    if sublayers:  # first: their block indices refer to the model as given
        out["sublayers"] = remove_sublayers(loaded.module, layer_map(loaded.module), list(sublayers), loaded.kind)
    if blocks:
        out["blocks"] = remove_blocks(loaded.module, layer_map(loaded.module), list(blocks))
    return out


def reparam_(model: nn.Module, passes: Sequence[str], sample_inputs: Any = None, **options: Any) -> list[Record]:
    """Apply reparameterization passes (compress.reparam.PASSES) in order, each checked to keep the outputs
    (UserError if one does not); `options` as apply_passes takes them (untie, allow_growth, tol, adapter)."""
    from compress.reparam.passes import apply_passes, sample_inputs_for

    if sample_inputs is None:
        sample_inputs = sample_inputs_for(as_loaded(model))
    return apply_passes(model, list(passes), sample_inputs, **options)
