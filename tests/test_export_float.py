"""Float ONNX export and its validation against torch: tiny random models (fast), real SmolLM2 (slow)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny_models import VOCAB, build
from torch import nn

from compress.errors import UserError
from compress.models.mobilenet_v2 import MobileNetV2, load_mobilenet_v2
from exporters.onnx import export_float, read_export
from exporters.validate import random_images, validate


def token_windows(n: int = 2, seq: int = 20, seed: int = 1) -> torch.Tensor:
    return torch.randint(4, VOCAB, (n, seq), generator=torch.Generator().manual_seed(seed))


def scale_initializer(src, dst, node_substring: str, factor: float) -> str:
    """Copy the graph at `src` to `dst` with the weight of the first MatMul whose name contains `node_substring`
    scaled by `factor`; returns the initializer's name."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    inits = {i.name: i for i in model.graph.initializer}
    node = next(n for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and node_substring in n.name)
    init = inits[next(i for i in node.input if i in inits)]
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(factor), init.name))
    onnx.save(model, str(dst))
    return init.name


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(nn.functional.relu6(self.bn(self.conv(x))).mean((2, 3)))


class Eigh(nn.Module):
    def forward(self, x):
        return torch.linalg.eigh(x @ x.transpose(-1, -2)).eigenvalues


@pytest.fixture(scope="module")
def tiny_llama_export(tmp_path_factory):
    loaded = build("llama")
    return loaded, export_float(loaded, tmp_path_factory.mktemp("exp") / "llama")


def test_decoder_export_writes_a_complete_dir_with_kv_cache(tiny_llama_export):
    loaded, result = tiny_llama_export
    assert result.onnx_path.is_file() and result.onnx_path == result.out_dir / "model.onnx"
    assert result.task == "text-generation-with-past" and result.fmt == "fp32" and result.opset >= 14
    assert "past_key_values.0.key" in result.input_names and "present.2.value" in result.output_names
    meta = json.loads((result.out_dir / "export.json").read_text())
    assert meta["task"] == result.task and meta["files"] == ["model.onnx"] and meta["seconds"] > 0
    assert read_export(result.out_dir).onnx_path == result.onnx_path
    assert not [p for p in result.out_dir.parent.iterdir() if p.name.endswith(".tmp")]
    assert "forward" not in loaded.module.__dict__  # the exporter leaves the module as it found it


def test_decoder_validation_covers_prefill_and_decode_steps(tiny_llama_export):
    loaded, result = tiny_llama_export
    report = validate(result.out_dir, loaded, token_windows(), decode_steps=2)
    names = [c.name for c in report.checks]
    assert names == ["prefill/logits", "prefill/present_kv", "decode1/logits", "decode2/logits"]
    assert report.passed, report.rows()
    logits = report.check("decode2/logits")
    assert logits.max_abs < 1e-4 and logits.top1 == 1.0 and logits.kl_mean < 1e-8 and logits.cosine > 0.99999
    d = report.to_dict()
    assert d["passed"] and d["checks"][0]["passed"] and d["inputs"]["prefill_tokens"] == 18
    assert len(report.rows()[0]) == len(report.HEADERS)


def test_validation_fails_when_one_weight_is_off_by_one_percent(tiny_llama_export, tmp_path):
    loaded, result = tiny_llama_export
    bad = tmp_path / "bad.onnx"
    scale_initializer(result.onnx_path, bad, "layers.1/self_attn/o_proj", 1.01)
    report = validate(bad, loaded, token_windows())
    assert not report.passed
    assert any("max abs" in f for f in report.check("prefill/logits").failures)
    # a lossy graph is judged by KL and top-1 only: 1% on one projection stays within loose thresholds
    assert validate(bad, loaded, token_windows(), elementwise=False, kl_max=1e-2, top1_min=0.9).passed


def test_encoder_export_and_validation(tmp_path):
    loaded = build("bert")
    result = export_float(loaded, tmp_path / "bert")
    assert result.task == "feature-extraction" and "last_hidden_state" in result.output_names
    report = validate(result.onnx_path, loaded, token_windows())
    assert [c.name for c in report.checks] == ["last_hidden_state", "embedding"] and report.passed, report.rows()


def test_fp16_export_validates_with_looser_tolerance(tmp_path):
    loaded = build("llama")
    result = export_float(loaded, tmp_path / "fp16", fmt="fp16")
    report = validate(result.out_dir, loaded, token_windows(n=1))
    assert report.fmt == "fp16" and report.tolerance.rel_tol == 5e-2 and report.passed, report.rows()
    assert report.check("prefill/logits").max_abs > 1e-6  # really computed in half precision
    assert not validate(result.out_dir, loaded, token_windows(n=1), fmt="fp32").passed


