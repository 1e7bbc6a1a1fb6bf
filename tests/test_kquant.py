"""K-quants (Q2_K … Q6_K): codes that llama.cpp's layouts hold exactly, the fallback for widths of no whole
super-blocks, the candidate syntax, and a layer-wise gguf plan exported and run in llama.cpp."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants
from test_gguf import _tiny, _tokenizer, needs_llamacpp

from compress.errors import UserError
from compress.quantize.modules import PackedWeight
from compress.quantize.rtn import quantize_rtn
from compress.quantize.spec import QuantSpec
from compress.quantize.targets import problem
from exporters.gguf_blocks import encode_packed

K_BITS = [2, 3, 4, 5, 6]


def _weight(rows: int = 16, cols: int = 512) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(rows, cols, generator=g) * 0.05 * (1 + torch.rand(1, cols, generator=g) * 3)


@pytest.mark.parametrize("bits", K_BITS)
@pytest.mark.parametrize("weighted", [False, True])
def test_codes_are_exact_in_llamacpp_layout(bits, weighted):
    """The GGUF bytes, read back by the gguf package's reference dequantizer, are the weight we measured."""
    w = _weight()
    imp = torch.rand(512, generator=torch.Generator().manual_seed(1)) ** 3 if weighted else None
    p = PackedWeight.from_quantized(quantize_rtn(w, QuantSpec.k(bits), imp))
    enc = encode_packed(p)
    assert enc.qtype == T[f"Q{bits}_K"] and enc.how == "codes"
    assert enc.data.shape == (16, 2 * QuantSpec.k(bits).stored_bytes(1, 256))
    back = quants.dequantize(enc.data, enc.qtype).reshape(16, 512)
    assert np.array_equal(back, p.dequantize().numpy())
    assert p.stored_weight_bytes() == enc.data.size  # the budget counts what the file holds


@pytest.mark.parametrize("bits", [3, 4, 5, 6])
def test_k_quant_beats_group_rtn_of_its_size_and_the_importance_matrix_steers_it(bits):
    w = _weight(64)
    group = QuantSpec(bits, 32, True)  # 3.5 / 4.5 / 5.5 / 6.5 bits: the K-quant's size, within 1/16 bit
    assert abs(group.bits_per_weight(512) - QuantSpec.k(bits).bits_per_weight(512)) < 0.07
    err_k = float(((quantize_rtn(w, QuantSpec.k(bits)).dequantize() - w) ** 2).sum())
    err_g = float(((quantize_rtn(w, group).dequantize() - w) ** 2).sum())
    assert err_k < err_g
    imp = torch.ones(512)
    imp[::4] = 100.0  # every fourth column matters most
    plain = quantize_rtn(w, QuantSpec.k(bits)).dequantize()
    steered = quantize_rtn(w, QuantSpec.k(bits), imp).dequantize()
    assert float((((steered - w) ** 2) * imp).sum()) < float((((plain - w) ** 2) * imp).sum())


def test_width_without_whole_super_blocks_falls_back_like_llamacpp():
    assert QuantSpec.k(4).for_width(576) == QuantSpec(5, 32, True)  # Q4_K -> Q5_0
    assert QuantSpec.k(6).for_width(576) == QuantSpec(8, 32, True)  # Q6_K -> Q8_0
    assert QuantSpec.k(3).for_width(576) == QuantSpec(4, 32, True)  # Q3_K -> Q4_0 (llama.cpp: IQ4_NL, same size)
    assert QuantSpec.k(4).for_width(1536) == QuantSpec.k(4)
    assert QuantSpec.k(4).stored_bytes(10, 576) == QuantSpec(5).stored_bytes(10, 576)
    assert QuantSpec.k(4).bits_per_weight(1536) == 4.5 and QuantSpec.k(6).bits_per_weight(512) == 6.5625
    q = quantize_rtn(_weight(8, 576), QuantSpec.k(4))
    assert q.spec == QuantSpec(5, 32, True)
    assert PackedWeight(8, 576, QuantSpec.k(4)).spec == QuantSpec(5, 32, True)


def test_candidate_syntax_and_refusals():
    from flows.quantize import parse_candidates

    assert parse_candidates("8,6k,4k") == [QuantSpec(8), QuantSpec.k(6), QuantSpec.k(4)]
    assert QuantSpec.k(5).label() == "q5k" and QuantSpec.k(5).to_dict()["kquant"] is True
    assert "kquant" not in QuantSpec(4).to_dict()
    with pytest.raises(UserError, match="Q2_K"):
        parse_candidates("7k")
    with pytest.raises(UserError, match="RTN only"):
        parse_candidates("4k", method="gptq")
    with pytest.raises(UserError, match="4k"):
        QuantSpec(4, 128, False, kquant=True)
    assert "llama.cpp only" in problem(QuantSpec.k(4), "ort")
    assert problem(QuantSpec.k(4), "gguf") is None and problem(QuantSpec.k(6), "trt")


