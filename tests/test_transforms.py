"""compress.quantize_ / prune_ / reparam_: the library's transforms on bare modules, in place, nothing loaded or
saved; each gives what the corresponding verb's transform gives."""

from __future__ import annotations

import torch
from tiny_models import build
from torch import nn

import compress
from compress.quantize.modules import QuantLinear
from compress.quantize.spec import QuantSpec


def _ids() -> torch.Tensor:
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))


def test_quantize_a_bare_module_in_place_like_the_uniform_plan():
    from compress.models.layers import layer_map
    from compress.plan import Plan
    from compress.quantize.pipeline import quantize

    model = build("llama").module
    twin = build("llama")  # the flows' path: a Plan over the block Linears through the pipeline
    lmap = layer_map(twin.module)
    quantize(twin, lmap, Plan.uniform(QuantSpec(4, 32), [p for b in lmap.blocks for p in b.linears]))
    with torch.no_grad():
        before = model(_ids()).logits
    specs = compress.quantize_(model, QuantSpec(4, 32))
    assert specs and all(s.bits == 4 for s in specs.values())
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == len(specs) == 3 * 7
    with torch.no_grad():
        after, same = model(_ids()).logits, twin.module(_ids()).logits
    assert torch.equal(after, same) and not torch.equal(after, before)


def test_prune_blocks_and_sublayers_in_place():
    model = build("llama").module
    removed = compress.prune_(model, blocks=[1], sublayers=[(0, "attn")])
    assert model.config.num_hidden_layers == 2 and len(model.model.layers) == 2
    assert list(removed["sublayers"]) == ["model.layers.0.self_attn"]
    with torch.no_grad():
        assert torch.isfinite(model(_ids()).logits).all()


def test_reparam_folds_and_keeps_the_outputs():
    from compress.reparam.repvgg import TinyRepVGG

    model = TinyRepVGG().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(x)
    records = compress.reparam_(model, ["fold-bn", "merge-branches"], x)
    assert [r.passed for r in records] == [True, True]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():
        assert torch.allclose(model(x), before, atol=1e-4, rtol=1e-4)
