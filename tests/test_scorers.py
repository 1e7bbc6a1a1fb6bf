"""Scorers on modules with known answers: rotation, rescale, identity; ZD on constructed weights."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import ToyLM, build, rotation

from compress.data import Windows
from compress.errors import UserError
from compress.importance import parse_methods, score_model
from compress.importance.zd import zscore_fraction
from compress.metrics import kl_per_token, log_softmax_chunked
from compress.models.hf import LoadedModel


def _windows(vocab: int, n: int = 3, length: int = 10) -> Windows:
    ids = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(3))
    return Windows(ids, torch.ones_like(ids), "calibration", "test", 0)


def _toy(matrices):
    return LoadedModel(ToyLM(matrices).eval(), None, "decoder", "toy", "toy")


def test_lim_of_rotation_is_one_minus_cos_theta_and_of_rescale_is_zero():
    theta = 0.7
    loaded = _toy([rotation(theta), 2.5 * torch.eye(2), rotation(-1.9)])
    report = score_model(loaded, _windows(16), ["lim", "bi"])
    lim = report.block_scores("lim")
    assert lim[0] == pytest.approx(1 - math.cos(theta), abs=1e-6)
    assert lim[1] == pytest.approx(0.0, abs=1e-6)
    assert lim[2] == pytest.approx(1 - math.cos(1.9), abs=1e-6)
    assert report.block_scores("bi") == lim
    assert report.ranking("lim") == [2, 0, 1]


def test_ablation_of_identity_block_is_zero_and_matches_naive_removal():
    loaded = _toy([rotation(0.4), torch.eye(2), rotation(1.1), 0.5 * torch.eye(2)])
    w = _windows(16)
    report = score_model(loaded, w, ["ablation"])
    abl = report.block_scores("ablation")
    assert abl[1] == pytest.approx(0.0, abs=1e-7)
    model = loaded.module
    with torch.inference_mode():
        ref = log_softmax_chunked(model(w.input_ids))
        for i in (0, 2, 3):
            kept = [b for j, b in enumerate(model.layers) if j != i]
            h = model.embed(w.input_ids)
            for b in kept:
                h = b(h)
            naive = kl_per_token(ref, model.lm_head(h)).mean().item()
            assert naive > 1e-3
            assert abl[i] == pytest.approx(naive, rel=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2", "bert"])
def test_every_scorer_runs_on_every_family(family):
    loaded = build(family)
    ids = torch.randint(4, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    w = Windows(ids, torch.ones_like(ids), "calibration", "test", 0)
    report = score_model(loaded, w, ["lim", "zd", "ablation"])
    assert report.num_blocks == 3 and len(report.sublayers) == 6
    assert report.divergence == ("kl" if loaded.kind == "decoder" else "1-cos(mean-pooled embedding)")
    for b in report.blocks:
        assert all(v is not None and v >= 0 for v in b["scores"].values())
        assert b["scores"]["ablation"] > 0
    for s in report.sublayers:
        assert s["scores"]["ablation"] > 0 and s["scores"]["zd"] > 0


def test_zd_known_fractions():
    w = torch.zeros(10, 10)
    w[0, 0], w[5, 5] = 10.0, -10.0
    assert zscore_fraction(w) == pytest.approx(0.02)
    g = torch.randn(1000, 1000, generator=torch.Generator().manual_seed(0))
    assert zscore_fraction(g) == pytest.approx(math.erfc(1 / math.sqrt(2)), abs=2e-3)  # 0.3173
    assert zscore_fraction(torch.ones(4, 4)) == 0.0


def test_report_round_trips_through_json(tmp_path):
    loaded = _toy([rotation(0.3), torch.eye(2)])
    report = score_model(loaded, _windows(16), ["lim", "zd", "ablation"])
    report.save(tmp_path / "r.json")
    back = type(report).load(tmp_path / "r.json")
    assert back.blocks == report.blocks and back.direction == report.direction


def test_unknown_scorer_is_a_user_error():
    with pytest.raises(UserError, match="unknown scorer 'nope'"):
        parse_methods("lim,nope")
    assert parse_methods("lim, zd,lim") == ["lim", "zd"]


def test_plot_writes_a_png(tmp_path):
    from evals.plots import plot_importance

    loaded = _toy([rotation(0.3), torch.eye(2), rotation(0.9)])
    report = score_model(loaded, _windows(16), ["lim", "zd", "ablation"])
    plot_importance(report, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["p.png"]


def test_quantization_aware_scores_and_the_rank_check():
    loaded = build("llama")
    ids = torch.randint(4, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    w = Windows(ids, torch.ones_like(ids), "calibration", "test", 0)
    flags = [p.requires_grad for p in loaded.module.parameters()]
    report = score_model(loaded, w, ["lim", "zd", "hessian", "fisher", "imatrix", "sensitivity"])
    for m in ("hessian", "fisher", "imatrix", "sensitivity"):
        assert all(v > 0 for v in report.block_scores(m)), m
    assert set(report.checks) == {"against", "lim", "zd", "hessian", "fisher", "imatrix"}
    assert all(-1.0 <= c["spearman"] <= 1.0 for k, c in report.checks.items() if k != "against")
    assert all(p.grad is None for p in loaded.module.parameters())
    assert [p.requires_grad for p in loaded.module.parameters()] == flags


def test_hessian_proxy_is_the_output_error_of_the_quantized_linear():
    from compress.importance.sensitivity import CHECK_SPEC
    from compress.models.layers import layer_map
    from compress.quantize.rtn import quantize_rtn

    loaded = build("llama")
    lmap = layer_map(loaded.module)
    ids = torch.randint(4, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    w = Windows(ids, torch.ones_like(ids), "calibration", "test", 0)
    report = score_model(loaded, w, ["hessian"], lmap)
    path = lmap.blocks[1].linears[0]
    module = loaded.module.get_submodule(path)
    seen = []
    handle = module.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.inference_mode():
        loaded.module(ids)
    handle.remove()
    x = seen[0].double()
    dw = (quantize_rtn(module.weight, CHECK_SPEC).dequantize() - module.weight.detach()).double()
    direct = float(((x @ dw.T) ** 2).sum() / len(x))
    got = next(item["scores"]["hessian"] for item in report.linears if item["path"] == path)
    assert got == pytest.approx(direct, rel=1e-6)


def test_imatrix_score_is_the_diagonal_of_the_hessian_score():
    """With H replaced by its diagonal (the importance matrix), tr(ΔW H ΔWᵀ) becomes Σ aⱼ ΔWᵢⱼ²."""
    loaded = build("llama")
    ids = torch.randint(4, 64, (3, 16), generator=torch.Generator().manual_seed(1))
    w = Windows(ids, torch.ones_like(ids), "calibration", "test", 0)
    from compress.importance import sensitivity
    from compress.importance.context import ScoringContext
    from compress.models.layers import layer_map
    from compress.quantize.apply import weight_matrix
    from compress.quantize.gptq import HessianCollector

    lmap = layer_map(loaded.module)
    imat = sensitivity.score_imatrix(ScoringContext(loaded, lmap, w))
    name = lmap.blocks[1].linears[0]
    module = loaded.module.get_submodule(name)
    c = HessianCollector(module, weight_matrix(module).shape[1])
    with torch.inference_mode():
        loaded.module(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    diag = torch.diag(c.result() / 2.0)
    dw = sensitivity._error(weight_matrix(module)).double()
    assert abs(imat.linears[name] - float((dw ** 2 * diag).sum())) <= 1e-4 * imat.linears[name]