@pytest.fixture(scope="module")
def wide_plan(tmp_path_factory):
    """A layer-wise gguf plan on a 256-wide tiny llama (whole super-blocks) from the default gguf menu."""
    from flows.quantize import QuantizeRequest, run_quantize

    tok = _tokenizer()
    tmp = tmp_path_factory.mktemp("kquant")
    mp = pytest.MonkeyPatch()
    mp.setattr("compress.models.load_model", lambda spec, *a, **k: _tiny(tok, hidden=256))
    mp.setattr("compress.inputs.check_model", lambda spec, arch=None: None)
    try:
        run_quantize(QuantizeRequest(model="tiny", layerwise=True, avg_bits=4.8, target="gguf", tokens=128,
                                     evaluate=False, out=tmp / "art"))
    finally:
        mp.undo()
    return tmp / "art", tok


def test_layerwise_gguf_plan_takes_k_quants_and_exports_them_exactly(wide_plan, tmp_path):
    from compress.artifact_formats import load_artifact
    from exporters.gguf import export_gguf

    art, _ = wide_plan
    modules = json.loads((art / "compress.json").read_text())["modules"]
    assert any(m.get("kquant") for m in modules.values())
    report = export_gguf(load_artifact(art), tmp_path / "k.gguf")
    assert report.n_approximated == 0
    assert {r.type for r in report.tensors} & {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}


@needs_llamacpp
def test_llamacpp_runs_k_quants_like_torch(wide_plan, tmp_path):
    from compress.artifact_formats import load_artifact
    from exporters.gguf import export_gguf
    from exporters.llamacpp import compare_with_reference
    from exporters.ort_quant import dequantized_copy

    art = load_artifact(wide_plan[0])
    export_gguf(art, tmp_path / "k.gguf")
    ids = torch.randint(3, 300, (2, 48), generator=torch.Generator().manual_seed(0))
    r = compare_with_reference(tmp_path / "k.gguf", dequantized_copy(art), ids)
    # llama.cpp rounds the activations of K-quant matmuls to 8 bits per 256 (Q8_K): its own Q6_K of this random
    # model, dequantized into torch, differs from its run by KL 0.021 (Q8_0: 0.003); a wrong layout gives KL > 1
    assert r.kl_mean < 0.05 and r.top1_agreement > 0.8


def test_a_candidate_equal_to_an_earlier_one_on_a_unit_is_measured_once():
    """On a 64-wide model every K-quant is its group fallback: 6k is q8, 5k and 4k are q5, 3k is q4."""
    from tiny_models import build

    from compress.models import layer_map
    from compress.quantize.budget import Budget
    from compress.quantize.pipeline import plan_inputs

    loaded = build("llama")
    lmap = layer_map(loaded.module)
    menu = [QuantSpec(8), QuantSpec.k(6), QuantSpec.k(5), QuantSpec(5), QuantSpec.k(4), QuantSpec(4), QuantSpec.k(3)]
    budget = Budget.parse(5.0, None).resolve(loaded.module)
    cands, units, sizes, _, allowed = plan_inputs(loaded.module, lmap, menu, budget, target="gguf")
    kept = {cands[c].label() for c in range(len(cands)) if allowed[0][c]}
    assert kept == {"q8g32s", "q5k", "q4g32s"}  # the first of each equal group, in size order
    assert sizes[0][[c.label() for c in cands].index("q4k")] == sizes[0][[c.label() for c in cands].index("q5k")]


def test_k_quant_artifact_is_refused_where_its_codes_cannot_go(wide_plan, tmp_path):
    """MatMulNBits and compressed-tensors have no two-level scales: exit 2 naming the fix (--gguf), no file."""
    from typer.testing import CliRunner

    from cli import app

    art, _ = wide_plan
    r = CliRunner().invoke(app, ["export", str(art), "--onnx", str(tmp_path / "m.onnx"), "--format", "int4",
                                 "--no-validate"])
    assert r.exit_code == 2 and "--gguf" in r.stderr and not (tmp_path / "m.onnx").exists()
    from compress.artifact_formats import load_artifact
    from compress.quantize.compressed_tensors import write_compressed_tensors

    with pytest.raises(UserError, match="K-quant"):
        write_compressed_tensors(load_artifact(art), tmp_path / "ct")
