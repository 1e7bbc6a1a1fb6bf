"""Structural reparameterization: deployment graphs without training-time structure.

Passes (one module each, each `apply(model, sample_inputs=None, ...) -> Record`, exact, checked automatically):
  fold-bn         BatchNorm into the Conv/Linear before it (or after it, where exact)   compress.reparam.bn_fold
  merge-branches  RepVGG-style parallel conv branches into one conv                    compress.reparam.repvgg
  fold-norm       LayerNorm/RMSNorm affine into the following Linear layers            compress.reparam.norm_fold
  merge-linear    Linear -> Linear with nothing between into one Linear                compress.reparam.merge_linear
`run_reparam` (compress.reparam.passes) applies a list of passes to a model spec / LoadedModel / nn.Module and saves.
"""

from compress.reparam.check import compare, equivalence, outputs
from compress.reparam.passes import PASSES, apply_passes
from compress.reparam.record import Record

__all__ = ["PASSES", "Record", "apply_passes", "compare", "equivalence", "outputs"]
