"""merge-lora: a PEFT-layout adapter merges into the base weights exactly (checked against the adapter applied
unmerged), for Linear and GPT-2 Conv1D; adapters that are not plain LoRA, or that do not fit, are refused."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import build

from compress.errors import UserError
from flows.reparam import run_reparam

IDS = torch.randint(1, 64, (2, 10), generator=torch.Generator().manual_seed(0))


def _adapter(path, model, targets: list[str], r: int = 4, alpha: int = 8, fan_in_fan_out: bool = False, **cfg):
    """Write adapter_config.json + adapter_model.safetensors as PEFT names them (random, non-zero B)."""
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for t in targets:
        w = model.get_submodule(t).weight
        out_f, in_f = (w.shape[1], w.shape[0]) if fan_in_fan_out else tuple(w.shape)
        tensors[f"base_model.model.{t}.lora_A.weight"] = torch.randn(r, in_f, generator=g) * 0.1
        tensors[f"base_model.model.{t}.lora_B.weight"] = torch.randn(out_f, r, generator=g) * 0.1
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": alpha,
                                                          "fan_in_fan_out": fan_in_fan_out, "bias": "none",
                                                          "target_modules": targets, **cfg}))
    return tensors


def _logits(model):
    with torch.inference_mode():
        return model(IDS).logits


def test_lora_merges_exactly_and_changes_the_weights_by_s_times_ba(tmp_path):
    loaded = build("llama")
    targets = ["model.layers.0.self_attn.q_proj", "model.layers.2.mlp.down_proj"]
    tensors = _adapter(tmp_path / "ad", loaded.module, targets, r=4, alpha=8)
    w0 = loaded.module.get_submodule(targets[1]).weight.detach().clone()
    base = _logits(loaded.module)
    result = run_reparam(loaded, ["merge-lora"], tmp_path / "out", adapter=tmp_path / "ad")
    rec = result["records"][0]
    assert rec["count"] == 2 and rec["equivalence"]["pass"] and rec["equivalence"]["checked"]
    key = f"base_model.model.{targets[1]}"
    a, b = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"]
    torch.testing.assert_close(loaded.module.get_submodule(targets[1]).weight, w0 + 2.0 * (b @ a))
    assert (_logits(loaded.module) - base).abs().max() > 1e-4  # the adapter does something
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(_logits(back), _logits(loaded.module), rtol=0, atol=1e-6)  # sdpa vs eager


def test_rslora_scaling_and_gpt2_conv1d(tmp_path):
    loaded = build("gpt2")
    _adapter(tmp_path / "ad", loaded.module, ["transformer.h.0.attn.c_attn"], r=4, alpha=8, fan_in_fan_out=True,
             use_rslora=True)
    result = run_reparam(loaded, ["merge-lora"], adapter=tmp_path / "ad")
    assert result["records"][0]["equivalence"]["pass"] and result["equivalence"]["pass"]


@pytest.mark.parametrize("cfg, needle", [
    ({"use_dora": True}, "DoRA"), ({"bias": "all"}, "trains biases"), ({"peft_type": "IA3"}, "not LORA"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
])
def test_adapters_that_are_not_plain_lora_are_refused(tmp_path, cfg, needle):
    loaded = build("llama")
    _adapter(tmp_path / "ad", loaded.module, ["model.layers.0.self_attn.q_proj"], **cfg)
    with pytest.raises(UserError, match=needle):
        run_reparam(loaded, ["merge-lora"], adapter=tmp_path / "ad")


def test_adapter_for_another_model_is_refused(tmp_path):
    loaded, other = build("llama"), build("gpt2")
    _adapter(tmp_path / "ad", other.module, ["transformer.h.0.attn.c_attn"], fan_in_fan_out=True)
    with pytest.raises(UserError, match="does not have"):
        run_reparam(loaded, ["merge-lora"], adapter=tmp_path / "ad")
    with pytest.raises(UserError, match="adapter_config.json"):
        run_reparam(loaded, ["merge-lora"], adapter=tmp_path / "nothing")
