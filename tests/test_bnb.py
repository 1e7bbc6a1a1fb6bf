"""bitsandbytes backend: mapping, CPU forward, closeness to float, kept layers, saving through transformers."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build

from compress.errors import UserError
from compress.metrics import weight_footprint
from compress.models import layer_map
from compress.quantize.apply import apply_plan, quantizable
from compress.quantize.bnb import (
    KEPT_EMBEDDING,
    KEPT_HEAD,
    KEPT_PLAN,
    KEPT_WIDTH,
    BnbLinear4bit,
    BnbLinear8bit,
    hf_quantization_config,
    to_bitsandbytes,
)
from compress.quantize.spec import QuantSpec

IDS = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(1))


def _linears(loaded) -> list[str]:
    return [p for b in layer_map(loaded.module).blocks for p in b.linears]


@torch.inference_mode()
def _logits(model) -> torch.Tensor:
    return model(input_ids=IDS).logits


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / a.norm()).item()


def test_mapping_counts_and_kept_layers():
    loaded = build("llama")
    lmap = layer_map(loaded.module)
    names = quantizable(loaded.module, lmap)  # block Linears, embedding, untied head
    bits = {0: 8, 1: 4, 2: 6}
    specs = {p: QuantSpec(bits[b.index], 32) for b in lmap.blocks for p in b.linears}
    specs[lmap.embeddings] = QuantSpec(8, 32)
    specs[lmap.head] = QuantSpec(4, 32)
    assert set(specs) == set(names)
    rec = to_bitsandbytes(loaded.module, specs)
    assert rec.bits == {8: 7, 4: 7}
    assert len(rec.mapped) == 14
    for p in lmap.blocks[0].linears:
        assert isinstance(loaded.module.get_submodule(p), BnbLinear8bit)
    for p in lmap.blocks[1].linears:
        assert isinstance(loaded.module.get_submodule(p), BnbLinear4bit)
        assert loaded.module.get_submodule(p).weight.quant_state.blocksize == 32
    assert all(rec.kept[p] == KEPT_WIDTH for p in lmap.blocks[2].linears)
    assert rec.kept[lmap.embeddings] == KEPT_EMBEDDING and rec.kept[lmap.head] == KEPT_HEAD
    assert isinstance(loaded.module.get_submodule(lmap.blocks[2].linears[0]), torch.nn.Linear)
    # int8: one byte per weight + fp32 scale per row, exactly
    q = loaded.module.get_submodule(lmap.blocks[0].linears[0])
    assert q.stored_weight_bytes() == q.out_features * q.in_features + 4 * q.out_features
    assert rec.stored_bytes == sum(loaded.module.get_submodule(n).stored_weight_bytes() for n in rec.mapped)
    foot = weight_footprint(loaded.module)
    assert foot["weight_params"] == int(weight_footprint(build("llama").module)["weight_params"])
    assert any("kept float" in n for n in rec.notes)
    assert rec.to_dict()["bits"] == {8: 7, 4: 7}


def test_float_plan_entries_are_kept_silently_and_strict_refuses_others():
    loaded = build("llama")
    lin = _linears(loaded)
    specs = {lin[0]: QuantSpec(32), lin[1]: QuantSpec(8)}
    rec = to_bitsandbytes(loaded.module, specs, strict=True)
    assert rec.kept == {lin[0]: KEPT_PLAN} and list(rec.mapped) == [lin[1]]
    fresh = build("llama")
    with pytest.raises(UserError, match="only 8-bit and 4-bit"):
        to_bitsandbytes(fresh.module, {lin[0]: QuantSpec(5, 32), lin[1]: QuantSpec(8)}, strict=True)
    assert type(fresh.module.get_submodule(lin[1])) is torch.nn.Linear  # nothing replaced before refusing


@pytest.mark.parametrize(("bits", "tol"), [(8, 0.03), (4, 0.25)])
def test_forward_on_cpu_close_to_float(bits, tol):
    ref, cand = build("llama"), build("llama")
    rec = to_bitsandbytes(cand.module, {p: QuantSpec(bits, 32) for p in _linears(cand)})
    assert rec.bits == {bits: 21}
    a, b = _logits(ref.module), _logits(cand.module)
    assert b.device.type == "cpu" and torch.isfinite(b).all()
    assert 0 < _rel(a, b) < tol
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > (0.9 if bits == 8 else 0.6)


@pytest.mark.parametrize("nested", [True, False])
def test_nf4_state_dict_is_stable_across_forwards(nested):
    """bnb repacks nf4 weights for its CPU kernel at the first forward and its own state_dict() undoes that in
    place, re-quantizing the absmax; ours saves what bnb first made and leaves the module alone."""
    loaded = build("llama")
    to_bitsandbytes(loaded.module, {p: QuantSpec(4, 32) for p in _linears(loaded)}, double_quant=nested)
    before = {k: v.clone() for k, v in loaded.module.state_dict().items()}
    assert any(k.endswith("weight.nested_absmax") for k in before) == nested
    first = _logits(loaded.module)
    after = loaded.module.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(first, _logits(loaded.module))


def test_unsupported_group_falls_back_to_block_64():
    loaded = build("llama")
    lin = _linears(loaded)
    rec = to_bitsandbytes(loaded.module, {lin[4]: QuantSpec(4, 16)})
    assert loaded.module.get_submodule(lin[4]).weight.quant_state.blocksize == 64
    assert any("used 64" in n for n in rec.notes)


def test_packed_layers_need_original_weights():
    loaded = build("llama")
    lmap = layer_map(loaded.module)
    lin = _linears(loaded)
    originals = {n: loaded.module.get_submodule(n).weight.detach().clone() for n in lin}
    apply_plan(loaded.module, lmap, {n: QuantSpec(4, 32) for n in lin})
    with pytest.raises(UserError, match="cannot load"):
        to_bitsandbytes(loaded.module, {lin[0]: QuantSpec(8)})
    rec = to_bitsandbytes(loaded.module, {n: QuantSpec(8) for n in lin}, original_weights=originals)
    assert rec.bits == {8: 21}
    assert _rel(_logits(build("llama").module), _logits(loaded.module)) < 0.03


@pytest.mark.parametrize("bits", [8, 4])
def test_save_and_reload_with_transformers(tmp_path, bits):
    from transformers import AutoModelForCausalLM

    loaded = build("llama")
    rec = to_bitsandbytes(loaded.module, {p: QuantSpec(bits, 32) for p in _linears(loaded)}, fused_cpu=False)
    before = _logits(loaded.module)
    loaded.module.config.quantization_config = hf_quantization_config(loaded.module, rec)
    loaded.module.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu", dtype=torch.float32)
    for m in back.modules():  # bnb's own fused CPU kernel refuses these tiny shapes (out_features % 32)
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    assert type(back.lm_head) is torch.nn.Linear
    torch.testing.assert_close(_logits(back), before, atol=1e-4, rtol=1e-4)


def test_mixed_widths_have_no_transformers_config():
    loaded = build("llama")
    lin = _linears(loaded)
    rec = to_bitsandbytes(loaded.module, {lin[0]: QuantSpec(8), lin[1]: QuantSpec(4)})
    with pytest.raises(UserError, match="one width"):
        hf_quantization_config(loaded.module, rec)


def test_quantize_backend_bnb_maps_the_plan_and_saves_a_transformers_checkpoint(tmp_path, monkeypatch):
    import json as _json

    from tiny_models import build

    from compress.errors import UserError
    from flows.quantize import QuantizeRequest, run_quantize

    monkeypatch.setattr("compress.models.load_model", lambda *a, **k: build("llama"))
    result = run_quantize(QuantizeRequest(model="tiny", bits=4, backend="bnb", evaluate=False, out=tmp_path / "b"))
    assert result["backend"] == "bnb" and result["bnb"]["bits"]
    config = _json.loads((tmp_path / "b" / "config.json").read_text())
    assert config["quantization_config"]["load_in_4bit"] is True
    with pytest.raises(UserError, match="runs in PyTorch only"):
        run_quantize(QuantizeRequest(model="tiny", bits=4, backend="bnb", target="ort"))