def test_module_export_has_a_dynamic_batch(tmp_path):
    model = TinyCNN().eval()
    result = export_float(model, tmp_path / "cnn", example_inputs=(torch.randn(2, 3, 16, 16),))
    assert (result.input_names, result.output_names) == (["pixel_values"], ["logits"])
    report = validate(result.out_dir, model, random_images(5, shape=(3, 16, 16)))
    assert report.passed and report.check("logits").top1 == 1.0, report.rows()


def test_unexportable_module_is_a_user_error_and_leaves_nothing(tmp_path):
    with pytest.raises(UserError, match=r"cannot export Eigh to ONNX: unsupported op aten\._linalg_eigh"):
        export_float(Eigh(), tmp_path / "eigh", example_inputs=(torch.randn(2, 4, 4),))
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments_are_user_errors(tmp_path, tiny_llama_export):
    loaded, result = tiny_llama_export
    with pytest.raises(UserError, match="int3"):
        export_float(loaded, tmp_path / "x", fmt="int3")
    with pytest.raises(UserError, match="example_inputs"):
        export_float(TinyCNN(), tmp_path / "x")
    with pytest.raises(UserError, match="not found"):
        validate(tmp_path / "missing.onnx", loaded, token_windows())
    with pytest.raises(UserError, match="decode_steps"):
        validate(result.out_dir, loaded, token_windows(seq=2), decode_steps=2)
    with pytest.raises(UserError, match="token windows"):
        validate(result.out_dir, loaded, torch.randn(2, 8))


def test_mobilenet_v2_has_torchvision_layout(tmp_path):
    model = MobileNetV2()
    state = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == 3_504_872
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 52
    assert {"features.0.0.weight", "features.1.conv.0.0.weight", "features.2.conv.3.running_var",
            "features.18.1.bias", "classifier.1.weight"} <= set(state)
    torch.save(state, tmp_path / "w.pth")
    assert torch.equal(load_mobilenet_v2(tmp_path / "w.pth").classifier[1].weight, state["classifier.1.weight"])
    torch.save({"classifier.1.weight": state["classifier.1.weight"]}, tmp_path / "partial.pth")
    with pytest.raises(UserError, match="cannot load MobileNetV2"):
        load_mobilenet_v2(tmp_path / "partial.pth")


# ---------------------------------------------------------------------------------------------- real models


@pytest.fixture(scope="module")
def smollm2_export(smollm2, tmp_path_factory):
    return export_float(smollm2, tmp_path_factory.mktemp("real") / "smollm2")


@pytest.fixture(scope="module")
def smollm2_text(smollm2, austen):
    from compress.data import load_windows

    return load_windows(str(austen), smollm2, split="evaluation", tokens=128, seq_len=128)


@pytest.mark.slow
def test_smollm2_fp32_export_validates(smollm2, smollm2_export, smollm2_text):
    report = validate(smollm2_export.out_dir, smollm2, smollm2_text, decode_steps=1)
    assert report.passed, report.rows()
    assert report.check("prefill/logits").top1 == 1.0 and report.check("decode1/logits").kl_mean < 1e-8


@pytest.mark.slow
def test_smollm2_corrupted_attention_weight_fails_validation(smollm2, smollm2_export, smollm2_text, tmp_path):
    bad = tmp_path / "model.onnx"
    scale_initializer(smollm2_export.onnx_path, bad, "layers.15/self_attn/o_proj", 1.01)
    report = validate(bad, smollm2, smollm2_text, decode_steps=1)
    assert not report.passed and not report.check("prefill/logits").passed, report.rows()


@pytest.mark.slow
def test_mobilenet_v2_from_the_zoo_gives_finite_logits():
    from compress.models import load_model

    loaded = load_model("mobilenet-v2")
    assert (loaded.kind, loaded.tokenizer) == ("cnn", None)
    logits = loaded.module(random_images(2))
    assert logits.shape == (2, 1000) and torch.isfinite(logits).all()


def test_top1_is_gated_only_over_enough_positions():
    import numpy as np
    import torch

    from exporters.validate import DEFAULT_TOLERANCE, MIN_TOP1_TOKENS, _Acc

    tol = DEFAULT_TOLERANCE["int4"]
    ref = torch.tensor([[0.0, 1.0, 0.999]] * 2)
    flipped = ref[:, [0, 2, 1]].numpy()  # near-tied logits swap: top-1 differs on every position, KL tiny
    few = _Acc("decode1/logits", logits=True)
    few.add(ref, flipped)
    c = few.check(tol)
    assert c.top1 == 0.0 and not any("top-1" in f for f in c.failures)
    many = _Acc("prefill/logits", logits=True)
    many.add(ref.repeat(MIN_TOP1_TOKENS, 1), np.tile(flipped, (MIN_TOP1_TOKENS, 1)))
    assert any("top-1" in f for f in many.check(tol).failures)
