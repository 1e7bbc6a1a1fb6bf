"""--target: candidates each runtime executes exactly; plans made for a target only use them."""

from __future__ import annotations

import pytest
import torch

from compress.errors import UserError
from compress.quantize.allocate import allocate_by_rank, solve_dp
from compress.quantize.rtn import quantize_rtn
from compress.quantize.spec import QuantSpec
from compress.quantize.targets import EMBEDDING, LINEAR, problem
from flows.quantize import QuantizeRequest, run_quantize


@pytest.mark.parametrize("target, spec, role, ok", [
    ("torch", QuantSpec(3, 48, False), LINEAR, True),
    ("ort", QuantSpec(4, 32), LINEAR, True),
    ("ort", QuantSpec(2, 64, False), LINEAR, True),
    ("ort", QuantSpec(3, 32), LINEAR, False),
    ("ort", QuantSpec(4, 0), LINEAR, False),
    ("ort", QuantSpec(4, 48), LINEAR, False),
    ("ort", QuantSpec(2, 32), EMBEDDING, False),
    ("ort", QuantSpec(8, 32), EMBEDDING, True),
    ("trt", QuantSpec(8, 0), LINEAR, True),
    ("trt", QuantSpec(8, 32), LINEAR, False),
    ("trt", QuantSpec(4, 64, positive_scale=True), LINEAR, True),
    ("trt", QuantSpec(4, 64), LINEAR, False),
    ("trt", QuantSpec(4, 64, False), LINEAR, False),
    ("trt", QuantSpec(4, 32), EMBEDDING, False),
    ("trt", QuantSpec(4, 32, positive_scale=True), EMBEDDING, True),
    ("gguf", QuantSpec(5, 32), LINEAR, True),
    ("gguf", QuantSpec(4, 64), LINEAR, False),
    ("gguf", QuantSpec(6, 32), EMBEDDING, False),
    ("trt", QuantSpec(16), EMBEDDING, True),
])
def test_what_each_target_runs(target, spec, role, ok):
    assert (problem(spec, target, role) is None) == ok


def test_symmetric_8_bit_uses_the_narrow_range_trt_and_q8_0_need():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    q = quantize_rtn(w, QuantSpec(8, 32))
    signed = q.codes.int() - 128
    assert signed.min() >= -127 and signed.max() <= 127
    assert (signed.abs().reshape(16, 2, 32).amax(-1) == 127).all()  # the largest magnitude lands on ±127
    torch.testing.assert_close(q.dequantize(), w, atol=float(q.scales.float().max()) / 2 + 1e-6, rtol=0)


def test_positive_scale_codes_use_the_range_and_every_scale_is_positive():
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    q = quantize_rtn(w, QuantSpec(4, 32, positive_scale=True))
    assert (q.scales.float() > 0).all()
    signed = q.codes.int() - 8
    assert signed.min() >= -8 and signed.max() <= 7
    step = q.scales.float().repeat_interleave(32, dim=1)
    assert ((q.dequantize() - w).abs() <= step / 2 + 1e-6).all()
    assert QuantSpec(4, 32, positive_scale=True).label() == "q4g32p"


def test_trt_turns_symmetric_candidates_into_positive_scale_ones():
    from flows.quantize import candidates_for

    labels = [c.label() for c in candidates_for(QuantizeRequest(model="x", target="trt"))]
    assert labels == ["q8gchs", "q4g32p", "q4g64p"]


def test_allocators_never_pick_a_masked_candidate():
    dist = [[0.0, 1.0, 2.0], [0.0, 0.1, 5.0]]
    sizes = [[30, 20, 10], [30, 20, 10]]
    assert solve_dp(dist, sizes, 40, resolution=10**6) == [1, 1]
    masked = [[0.0, 1.0, 2.0], [0.0, float("inf"), 5.0]]
    assert solve_dp(masked, sizes, 40, resolution=10**6) == [2, 0]  # unit 1 cannot take the middle one
    allowed = [[True, True, True], [True, False, True]]
    assert allocate_by_rank([1, 0], sizes, 40, allowed) == [0, 2]


