"""AWQ (issue 17, item 3): the folded scales leave the float model's function unchanged, are found where an input
channel dominates, lower the group's quantized output error, and `quantize --method awq` runs, records and refuses
as documented."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import build

from compress.errors import UserError
from compress.quantize.spec import QuantSpec


def _lazy(loaded):
    from compress.models import layer_map
    from compress.stream.lazy import LazyModel

    return LazyModel.resident(loaded, layer_map(loaded.module))


def _windows(n: int = 6, seq: int = 16, vocab: int = 64):
    from compress.data import Windows

    ids = torch.randint(3, vocab, (n, seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[-1, -5:] = 0
    return Windows(ids, mask, "calibration", "test", 0)


def _logits(loaded, windows):
    with torch.inference_mode():
        return loaded.module(input_ids=windows.input_ids, attention_mask=windows.attention_mask,
                             use_cache=False).logits


def test_scales_keep_the_float_function_and_cut_the_quantized_error():
    from compress.quantize.awq import awq_scale

    loaded = build("llama")
    model = loaded.module
    with torch.no_grad():  # a few dominant input channels, as real activations have: where AWQ earns its keep
        for layer in model.model.layers:
            layer.post_attention_layernorm.weight[:3] *= 30
            layer.input_layernorm.weight[5:7] *= 30
    windows = _windows()
    before = _logits(loaded, windows)
    norm = model.model.layers[0].post_attention_layernorm.weight.clone()
    spec = QuantSpec(4, 16)
    rec = awq_scale(_lazy(loaded), windows, lambda n: spec)
    torch.testing.assert_close(_logits(loaded, windows), before, rtol=1e-4, atol=1e-4)
    assert rec.summary()["groups"] == 3 * len(model.model.layers)
    assert rec.summary()["scaled"] > 0
    assert all(r <= 1.0 + 1e-9 for r in rec.error_ratio.values())  # α = 0 is on the grid: never worse
    assert min(rec.error_ratio.values()) < 0.9
    assert not torch.equal(model.model.layers[0].post_attention_layernorm.weight, norm)
    assert not model.model.layers[0].mlp.gate_proj.weight.is_inference()  # autograd can still use it


def test_a_float_layer_is_left_alone():
    from compress.quantize.awq import awq_scale

    loaded = build("llama")
    w = {n: p.clone() for n, p in loaded.module.named_parameters()}
    rec = awq_scale(_lazy(loaded), _windows(), lambda n: None)
    assert rec.alphas == {}
    assert all(torch.equal(p, w[n]) for n, p in loaded.module.named_parameters())


def test_quantize_method_awq_records_its_scales(tmp_path, monkeypatch):
    from flows.quantize import QuantizeRequest, run_quantize

    monkeypatch.setattr("compress.models.load_model", lambda *a, **k: build("llama"))
    req = QuantizeRequest(model="tiny", bits=4, group_size=16, method="awq", data="self", tokens=128,
                          seq_len=32, evaluate=False, out=tmp_path / "q")
    assert req.awq and req.method == "rtn"
    result = run_quantize(req)
    assert result["awq"]["groups"] == 9  # 3 blocks × (Q/K/V, gate/up, down)
    manifest = json.loads((tmp_path / "q" / "compress.json").read_text())
    assert manifest["awq"]["groups"] == 9
    assert any(n.startswith("AWQ") for n in result["notes"])
    gptq = QuantizeRequest(model="tiny", bits=4, method="awq+gptq", data="self")
    assert gptq.awq and gptq.method == "gptq"


@pytest.mark.parametrize("kw,msg", [
    (dict(bits=4, method="awq", imatrix="x.gguf", data="self"), "drop --imatrix"),
    (dict(bits=4, method="awq"), "pass --data"),
    (dict(bits=4, method="awq", data="self", backend="bnb"), "--backend packed"),
])
def test_awq_refusals(kw, msg):
    from flows.quantize import QuantizeRequest, check_request

    with pytest.raises(UserError, match=msg):
        check_request(QuantizeRequest(model="tiny", **kw))


def test_awq_does_not_stream():
    from flows.quantize import QuantizeRequest, check_streamable

    with pytest.raises(UserError, match="--stream off"):
        check_streamable(QuantizeRequest(model="tiny", bits=4, method="awq", data="x.txt", evaluate=False))
