"""Quantized ONNX rewrites on a tiny random Llama: MatMulNBits/GatherBlockQuantized and TensorRT-style Q/DQ carry
the artifact's own codes and reproduce the float graph of the dequantized artifact in ONNX Runtime."""

from __future__ import annotations

import warnings
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from tiny_models import quantized_artifact, tied

from compress.errors import UserError
from compress.quantize.modules import PackedWeight
from compress.quantize.rtn import quantize_rtn
from compress.quantize.spec import QuantSpec
from exporters.graph import max_logit_diff
from exporters.ort_quant import dequantized_copy, to_matmulnbits
from exporters.qdq import qdq_plan, to_qdq

pytest.importorskip("onnxruntime")
pytest.importorskip("optimum.exporters.onnx")

MIXED = [QuantSpec(2, 16), QuantSpec(3, 32), QuantSpec(4, 16, False), QuantSpec(8, 32), QuantSpec(4, 32, False, "hqq"),
         QuantSpec(5, 16), QuantSpec(6, 32, False), QuantSpec(4, 32), QuantSpec(2, 32, False, "gptq")]
SYMMETRIC = [QuantSpec(2, 16), QuantSpec(3, 32), QuantSpec(4, 16, positive_scale=True), QuantSpec(6, 0),
             QuantSpec(4, 0, positive_scale=True)]
IDS = np.random.default_rng(0).integers(0, 64, (2, 9))


def _artifact(tmp, menu: list[QuantSpec], embedding: QuantSpec | None, family: str = "llama"):
    """A tiny model with tied embeddings quantized with `menu` cycled over its Linears, saved and loaded back."""
    return quantized_artifact(tied(family), tmp / "art", menu, embedding)


