"""MoE rebalancing: BIP-dual and greedy bias fitting, the balanced blocks (q = 0 is the identity), the balanced
artifact (compress-moe-v1) and the export-friendly dense-routed blocks, on tiny random models."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from test_moe_layout import MOE_FAMILIES, tiny_moe
from test_moe_stats import windows

from compress.artifact_formats import FORMATS, load_artifact
from compress.errors import UserError
from compress.moe.balanced import (
    FORMAT,
    BalancedSparseMoe,
    apply_bias,
    current_bias,
    evaluate_balance,
    rebalance,
    save_balanced,
)
from compress.moe.bip import biased_loads, capacity_tokens, fit_bias_bip, fit_bias_greedy
from compress.moe.export_ready import DenseRoutedMoe, export_friendly
from compress.moe.layout import moe_layers
from compress.moe.stats import moe_stats


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny MoE forwards are many small ops (index_add_ per expert): one thread avoids OpenMP overhead."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def skewed_scores(tokens: int = 4096, experts: int = 8, skew: float = 3.0, sigmoid: bool = False) -> torch.Tensor:
    """Router scores whose later experts are systematically preferred (max/mean load ≈ 2.9 for top-2)."""
    logits = torch.randn(tokens, experts, generator=torch.Generator().manual_seed(0)) + torch.linspace(0, skew, experts)
    return logits.sigmoid() if sigmoid else logits.softmax(-1)


def skew_router(model: torch.nn.Module, factor: float = 8.0) -> torch.nn.Module:
    """Scale one router row per MoE layer so that expert takes far more than its share."""
    with torch.no_grad():
        for m in moe_layers(model):
            model.get_submodule(m.router).weight[0] *= factor
    return model


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


IDS = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("sigmoid", [False, True])
@pytest.mark.parametrize("top_k", [1, 2])
def test_bip_reaches_capacity_on_skewed_scores(sigmoid, top_k):
    s = skewed_scores(sigmoid=sigmoid)
    mean = len(s) * top_k / s.shape[1]
    assert biased_loads(s, torch.zeros(8), top_k).max() / mean > 2.0
    history: list[float] = []
    q = fit_bias_bip(s, top_k, capacity=1.1, history=history)
    assert q.shape == (8,) and q.dtype == torch.float32 and q.min() == 0
    load = biased_loads(s, q, top_k)
    assert load.sum() == len(s) * top_k and load.max() <= capacity_tokens(len(s), top_k, 8, 1.1)
    assert history[-1] <= 1.1 and len(history) <= 101
    greedy: list[float] = []
    qg = fit_bias_greedy(s, top_k, capacity=1.1, lr=1e-3, history=greedy)
    assert qg.shape == (8,) and greedy[-1] < greedy[0]  # the baseline improves, not necessarily to the capacity
    print(f"sigmoid={sigmoid} top{top_k}: max/mean {history[0]:.3f} -> bip {history[-1]:.3f} ({len(history) - 1} "
          f"sweeps), greedy {greedy[-1]:.3f} ({len(greedy) - 1} steps)")


def test_capacity_is_validated():
    with pytest.raises(UserError, match="capacity"):
        fit_bias_bip(skewed_scores(64), 2, capacity=0.9)
    with pytest.raises(UserError, match="top_k"):
        fit_bias_greedy(skewed_scores(64), 9)
    with pytest.raises(UserError, match="method"):
        rebalance(tiny_moe("mixtral").module, windows(1), method="magic")


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_zero_bias_reproduces_the_model(family):
    model = tiny_moe(family).module
    ref = logits(model, IDS)
    apply_bias(model, {m.path: torch.zeros(m.num_experts) for m in moe_layers(model)})
    if family != "deepseek_v3":
        block = model.get_submodule(moe_layers(model)[0].path)
        assert isinstance(block, BalancedSparseMoe) and isinstance(block, type(tiny_moe(family).module.get_submodule(
            moe_layers(model)[0].path)))
    torch.testing.assert_close(logits(model, IDS), ref, atol=1e-5, rtol=0)
    if family in ("mixtral", "qwen3_moe"):  # router logits are still recorded (transformers records them by class)
        with torch.no_grad():
            out = model(input_ids=IDS, output_router_logits=True)
        assert len(out.router_logits) == 3 and out.aux_loss is not None


def test_bip_balances_a_skewed_mixtral():
    model = skew_router(tiny_moe("mixtral").module)
    cal, held = windows(8, 64, seed=0), windows(4, 64, seed=1)
    before = copy.deepcopy(model)
    assert max(s.max_over_mean for s in moe_stats(model, cal).layers) > 1.4
    result = rebalance(model, cal, method="bip", capacity=1.1)
    after = moe_stats(model, cal)
    assert all(s.max_over_mean <= 1.10 for s in after.layers), [s.max_over_mean for s in after.layers]
    assert [r["after"] for r in result.layers] == [s.max_over_mean for s in after.layers]
    assert all(r["before"] > r["after"] for r in result.layers)
    assert json.loads(json.dumps(result.to_dict()))["method"] == "bip"
    ev = evaluate_balance(before, model, held)
    assert len(ev.layers) == 3 and ev.tokens == held.num_tokens
    assert 0.0 <= ev.kl_mean <= ev.kl_p99 and 0.0 <= ev.top1_agreement <= 1.0
    greedy = copy.deepcopy(before)
    rg = rebalance(greedy, cal, method="greedy", capacity=1.1)  # the baseline: reported, not held to the capacity
    assert max(r["after"] for r in rg.layers) < max(r["before"] for r in rg.layers)
    same = evaluate_balance(before, before, held)
    assert same.kl_mean == 0.0 and same.top1_agreement == 1.0 and same.tokens == held.num_tokens
    assert [r["before"] for r in same.layers] == [r["after"] for r in same.layers] == [r["before"] for r in ev.layers]


def test_runtime_capacity_bounds_the_load_on_text_the_bias_never_saw(tmp_path):
    """A bias fitted on a few windows leaves held-out text above the capacity; re-solving the BIP on every pass
    keeps every layer within it there too, round-trips through the artifact, and refuses ONNX export."""
    model = skew_router(tiny_moe("mixtral").module, factor=16.0)
    cal, held = windows(2, 64, seed=0), windows(8, 64, seed=1)
    static = copy.deepcopy(model)
    rebalance(static, cal, method="bip", capacity=1.1)
    assert max(s.max_over_mean for s in moe_stats(static, held).layers) > 1.1
    loaded = tiny_moe("mixtral")
    skew_router(loaded.module, factor=16.0)
    result = rebalance(loaded.module, cal, method="bip", capacity=1.1, runtime_capacity=1.1)
    assert result.runtime_capacity == 1.1
    assert all(s.max_over_mean <= 1.1 for s in moe_stats(loaded.module, held).layers)
    ref = logits(loaded.module, held.input_ids[:2])
    out = save_balanced(loaded, tmp_path / "rt", result)
    assert json.loads((out / "compress.json").read_text())["moe_balance"]["runtime_capacity"] == 1.1
    back = load_artifact(out)
    assert torch.equal(logits(back.module, held.input_ids[:2]), ref)
    with pytest.raises(UserError, match="runtime-capacity"):
        export_friendly(back.module)


def test_a_capacity_margin_fits_inside_the_capacity():
    model = skew_router(tiny_moe("mixtral").module)
    cal = windows(8, 64, seed=0)
    result = rebalance(model, cal, method="bip", capacity=1.2, margin=0.1)
    assert all(r["after"] <= 1.10 for r in result.layers), [r["after"] for r in result.layers]


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_balanced_artifact_roundtrip(family, tmp_path):
    loaded = tiny_moe(family)
    skew_router(loaded.module)
    result = rebalance(loaded.module, windows(4, 32), method="bip")
    ref = logits(loaded.module, IDS)
    out = save_balanced(loaded, tmp_path / "balanced", result)
    manifest = json.loads((out / "compress.json").read_text())
    assert manifest["format"] == FORMAT and FORMAT in FORMATS
    assert manifest["moe_balance"]["method"] == "bip" and manifest["moe_balance"]["capacity"] == 1.1
    back = load_artifact(out)
    assert back.extra["manifest"]["moe_balance"]["selection_bias"] == current_bias(loaded.module)
    assert all(isinstance(back.module.get_submodule(m.path), BalancedSparseMoe) for m in moe_layers(back.module))
    assert torch.equal(logits(back.module, IDS), ref)
    from transformers import AutoModelForCausalLM

    with pytest.raises((OSError, ValueError)):  # our weights format: no silent unbalanced load
        AutoModelForCausalLM.from_pretrained(out)


def test_deepseek_bias_is_native_and_loads_with_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM

    loaded = tiny_moe("deepseek_v3")
    skew_router(loaded.module)
    result = rebalance(loaded.module, windows(4, 32), method="bip")
    for m in moe_layers(loaded.module):
        block = loaded.module.get_submodule(m.path)
        assert not isinstance(block, BalancedSparseMoe)
        q = torch.tensor(result.bias[m.path])
        b = block.gate.e_score_correction_bias
        assert b.abs().max() > 0 and torch.allclose(b, q.max() - q, atol=1e-6) and b.min() >= 0
    ref = logits(loaded.module, IDS)
    out = save_balanced(loaded, tmp_path / "ds", result)
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert torch.equal(plain.model.layers[1].mlp.gate.e_score_correction_bias,
                       loaded.module.model.layers[1].mlp.gate.e_score_correction_bias)
    torch.testing.assert_close(logits(plain, IDS), ref, atol=1e-5, rtol=0)
    assert torch.equal(logits(load_artifact(out).module, IDS), ref)


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize("balanced", [False, True])
def test_export_friendly_matches_the_sparse_forward(family, balanced):
    model = tiny_moe(family).module
    if balanced:
        apply_bias(model, {m.path: torch.linspace(0.0, 0.3, m.num_experts) for m in moe_layers(model)})
    ref = logits(model, IDS)
    export_friendly(model)
    assert all(isinstance(model.get_submodule(m.path), DenseRoutedMoe) for m in moe_layers(model))
    torch.testing.assert_close(logits(model, IDS), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_dense_routed_block_traces_the_full_routing(family, tmp_path):
    model = tiny_moe(family).module
    apply_bias(model, {m.path: torch.linspace(0.0, 0.3, m.num_experts) for m in moe_layers(model)})
    path = moe_layers(model)[0].path
    sparse = copy.deepcopy(model.get_submodule(path))
    export_friendly(model)
    dense = model.get_submodule(path)
    x1, x2 = torch.randn(1, 8, 64), torch.randn(1, 11, 64)  # traced on x1, run on x2: routing must not be baked in
    with torch.no_grad():
        want = sparse(x2)
        want = want[0] if isinstance(want, tuple) else want
        traced = torch.jit.trace(dense, (x1,), check_trace=False)(x2)
    torch.testing.assert_close(traced[0] if isinstance(traced, tuple) else traced, want, atol=1e-5, rtol=0)
    ort = pytest.importorskip("onnxruntime")
    onnx_path = tmp_path / "block.onnx"
    with torch.no_grad():
        torch.onnx.export(dense, (x1,), str(onnx_path), dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {1: "seq"}})
    got = ort.InferenceSession(str(onnx_path)).run(None, {"x": x2.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), want, atol=1e-5, rtol=0)
