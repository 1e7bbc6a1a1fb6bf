"""Expert pruning and merging on tiny random MoE models of every supported family (mixtral, qwen2_moe, qwen3_moe,
olmoe, deepseek_v3), expert schedules and the compress-moe-pruned-v1 artifact round trip."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from compress.errors import UserError
from compress.moe.layout import moe_layers
from compress.moe.prune import expert_stats, masked_experts, prune_experts, prune_moe
from compress.moe.schedule import SCHEDULES, schedule_counts

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"]
COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run faster on one thread (and far faster when the machine is busy)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_moe(family: str, experts: int = 8, top_k: int = 2):
    """A random-init MoE decoder of `family`: 3 layers, `experts` routed experts, top-`top_k`."""
    import transformers as tf

    moe = dict(num_experts_per_tok=top_k)
    if family == "mixtral":
        cfg = tf.MixtralConfig(**COMMON, intermediate_size=32, num_local_experts=experts, **moe)
    elif family == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(**COMMON, intermediate_size=32, moe_intermediate_size=16, num_experts=experts,
                                shared_expert_intermediate_size=32, **moe)
    elif family == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(**COMMON, head_dim=8, intermediate_size=32, moe_intermediate_size=16,
                                num_experts=experts, norm_topk_prob=True, **moe)
    elif family == "olmoe":
        cfg = tf.OlmoeConfig(**COMMON, intermediate_size=16, num_experts=experts, **moe)
    else:
        cfg = tf.DeepseekV3Config(**{**COMMON, "num_key_value_heads": 4}, intermediate_size=32,
                                  moe_intermediate_size=16, n_routed_experts=experts, n_group=2, topk_group=1,
                                  first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=4,
                                  qk_nope_head_dim=4, v_head_dim=8, n_shared_experts=1, **moe)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    if family == "deepseek_v3":  # a non-zero selection bias, so slicing it is tested
        for ly in moe_layers(model):
            model.get_buffer(ly.native_bias).copy_(torch.linspace(-0.05, 0.05, experts))
    return model


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 64, (4, 24), generator=torch.Generator().manual_seed(0))


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False).logits


# ---------------------------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("schedule", [s for s in SCHEDULES if s != "adaptive"])
@pytest.mark.parametrize("percent", [0, 10, 25, 50, 75])
def test_schedules_meet_budget_and_top_k(schedule, percent):
    sizes = [8] * 6
    kept = schedule_counts(sizes, 2, percent, schedule)
    removed = int(percent / 100 * 48 + 0.5)
    assert sum(kept) == 48 - removed
    assert all(2 <= k <= 8 for k in kept)


def test_schedule_shapes():
    sizes = [8] * 6
    desc, asc, pyr = (schedule_counts(sizes, 2, 25, s) for s in ("descending", "ascending", "pyramid"))
    assert desc == sorted(desc, reverse=True) and desc[0] > desc[-1]
    assert asc == sorted(asc) and asc[0] < asc[-1]
    assert min(pyr[2:4]) >= max(pyr[0], pyr[-1])
    assert schedule_counts([8, 16], 2, 25, "uniform") == [6, 12]


def test_adaptive_schedule_is_exact_dp():
    costs = [[0, 1, 2, 30], [0, 5, 6, 7], [0, 0.1, 0.2, 0.3]]
    assert schedule_counts([5, 5, 5], 2, 100 * 4 / 15, "adaptive", costs=costs) == [4, 5, 2]


def test_schedule_groups_move_together():
    kept = schedule_counts([8] * 4, 2, 25, "descending", multiple=2)
    assert sum(kept) == 24 and all(k % 2 == 0 for k in kept)


@pytest.mark.parametrize("percent", [80, 100, -1])
def test_schedule_refuses_too_much(percent):
    with pytest.raises(UserError, match="percent"):
        schedule_counts([8] * 6, 2, percent, "uniform")
    with pytest.raises(UserError, match="adaptive"):
        schedule_counts([8] * 6, 2, 25, "adaptive")


# --------------------------------------------------------------------------------------------------- pruning


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_runs_and_routes_only_to_kept(family, ids):
    model = tiny_moe(family)
    plan, pruned = prune_moe(copy.deepcopy(model), ids, 25, "uniform")
    layers = moe_layers(pruned)
    assert plan.removed == plan.total // 4 and sum(ly.num_experts for ly in layers) == plan.total - plan.removed
    dropped = {i: r["dropped"] for i, r in plan.layers.items()}
    with masked_experts(model, dropped):  # the original, routing restricted to the kept experts
        want = logits(model, ids)
    torch.testing.assert_close(logits(pruned, ids), want, rtol=1e-5, atol=1e-5)
    for ly in layers:
        router = pruned.get_submodule(ly.router)
        assert router.weight.shape[0] == ly.num_experts == len(plan.layers[ly.index]["kept"])
    stats = expert_stats(pruned, ids)
    for ly in layers:
        assert stats[ly.index].counts.sum() == ids.numel() * ly.top_k
        assert stats[ly.index].counts.shape[0] == ly.num_experts
    assert plan.config_updated
    json.dumps(plan.to_dict())


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_prune_nothing_is_identity(family, ids):
    model = tiny_moe(family)
    before = logits(model, ids)
    plan, _ = prune_moe(model, ids, 0, "uniform")
    assert plan.removed == 0
    assert torch.equal(logits(model, ids), before)


def test_adaptive_and_kl_importance(ids):
    model = tiny_moe("qwen3_moe")
    plan, _ = prune_moe(model, ids, 25, "adaptive", importance="kl")
    assert plan.removed == 6 and len(plan.costs) == 3
    assert sum(plan.experts_per_layer.values()) == 18
    assert all(k >= 2 for k in plan.experts_per_layer.values())
    assert logits(model, ids).isfinite().all()


def test_merge_into_identical_copy_is_exact(ids):
    model = tiny_moe("mixtral")
    ly = moe_layers(model)[0]
    experts = model.get_submodule(ly.path).experts
    experts[3].load_state_dict(experts[5].state_dict())
    want = {k: v.clone() for k, v in experts[5].state_dict().items()}
    keep = {ly.index: [e for e in range(8) if e != 3]}
    rec = prune_experts(model, keep, merge=True, counts={ly.index: [1, 2, 3, 40, 5, 6, 7, 8]})
    assert rec["layers"][ly.index]["merged_into"] == {3: 5}
    got = model.get_submodule(ly.path).experts[4].state_dict()  # old expert 5 sits at position 4 now
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_merge_aligns_permuted_channels(ids):
    from compress.moe.merge import channel_permutation

    model = tiny_moe("qwen3_moe")
    ly = moe_layers(model)[1]
    experts = model.get_submodule(ly.path).experts
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    x = torch.randn(5, 32)
    with torch.no_grad():  # expert 2 := expert 6 with its intermediate channels shuffled (the same function)
        for name in ("gate_proj", "up_proj"):
            getattr(experts[2], name).weight.copy_(getattr(experts[6], name).weight[perm])
        experts[2].down_proj.weight.copy_(experts[6].down_proj.weight[:, perm])
        torch.testing.assert_close(experts[2](x), experts[6](x))
    assert torch.equal(perm[channel_permutation(experts[6], experts[2], ("gate_proj", "up_proj", "down_proj"))],
                       torch.arange(16))
    want = {k: v.clone() for k, v in experts[6].state_dict().items()}
    prune_experts(model, {ly.index: [e for e in range(8) if e != 2]}, merge=True)
    got = model.get_submodule(ly.path).experts[5].state_dict()  # old expert 6
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_merge_runs_with_output_similarity(ids):
    model = tiny_moe("olmoe")
    plan, _ = prune_moe(model, ids, 25, "descending", merge=True)
    assert all(len(r["merged_into"]) == len(r["dropped"]) for r in plan.layers.values())
    assert logits(model, ids).isfinite().all()


def test_prune_refuses_bad_input(ids):
    model = tiny_moe("mixtral")
    with pytest.raises(UserError, match="percent 80"):
        prune_moe(model, ids, 80, "uniform")
    with pytest.raises(UserError, match="schedule"):
        prune_moe(model, ids, 25, "zigzag")
    with pytest.raises(UserError, match="at least 2"):
        prune_experts(model, {0: [0]})
    with pytest.raises(UserError, match="distinct"):
        prune_experts(model, {0: [0, 0, 9]})
    with pytest.raises(UserError, match="no routed experts"):
        prune_experts(model, {7: [0, 1]})
    ds = tiny_moe("deepseek_v3")
    with pytest.raises(UserError, match="same number"):
        prune_experts(ds, {1: [0, 1, 2, 4, 5, 6, 7]})


# ------------------------------------------------------------------------------------------------- artifact


@pytest.mark.parametrize("family,schedule", [("mixtral", "descending"), ("deepseek_v3", "uniform"),
                                             ("qwen2_moe", "pyramid")])
def test_save_load_round_trip(family, schedule, ids, tmp_path):
    from compress.artifact_formats import FORMATS
    from compress.models.hf import LoadedModel
    from compress.moe.prune_artifact import FORMAT, load_moe_pruned, save_moe_pruned

    model = tiny_moe(family, experts=8)
    plan, _ = prune_moe(model, ids, 25, schedule, merge=family == "qwen2_moe")
    out = save_moe_pruned(LoadedModel(model, None, "decoder", family, f"tiny-{family}"), plan, tmp_path / "a")
    manifest = json.loads((out / "compress.json").read_text())
    assert manifest["format"] == FORMAT and FORMAT in FORMATS
    assert {int(i): len(r["kept"]) for i, r in manifest["moe_layers"].items()} == plan.experts_per_layer
    back = load_moe_pruned(out, manifest)
    torch.testing.assert_close(logits(back.module, ids), logits(model, ids), rtol=0, atol=1e-6)  # sdpa vs eager
    assert {ly.index: ly.num_experts for ly in moe_layers(back.module)} == plan.experts_per_layer
    from compress.artifact_formats import load_artifact

    assert load_artifact(out).extra["manifest"]["format"] == FORMAT  # via artifact_formats.FORMATS