def _float_onnx(tmp, art) -> str:
    from optimum.exporters.onnx import main_export

    fl = dequantized_copy(art)
    fl.module.save_pretrained(tmp / "hf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main_export(str(tmp / "hf"), str(tmp / "onnx"), task="text-generation-with-past", do_validation=False)
    return str(tmp / "onnx" / "model.onnx")


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mixed")
    art = _artifact(tmp, MIXED, QuantSpec(4, 16))
    return art, _float_onnx(tmp, art)


@pytest.fixture(scope="module")
def symmetric(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sym")
    art = _artifact(tmp, SYMMETRIC, None)
    return art, _float_onnx(tmp, art)


def _ops(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def test_dequantized_copy_is_float_tied_and_equal_to_the_artifact(mixed):
    art, _ = mixed
    fl = dequantized_copy(art)
    model = fl.module
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not [m for m in model.modules() if hasattr(m, "packed")]
    ids = torch.as_tensor(IDS)
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).logits, art.module(ids).logits, atol=1e-5, rtol=1e-5)


def test_matmulnbits_carries_the_codes_and_matches_the_float_graph(mixed, tmp_path):
    art, src = mixed
    out = tmp_path / "q.onnx"
    rec = to_matmulnbits(src, art, out)
    ops = _ops(out)
    n_linear = sum(1 for n in art.extra["manifest"]["modules"] if "layers" in n)
    assert ops["MatMulNBits"] == n_linear + 1 and ops["GatherBlockQuantized"] == 1
    assert ops["MatMul"] == _ops(src)["MatMul"] - n_linear - 1  # no float weight MatMul left
    assert rec.bits["3→4"] and rec.bits["5→8"] and rec.bits["6→8"] and rec.bits["2"] and rec.bits["8"]
    assert rec.shared and not rec.duplicated
    assert rec.weight_bytes_after < rec.weight_bytes_before / 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.onnx"]  # atomic: no temp or data file left
    # 4-bit layers keep the artifact's packed bytes verbatim
    q = art.module.get_submodule("model.layers.1.self_attn.q_proj").packed
    assert q.spec == QuantSpec(4, 32)
    inits = {t.name: t for t in onnx.load(str(out)).graph.initializer}
    stored = numpy_helper.to_array(inits["model.layers.1.self_attn.q_proj.qweight"])
    assert stored.shape == (32, 1, 16) and np.array_equal(stored.reshape(-1), q.qweight.numpy())
    diff = max_logit_diff(src, out, IDS, steps=1)
    assert diff["max_rel"] < 1e-4, diff


def test_matmulnbits_refuses_per_channel_and_unmatched_weights(mixed, symmetric, tmp_path):
    art, src = mixed
    with pytest.raises(UserError, match=r"model\.layers\.0\.self_attn\.o_proj: q6gchs.*--target ort"):
        to_matmulnbits(symmetric[1], symmetric[0], tmp_path / "x.onnx")
    other = _artifact(tmp_path, [QuantSpec(4, 32)], None)  # same shapes, different codes than the graph
    with pytest.raises(UserError, match="not found by value"):
        to_matmulnbits(src, other, tmp_path / "y.onnx")
    assert not list(tmp_path.glob("*.onnx"))


def test_qdq_refuses_asymmetric_unless_requantizing(mixed, tmp_path):
    art, src = mixed
    with pytest.raises(UserError, match=r"v_proj: q4g16a is asymmetric.*--target trt"):
        to_qdq(src, art, tmp_path / "x.onnx")
    rec = to_qdq(src, art, tmp_path / "r.onnx", requantize=True)
    assert any("v_proj" in r for r in rec.requantized)
    assert rec.shared and not rec.duplicated  # the tied embedding reads the head's (requantized) codes
    assert max_logit_diff(src, tmp_path / "r.onnx", IDS)["max_rel"] < 0.2  # re-rounded, not exact


def test_qdq_is_exact_with_zero_point_zero(symmetric, tmp_path):
    art, src = symmetric
    out = tmp_path / "qdq.onnx"
    rec = to_qdq(src, art, out, check_ids=IDS)
    assert rec.opset == 21 and not rec.requantized and rec.check["max_rel"] < 1e-4
    assert rec.bits["6→int8"] and rec.bits["4→int8"] and rec.bits["2→int4"] and rec.bits["3→int4"]
    m = onnx.load(str(out))
    assert next(o.version for o in m.opset_import if o.domain == "") == 21
    inits = {t.name: t for t in m.graph.initializer}
    dqs = [n for n in m.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dqs) == 21  # the Linears; the embedding (and its tied head) were kept float
    for n in dqs:
        assert len(n.input) == 3 and not numpy_helper.to_array(inits[n.input[2]]).any()
        assert (numpy_helper.to_array(inits[n.input[1]]) > 0).all()  # TensorRT: strictly positive scales
        assert inits[n.input[0]].data_type in (onnx.TensorProto.INT4, onnx.TensorProto.INT8)
    codes = numpy_helper.to_array(inits["model.layers.0.self_attn.k_proj.weight_q"])  # q3g32s → int4 [K, N]
    packed = art.module.get_submodule("model.layers.0.self_attn.k_proj").packed
    assert codes.shape == (32, 16) and codes.min() >= -4 and codes.max() <= 4  # 3-bit codes, negated if s < 0
    sign = np.where(packed.scales.float().numpy() < 0, -1, 1)  # one group per row (K = 32)
    assert np.array_equal(codes.astype(np.float32), (_signed(packed) * sign).T)
    diff = max_logit_diff(src, out, IDS, steps=1)
    assert diff["max_rel"] < 1e-4, diff


def _signed(p: PackedWeight) -> np.ndarray:
    from exporters.ort_quant import codes_of

    return codes_of(p).astype(np.float32) - 2 ** (p.spec.bits - 1)


def test_qdq_plan_refuses_minus_128_and_grouped_int8():
    w = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    q = quantize_rtn(w, QuantSpec(8, 0))
    q.codes[0, 0] = 0  # −128
    assert "−128" in qdq_plan("x", PackedWeight.from_quantized(q))[1]
    assert "per output channel" in qdq_plan("x", PackedWeight.from_quantized(quantize_rtn(w, QuantSpec(8, 16))))[1]
    assert qdq_plan("x", PackedWeight.from_quantized(quantize_rtn(w, QuantSpec(3, 16))))[1] is None
    assert "negative scales" in qdq_plan("x", PackedWeight.from_quantized(quantize_rtn(w, QuantSpec(4, 16))))[1]
    assert qdq_plan("x", PackedWeight.from_quantized(quantize_rtn(w, QuantSpec(4, 16, positive_scale=True))))[1] is None


def test_external_data_in_and_out(mixed, tmp_path, monkeypatch):
    art, src = mixed
    ext = tmp_path / "ext" / "model.onnx"
    ext.parent.mkdir()
    onnx.save_model(onnx.load(src), str(ext), save_as_external_data=True, location="model.onnx_data",
                    size_threshold=0)
    monkeypatch.setattr("exporters.graph.TWO_GB", 10_000)  # pretend the result is too big for one protobuf
    out = tmp_path / "big" / "q.onnx"
    to_matmulnbits(ext.parent, art, out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["q.onnx", "q.onnx_data"]
    assert max_logit_diff(src, out, IDS)["max_rel"] < 1e-4


def test_gpt2_gemm_layers_are_rewritten_too(tmp_path):
    menu = [QuantSpec(4, 16, positive_scale=True), QuantSpec(3, 32)]
    art = _artifact(tmp_path, menu, QuantSpec(8, 32), family="gpt2")
    src = _float_onnx(tmp_path, art)
    assert _ops(src)["Gemm"] == 12  # Conv1D exports as Gemm(x, W[in, out], bias)
    rec = to_matmulnbits(src, art, tmp_path / "q.onnx")
    assert _ops(tmp_path / "q.onnx")["Gemm"] == 0 and rec.shared
    assert max_logit_diff(src, tmp_path / "q.onnx", IDS)["max_rel"] < 1e-4
    to_qdq(src, art, tmp_path / "qdq.onnx")
    assert max_logit_diff(src, tmp_path / "qdq.onnx", IDS)["max_rel"] < 1e-4