@pytest.mark.parametrize("target, avg_bits", [("ort", 5.0), ("trt", 5.0), ("gguf", 5.0)])
def test_layerwise_plans_for_a_target_only_use_what_it_runs(monkeypatch, target, avg_bits):
    from tiny_models import build

    monkeypatch.setattr("compress.models.load_model", lambda *a, **k: build("llama"))
    req = QuantizeRequest(model="tiny", layerwise=True, avg_bits=avg_bits, target=target, data="self",
                          tokens=256, eval_tokens=128, seq_len=32, evaluate=False)
    result = run_quantize(req)
    specs = {n: QuantSpec(**a) for n, a in result["plan"]["rules"].items()}
    loaded = build("llama")
    from compress.models import layer_map

    emb = layer_map(loaded.module).embeddings
    for name, spec in specs.items():
        assert problem(spec, target, EMBEDDING if name == emb else LINEAR) is None, (name, spec)
    assert emb in specs
    assert result["plan"]["meta"]["target"] == target


def test_a_plan_file_the_target_cannot_run_is_refused(tmp_path, monkeypatch):
    import json

    from tiny_models import build

    monkeypatch.setattr("compress.models.load_model", lambda *a, **k: build("llama"))
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"rules": {"_default": {"bits": 3, "group_size": 32}}}))
    with pytest.raises(UserError, match="cannot run on --target ort"):
        run_quantize(QuantizeRequest(model="tiny", plan_file=plan, target="ort", evaluate=False))


def test_ort_budgets_count_the_bytes_the_onnx_file_stores():
    """fp32 scales (the graph's activation type), zero points only for asymmetric codes; other targets count the
    artifact's packing (fp16 scales)."""
    from compress.quantize.targets import bits_per_weight, stored_bytes

    sym, asym, g64 = QuantSpec(4, 32), QuantSpec(4, 32, symmetric=False), QuantSpec(4, 64)
    assert stored_bytes(sym, 576, 576, "ort") == 576 * 576 // 2 + 576 * 18 * 4
    assert stored_bytes(asym, 576, 576, "ort") == 576 * 576 // 2 + 576 * 18 * 4 + 576 * 18 // 2
    assert stored_bytes(sym, 576, 576, "torch") == sym.stored_bytes(576, 576) == 576 * 576 // 2 + 576 * 18 * 2
    assert bits_per_weight(sym, 576, "ort") == 5.0 and bits_per_weight(asym, 576, "ort") == 5.125
    assert bits_per_weight(g64, 576, "ort") == 4.5 and bits_per_weight(g64, 576, "gguf") == 4.25
    assert bits_per_weight(QuantSpec(16), 576, "ort") == 16


def test_an_ort_plan_is_solved_on_onnx_bytes(monkeypatch):
    from tiny_models import build

    monkeypatch.setattr("compress.models.load_model", lambda *a, **k: build("llama"))
    result = run_quantize(QuantizeRequest(model="tiny", layerwise=True, avg_bits=5.0, target="ort",
                                          candidates="8,4", measure="fast", data="self", tokens=64, seq_len=16,
                                          evaluate=False))
    meta = result["plan"]["meta"]
    assert meta["bytes_as"] == "onnx (fp32 scales)"
    assert meta["planned_bytes"] <= meta["budget_bytes"]
    assert result["bpw"] < 5.0 - 0.4  # the artifact (fp16 scales) is half a bit per weight smaller


def test_the_ort_default_menu_keeps_2_bits_only_for_budgets_that_need_them():
    from compress.quantize.budget import Budget
    from flows.quantize import drop_unneeded_2bit, parse_candidates

    cands = parse_candidates("8g64,4a,4,4g64a,4g64,2a")
    roomy = Budget(avg_bits_given=5.0, weight_params=1_000_000)
    tight = Budget(avg_bits_given=4.0, weight_params=1_000_000)
    kept, dropped = drop_unneeded_2bit(cands, roomy, "ort")
    assert dropped == ["q2g32a"] and all(c.bits != 2 for c in kept)
    assert drop_unneeded_2bit(cands, tight, "ort") == (cands, [])  # 4g64 costs 4.5 ONNX bits: 2 bits are needed
