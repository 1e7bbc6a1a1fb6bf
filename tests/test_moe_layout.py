"""MoE layout: tiny random models of every MoE family -> routers, experts and shared experts found."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import build

from compress.errors import UserError
from compress.models.hf import LoadedModel
from compress.models.layers import layer_map
from compress.moe.layout import moe_layers

MOE_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"]
VOCAB = 64
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128)
EXPERTS = {"mixtral": 8, "qwen2_moe": 8, "qwen3_moe": 8, "olmoe": 4, "deepseek_v3": 8}


def moe_config(family: str):
    """A tiny config of `family`: hidden 64, 3 layers, 4-8 experts, top-2."""
    import transformers as tf

    if family == "mixtral":
        return tf.MixtralConfig(**COMMON, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2)
    if family == "qwen2_moe":
        return tf.Qwen2MoeConfig(**COMMON, intermediate_size=64, moe_intermediate_size=32, num_experts=8,
                                 num_experts_per_tok=2, shared_expert_intermediate_size=48, norm_topk_prob=False)
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(**COMMON, head_dim=16, intermediate_size=64, moe_intermediate_size=32, num_experts=8,
                                 num_experts_per_tok=2, norm_topk_prob=True)
    if family == "olmoe":
        return tf.OlmoeConfig(**COMMON, intermediate_size=32, num_experts=4, num_experts_per_tok=2)
    if family == "deepseek_v3":
        return tf.DeepseekV3Config(**{**COMMON, "num_key_value_heads": 4}, intermediate_size=64,
                                   moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
                                   n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1,
                                   kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                   v_head_dim=16)
    raise ValueError(family)


def tiny_moe(family: str, seed: int = 0) -> LoadedModel:
    """A LoadedModel of `family` with random weights (default attention, as a reload picks it); no download."""
    from transformers import AutoModelForCausalLM

    config = moe_config(family)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    return LoadedModel(model, None, "decoder", family, f"tiny-{family}")


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_layers_find_routers_experts_and_shared(family):
    model = tiny_moe(family).module
    layers = moe_layers(model)
    dense_first = family == "deepseek_v3"  # first_k_dense_replace=1
    assert [m.index for m in layers] == ([1, 2] if dense_first else [0, 1, 2])
    for m in layers:
        assert m.num_experts == EXPERTS[family] and m.top_k == 2
        assert isinstance(model.get_submodule(m.router), torch.nn.Module)
        for path in m.experts + m.shared:
            assert model.get_submodule(path) is not None
        assert m.scoring == ("sigmoid" if family == "deepseek_v3" else "softmax")
    shared = {"qwen2_moe": 2, "deepseek_v3": 1}.get(family, 0)  # qwen2_moe: the shared expert and its gate
    assert all(len(m.shared) == shared for m in layers)
    assert (layers[0].native_bias is not None) == (family == "deepseek_v3")


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_layer_map_carries_moe_info(family):
    model = tiny_moe(family).module
    lmap = layer_map(model)
    assert lmap.adapter != "generic" and not lmap.notes
    for blk in lmap.blocks:
        assert set(blk.sublayers) == {"attn", "mlp"}
        if family == "deepseek_v3" and blk.index == 0:
            assert blk.moe is None  # the dense first layer
            continue
        assert blk.moe is not None and blk.moe.path == blk.sublayers["mlp"].hook_path
        assert all(p in blk.linears or any(x.startswith(p) for x in blk.linears) for p in blk.moe.experts)
    d = json.loads(json.dumps(lmap.to_dict()))
    moe_blocks = [b for b in d["blocks"] if "moe" in b]
    assert moe_blocks and moe_blocks[0]["moe"]["top_k"] == 2
    assert len(moe_blocks[0]["moe"]["experts"]) == EXPERTS[family]


def test_dense_model_has_no_experts():
    model = build("llama").module
    with pytest.raises(UserError, match="has no experts"):
        moe_layers(model)
    assert all("moe" not in b for b in layer_map(model).to_dict()["blocks"])
