"""Width pruning on tiny random models: exact no-ops, known zero units, GQA groups, reloads and the adaptive budget."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import COMMON, build

from compress.data import Windows
from compress.errors import UserError
from compress.importance.context import ScoringContext
from compress.models import layer_map
from compress.models.hf import LoadedModel
from compress.prune.width import (
    FORMAT,
    WidthImportance,
    adaptive_ratios,
    block_shape,
    distortion_table,
    layout_of,
    load_width_pruned,
    prune_width,
    save_width_pruned,
    snap_ratio,
    width_importance,
)


def _windows(vocab: int = 64, n: int = 4, length: int = 12) -> Windows:
    ids = torch.randint(1, vocab, (n, length), generator=torch.Generator().manual_seed(1))
    return Windows(ids, torch.ones_like(ids), "calibration", "random", 0)


def _decoder(config) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config._attn_implementation = "eager"
    m = AutoModelForCausalLM.from_config(config).eval()
    return LoadedModel(m, None, "decoder", config.model_type, f"tiny-{config.model_type}")


def _model(kind: str) -> LoadedModel:
    """llama: 4 heads / 2 KV heads; gqa: 8 heads / 2 KV heads (groups of 4, head_dim 4); qwen2: q/k/v biases."""
    import transformers as tf

    if kind == "gqa":
        return _decoder(tf.LlamaConfig(**{**COMMON, "num_attention_heads": 8, "num_key_value_heads": 2}))
    if kind == "qwen2":
        return _decoder(tf.Qwen2Config(**COMMON))
    return build(kind)


def _out(loaded: LoadedModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        kw = {"use_cache": False} if loaded.kind == "decoder" else {}
        out = loaded.module(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _random_importance(loaded: LoadedModel, seed: int = 0) -> WidthImportance:
    lmap = layer_map(loaded.module)
    layout = layout_of(loaded.module, lmap)
    g = torch.Generator().manual_seed(seed)
    shapes = [block_shape(loaded.module.get_submodule(b.path), layout) for b in lmap.blocks]
    return WidthImportance("random", {i: torch.rand(s["kv_heads"], generator=g) for i, s in enumerate(shapes)},
                           {i: torch.rand(s["intermediate"], generator=g) for i, s in enumerate(shapes)})


def _masked(loaded: LoadedModel, record: dict) -> LoadedModel:
    """The original model with the removed heads' o_proj columns and removed channels' down_proj columns zeroed:
    what the pruned model must compute."""
    lmap = layer_map(loaded.module)
    layout = layout_of(loaded.module, lmap)
    for b in lmap.blocks:
        blk = loaded.module.get_submodule(b.path)
        shape, kept = block_shape(blk, layout), record["layers"][b.index]
        hd = shape["head_dim"]
        with torch.no_grad():
            o = blk.get_submodule(layout.o).weight
            for h in set(range(shape["heads"])) - set(kept["kept_heads"]):
                o[:, h * hd:(h + 1) * hd] = 0
            down = blk.get_submodule(layout.down).weight
            for c in set(range(shape["intermediate"])) - set(kept["kept_channels"]):
                down[:, c] = 0
    return loaded


@pytest.mark.parametrize("kind", ["llama", "gqa", "bert"])
def test_ratio_zero_leaves_outputs_identical(kind):
    loaded = _model(kind)
    lmap = layer_map(loaded.module)
    ids = _windows().input_ids
    ref = _out(loaded, ids)
    imp = width_importance(ScoringContext(loaded, lmap, _windows()))
    record = prune_width(loaded.module, lmap, 0.0, imp)
    assert torch.equal(_out(loaded, ids), ref)
    assert record["params_before"] == record["params_after"]
    assert record["uniform"] and all(len(v["kept_channels"]) == 64 for v in record["layers"].values())


@pytest.mark.parametrize("method", ["activation", "taylor"])
def test_zero_channels_rank_lowest_and_pruning_them_changes_nothing(method):
    loaded = _model("llama")
    lmap = layer_map(loaded.module)
    g = torch.Generator().manual_seed(3)
    zeroed = {}
    with torch.no_grad():
        for b in lmap.blocks:
            zeroed[b.index] = set(torch.randperm(64, generator=g)[:16].tolist())
            up = loaded.module.get_submodule(f"{b.path}.mlp.up_proj").weight
            up[sorted(zeroed[b.index])] = 0
    ids = _windows().input_ids
    ref = _out(loaded, ids)
    imp = width_importance(ScoringContext(loaded, lmap, _windows()), method)
    for i, chans in zeroed.items():
        assert set(torch.argsort(imp.channels[i], stable=True)[:16].tolist()) == chans
        assert float(imp.channels[i][sorted(chans)].abs().max()) == 0.0
        assert float(imp.channels[i][sorted(set(range(64)) - chans)].min()) > 0.0
    record = prune_width(loaded.module, lmap, {i: (0.0, 0.25) for i in range(3)}, imp)
    for i, chans in zeroed.items():
        assert set(record["layers"][i]["kept_channels"]) == set(range(64)) - chans
        assert loaded.module.model.layers[i].mlp.down_proj.weight.shape == (32, 48)
    torch.testing.assert_close(_out(loaded, ids), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["llama", "gqa", "qwen2", "bert"])
def test_pruned_model_computes_what_the_masked_original_computes(kind):
    loaded = _model(kind)
    original = copy.deepcopy(loaded)
    lmap = layer_map(loaded.module)
    ratios = {0: (0.5, 0.25), 2: (0.5, 0.5)} if kind != "bert" else {0: (0.25, 0.25), 1: (0.75, 0.125)}
    record = prune_width(loaded.module, lmap, ratios, _random_importance(loaded))
    assert not record["uniform"] and not record["config_updated"]
    assert record["params_after"] < record["params_before"] == sum(p.numel() for p in original.module.parameters())
    assert record["params_after"] == sum(p.numel() for p in loaded.module.parameters()) == lmap.total_params
    ids = _windows().input_ids
    torch.testing.assert_close(_out(loaded, ids), _out(_masked(original, record), ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gqa", "qwen2"])
def test_uniform_pruned_model_reloads_with_plain_transformers(kind, tmp_path):
    from transformers import AutoModelForCausalLM

    loaded = _model(kind)
    lmap = layer_map(loaded.module)
    heads, kv = loaded.module.config.num_attention_heads, loaded.module.config.num_key_value_heads
    imp = width_importance(ScoringContext(loaded, lmap, _windows()))
    record = prune_width(loaded.module, lmap, {i: (0.5, 0.25) for i in range(3)}, imp)
    assert record["uniform"] and record["config_updated"]
    cfg = loaded.module.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size) == (heads // 2, kv // 2, 48)
    assert cfg.head_dim == 32 // heads  # kept, not re-derived from hidden_size / num_attention_heads
    ids = _windows().input_ids
    pruned = _out(loaded, ids)
    loaded.module.save_pretrained(tmp_path / "hf")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    torch.testing.assert_close(_out(LoadedModel(again, None, "decoder", kind, "x"), ids), pruned, rtol=0, atol=1e-6)
    # Our artifact of a uniform model is a plain transformers directory too, and our loader reads it.
    save_width_pruned(loaded, record, tmp_path / "art")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "art", attn_implementation="eager").eval()
    torch.testing.assert_close(_out(LoadedModel(plain, None, "decoder", kind, "x"), ids), pruned, rtol=0, atol=1e-6)
    torch.testing.assert_close(_out(load_width_pruned(tmp_path / "art"), ids), pruned, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["gqa", "qwen2", "bert"])
def test_per_layer_shapes_save_and_load_to_identical_outputs(kind, tmp_path):
    loaded = _model(kind)
    lmap = layer_map(loaded.module)
    imp = width_importance(ScoringContext(loaded, lmap, _windows()))
    ratios = {0: (0.5, 0.5), 1: (0.0, 0.25)} if kind != "bert" else {0: (0.5, 0.5), 2: (0.25, 0.0)}
    record = prune_width(loaded.module, lmap, ratios, imp)
    assert not record["uniform"]
    ids = _windows().input_ids
    pruned = _out(loaded, ids)
    out = save_width_pruned(loaded, record, tmp_path / "w", {"note": "test"})
    again = load_width_pruned(out)
    assert again.extra["manifest"]["format"] == FORMAT and again.extra["manifest"]["note"] == "test"
    layout = layout_of(again.module, layer_map(again.module))
    shapes = [block_shape(again.module.get_submodule(b.path), layout) for b in layer_map(again.module).blocks]
    assert shapes == [record["per_layer_shapes"][i] for i in range(3)]
    again.module.config._attn_implementation = "eager"
    torch.testing.assert_close(_out(again, ids), pruned, rtol=0, atol=1e-5)
    if kind != "bert":
        from transformers import AutoModelForCausalLM

        with pytest.raises((OSError, ValueError, RuntimeError)):  # refused, never loaded with mismatched shapes
            AutoModelForCausalLM.from_pretrained(out)


def test_gqa_kept_heads_are_whole_kept_groups():
    loaded = _model("gqa")
    lmap = layer_map(loaded.module)
    imp = _random_importance(loaded, seed=5)
    record = prune_width(loaded.module, lmap, {0: (0.5, 0.0), 1: (0.0, 0.0), 2: (0.5, 0.1)}, imp)
    for i, layer in record["layers"].items():
        groups, heads = set(layer["kept_groups"]), layer["kept_heads"]
        assert all(h // 4 in groups for h in heads)  # a kept q head's k/v head is kept
        assert sorted(heads) == sorted(g * 4 + r for g in groups for r in range(4))  # and the whole group stays
        attn = loaded.module.model.layers[i].self_attn
        assert attn.num_key_value_groups == 4 and attn.head_dim == 4
        assert attn.q_proj.out_features == 4 * attn.k_proj.out_features == 4 * 4 * len(groups)
    worst = int(torch.argmin(imp.groups[0]))
    assert record["layers"][0]["kept_groups"] == [1 - worst]  # the lower-scored group went


@pytest.mark.parametrize("ratios, needle", [
    ({0: (0.125, 0.0)}, "a whole KV group (4 query heads sharing one key/value head) at a time"),
    ({1: (0.25, 0.0)}, "use a multiple of 1/2"),
    (0.25, "whole KV group"),
    ({0: (0.95, 0.0)}, "removes all 2 KV groups"),
    ({0: (0.0, 0.999)}, "removes all 64 FFN channels"),
    ({0: (1.0, 0.0)}, "outside [0, 1)"),
    ({0: (0.0, -0.1)}, "outside [0, 1)"),
    (1.0, "outside [0, 1)"),
    ({7: (0.5, 0.5)}, "block 7 does not exist"),
    ({0: 0.5}, "(attention ratio, FFN ratio) pair"),
])
def test_bad_ratios_are_refused_before_anything_changes(ratios, needle):
    loaded = _model("gqa")
    lmap = layer_map(loaded.module)
    before = {k: v.clone() for k, v in loaded.module.state_dict().items()}
    with pytest.raises(UserError) as err:
        prune_width(loaded.module, lmap, ratios, _random_importance(loaded))
    assert needle in str(err.value) and "\n" not in str(err.value)
    after = loaded.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_unsupported_inputs_are_refused():
    gpt2 = build("gpt2")
    with pytest.raises(UserError, match="width pruning supports llama-style"):
        width_importance(ScoringContext(gpt2, layer_map(gpt2.module), _windows()))
    bert = build("bert")
    with pytest.raises(UserError, match="use 'activation' for encoders"):
        width_importance(ScoringContext(bert, layer_map(bert.module), _windows()), "taylor")
    llama = _model("llama")
    imp = _random_importance(llama)
    imp.channels[0] = imp.channels[0][:10]  # scores of another shape
    with pytest.raises(UserError, match="recompute width_importance"):
        prune_width(llama.module, layer_map(llama.module), {0: (0.0, 0.25)}, imp)


def test_table_entry_is_the_real_divergence_of_that_block_pruned():
    from compress.metrics import kl_per_token, log_softmax_chunked

    loaded = _model("gqa")
    lmap = layer_map(loaded.module)
    ctx = ScoringContext(loaded, lmap, _windows())
    imp = width_importance(ctx)
    table = distortion_table(ctx, imp, (0.0, 0.5))
    assert table.distortion[1][0] == 0.0 and table.ratios[1][1] == (0.5, 0.5)
    ids = ctx.windows.input_ids
    ref = _out(loaded, ids)
    prune_width(loaded.module, lmap, {1: table.ratios[1][1]}, imp)
    kl = float(kl_per_token(log_softmax_chunked(ref), _out(loaded, ids)).mean())
    assert kl == pytest.approx(table.distortion[1][1], rel=1e-4)
    assert sum(p.numel() for p in loaded.module.model.layers[1].parameters()) == table.params[1][1]


@pytest.mark.parametrize("kind, target", [("llama", 0.25), ("gqa", 0.375)])
def test_adaptive_meets_the_budget_and_is_no_worse_than_uniform(kind, target):
    loaded = _model(kind)
    lmap = layer_map(loaded.module)
    ctx = ScoringContext(loaded, lmap, _windows())
    imp = width_importance(ctx)
    ratios = adaptive_ratios(ctx, imp, target)
    table = distortion_table(ctx, imp)  # cached: the table adaptive_ratios chose from
    layout = layout_of(loaded.module, lmap)
    uniform = {i: snap_ratio(block_shape(loaded.module.get_submodule(b.path), layout), target)
               for i, b in enumerate(lmap.blocks)}

    def summed(r):
        return sum(table.distortion[i][table.ratios[i].index(r[i])] for i in range(3))

    assert summed(ratios) <= summed(uniform)
    twin = copy.deepcopy(loaded.module)
    uni_rec = prune_width(twin, layer_map(twin), uniform, imp)
    rec = prune_width(loaded.module, lmap, ratios, imp)
    assert rec["params_after"] <= uni_rec["params_after"] < rec["params_before"]
    with pytest.raises(UserError, match="largest candidate ratio"):
        adaptive_ratios(ScoringContext(_model(kind), layer_map(_model(kind).module), _windows()), imp, 0.6,
                        choices=(0.0, 0.25))


def test_per_layer_pruned_decoder_generates_the_same_with_and_without_cache():
    loaded = _model("gqa")
    lmap = layer_map(loaded.module)
    prune_width(loaded.module, lmap, {0: (0.5, 0.25), 2: (0.5, 0.0)}, _random_importance(loaded))
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert loaded.module.generate(ids, use_cache=True, **kw).tolist() == \
        loaded.module.generate(ids, use_cache=False, **kw).tolist()
