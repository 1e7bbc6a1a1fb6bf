"""LayerMap and BlockRunner on a tiny random model of every family (no downloads)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import FAMILIES, VOCAB, build
from torch import nn

from compress.data import Windows
from compress.models.layers import layer_map
from compress.models.runner import BlockRunner, skipped

EXPECTED_LINEARS = {"llama": 7, "qwen2": 7, "qwen3": 7, "mistral": 7, "gemma": 7, "gemma2": 7, "gemma3_text": 7,
                    "gpt2": 4, "bert": 6}


def _windows(n: int = 2, length: int = 12) -> Windows:
    ids = torch.randint(4, VOCAB, (n, length), generator=torch.Generator().manual_seed(1))
    return Windows(ids, torch.ones_like(ids), "calibration", "test", 0)


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_map_finds_blocks_sublayers_linears(family):
    loaded = build(family)
    lmap = layer_map(loaded.module)
    assert lmap.num_blocks == 3
    assert lmap.adapter != "generic"
    for blk in lmap.blocks:
        assert set(blk.sublayers) == {"attn", "mlp"}
        assert len(blk.linears) == EXPECTED_LINEARS[family]
        assert blk.params == sum(p.numel() for p in loaded.module.get_submodule(blk.path).parameters())
        assert sum(s.params for s in blk.sublayers.values()) <= blk.params
    d = lmap.to_dict()
    assert d["num_blocks"] == 3 and len(d["blocks"]) == 3
    if loaded.kind == "decoder":
        assert lmap.head is not None and lmap.final_norm is not None and lmap.embeddings is not None


@pytest.mark.parametrize("family", FAMILIES)
def test_runner_replays_the_recorded_forward(family):
    loaded = build(family)
    lmap = layer_map(loaded.module)
    w = _windows()
    runner = BlockRunner(loaded, lmap, w)
    batch = runner.batches[0]
    with torch.inference_mode():
        replay = runner.run_from(batch, 0, batch.inputs[0])
        torch.testing.assert_close(replay, batch.inputs[-1], atol=1e-5, rtol=1e-5)
        if loaded.kind == "decoder":
            full = loaded.module(input_ids=w.input_ids, attention_mask=w.attention_mask, use_cache=False).logits
            ours = runner.logits(runner.final_hidden(replay))
        else:
            full = loaded.module(input_ids=w.input_ids, attention_mask=w.attention_mask).last_hidden_state
            ours = replay
        torch.testing.assert_close(ours, full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_skipping_a_sublayer_removes_exactly_its_branch(family):
    """Skipping both sublayers of a block makes it the identity (pre-norm and post-norm styles alike)."""
    loaded = build(family)
    lmap = layer_map(loaded.module)
    runner = BlockRunner(loaded, lmap, _windows())
    batch = runner.batches[0]
    blk = lmap.blocks[1]
    x = batch.inputs[1]
    with torch.inference_mode():
        with skipped(runner.model, blk.sublayers["attn"]), skipped(runner.model, blk.sublayers["mlp"]):
            both = runner.run_block(batch, 1, x)
        with skipped(runner.model, blk.sublayers["mlp"]):
            no_mlp = runner.run_block(batch, 1, x)
        normal = runner.run_block(batch, 1, x)
    torch.testing.assert_close(both, x)
    assert not torch.allclose(no_mlp, normal)
    torch.testing.assert_close(normal, batch.inputs[2], atol=1e-5, rtol=1e-5)


def test_generic_fallback_finds_largest_stack_of_identical_blocks():
    class Blk(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = nn.Linear(8, 8)
            self.ffn = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
            self.norm = nn.LayerNorm(8)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.small = nn.ModuleList([nn.Linear(2, 2) for _ in range(5)])
            self.trunk = nn.ModuleList([Blk() for _ in range(4)])

    lmap = layer_map(Net())
    assert lmap.blocks_path == "trunk" and lmap.num_blocks == 4
    assert lmap.adapter == "generic" and lmap.notes
    assert set(lmap.blocks[0].sublayers) == {"attn", "mlp"}
    assert lmap.blocks[0].linears == ["trunk.0.attention", "trunk.0.ffn.0", "trunk.0.ffn.2"]
    assert lmap.blocks[0].norms == ["trunk.0.norm"]
    assert lmap.blocks[0].sublayers["mlp"].params == 8 * 16 + 16 + 16 * 8 + 8


def test_tied_parameters_counted_once():
    loaded = build("llama")
    model = loaded.module
    model.lm_head.weight = model.model.embed_tokens.weight
    lmap = layer_map(model)
    unique = {id(p): p.numel() for p in model.parameters()}
    assert lmap.total_params == sum(unique.values())
