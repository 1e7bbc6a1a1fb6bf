"""MoE routing capture and load statistics on tiny random models of every MoE family."""

from __future__ import annotations

import json

import pytest
import torch
from test_moe_layout import MOE_FAMILIES, tiny_moe

from compress.data import Windows
from compress.moe.layout import moe_layers
from compress.moe.plot import plot_coactivation, plot_load
from compress.moe.routing import capture_routing
from compress.moe.stats import moe_stats


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny MoE forwards are many small ops (index_add_ per expert): one thread avoids OpenMP overhead."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def windows(n: int = 4, seq_len: int = 32, seed: int = 0) -> Windows:
    """Random token windows for the 64-token vocabulary of the tiny models."""
    ids = torch.randint(0, 64, (n, seq_len), generator=torch.Generator().manual_seed(seed))
    return Windows(ids, torch.ones_like(ids), "calibration", "random", seed)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_stats_count_every_token_top_k_times(family):
    model = tiny_moe(family).module
    w = windows()
    stats = moe_stats(model, w)
    assert stats.tokens == w.num_tokens
    assert [s.index for s in stats.layers] == [m.index for m in moe_layers(model)]
    for s in stats.layers:
        assert sum(s.load) == s.tokens * s.top_k
        co = torch.tensor(s.coactivation)
        assert torch.equal(co, co.T) and co.diagonal().tolist() == s.load
        assert co.sum(1).tolist() == [n * s.top_k for n in s.load]  # each token chose top_k experts
        assert s.max_over_mean >= 1.0 and s.cv >= 0.0
        assert 0.0 < s.router_entropy <= s.max_entropy + 1e-6 and 0.0 < s.load_entropy <= s.max_entropy + 1e-6
        assert s.dead == [e for e, n in enumerate(s.load) if n == 0]
    d = json.loads(json.dumps(stats.to_dict()))
    assert d["worst_layer"] == stats.worst.index and len(d["layers"]) == len(stats.layers)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_captured_weights_follow_the_family(family):
    model = tiny_moe(family).module
    routing = capture_routing(model, windows(2), keep_scores=True)
    for rec in routing.values():
        w, idx, s = rec.weights, rec.indices, rec.scores
        assert s.shape == (rec.tokens, rec.layer.num_experts) and idx.shape == w.shape == (rec.tokens, 2)
        if family == "mixtral":  # softmax, top-2 renormalised
            assert torch.allclose(s.sum(-1), torch.ones(rec.tokens), atol=1e-5)
            assert torch.allclose(w.sum(-1), torch.ones(rec.tokens), atol=1e-5)
            assert torch.equal(idx.sort(-1).values, s.topk(2).indices.sort(-1).values)
        else:  # sigmoid, renormalised then scaled by routed_scaling_factor
            scale = model.config.routed_scaling_factor
            assert torch.allclose(w.sum(-1), torch.full((rec.tokens,), scale), atol=1e-4)
            assert torch.allclose(w, s.gather(1, idx) / s.gather(1, idx).sum(-1, keepdim=True) * scale, atol=1e-5)


def test_dead_expert_and_padding_mask():
    model = tiny_moe("mixtral").module
    block = model.model.layers[0].block_sparse_moe
    gate = torch.nn.Linear(64, 8, bias=True)
    with torch.no_grad():  # expert 3 of layer 0 can never win
        gate.weight.copy_(block.gate.weight)
        gate.bias.zero_()
        gate.bias[3] = -1e4
    block.gate = gate
    w = windows(2, 16)
    w.attention_mask[1, 10:] = 0
    stats = moe_stats(model, w)
    assert stats.tokens == 16 + 10
    assert 3 in stats.layers[0].dead and stats.layers[0].load[3] == 0
    assert sum(stats.layers[1].load) == 26 * 2


def test_plots_are_written(tmp_path):
    stats = moe_stats(tiny_moe("qwen2_moe").module, windows(2))
    assert plot_load(stats, tmp_path / "load.png").stat().st_size > 1000
    assert plot_coactivation(stats, tmp_path / "co.png").stat().st_size > 1000

