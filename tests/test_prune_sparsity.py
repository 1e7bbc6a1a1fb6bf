"""Weight sparsity on tiny random llama models: exact ratios and N:M groups, the Wanda score, no-ops, reloads, the
adaptive budget and bad input."""

from __future__ import annotations

import pytest
import torch
from tiny_models import COMMON, build

from compress.data import Windows
from compress.errors import UserError
from compress.importance.context import ScoringContext
from compress.models import layer_map
from compress.models.hf import LoadedModel
from compress.prune.sparsity import (
    adaptive_sparsity,
    apply_sparsity,
    input_norms,
    masks,
    sparsity_table,
)


def _windows(vocab: int = 64, n: int = 4, length: int = 12) -> Windows:
    ids = torch.randint(1, vocab, (n, length), generator=torch.Generator().manual_seed(1))
    return Windows(ids, torch.ones_like(ids), "calibration", "random", 0)


def _llama(**overrides) -> LoadedModel:
    if not overrides:
        return build("llama")
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(**{**COMMON, **overrides})
    cfg._attn_implementation = "eager"
    return LoadedModel(AutoModelForCausalLM.from_config(cfg).eval(), None, "decoder", "llama", "tiny-llama")


def _setup(loaded: LoadedModel | None = None):
    loaded = loaded or _llama()
    lmap = layer_map(loaded.module)
    ctx = ScoringContext(loaded, lmap, _windows())
    return loaded, lmap, ctx, input_norms(ctx)


def _logits(module, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    with torch.inference_mode():
        return module(input_ids=ids, attention_mask=torch.ones_like(ids) if mask is None else mask,
                      use_cache=False).logits


def _kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    from compress.metrics import kl_per_token, log_softmax_chunked

    return float(kl_per_token(log_softmax_chunked(ref_logits), logits).mean())


def _state(module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _same_state(module, before: dict[str, torch.Tensor]) -> bool:
    after = module.state_dict()
    return all(torch.equal(before[k], after[k]) for k in before)


# ---------------------------------------------------------------------------------------------------- norms


def test_input_norms_are_the_column_norms_of_each_linear_input():
    loaded, lmap, ctx, norms = _setup()
    seen: dict[str, list[torch.Tensor]] = {}
    handles = [loaded.module.get_submodule(p).register_forward_pre_hook(
        lambda m, a, p=p: seen.setdefault(p, []).append(a[0].reshape(-1, a[0].shape[-1])))
        for b in lmap.blocks for p in b.linears]
    try:
        _logits(loaded.module, ctx.windows.input_ids)
    finally:
        for h in handles:
            h.remove()
    assert set(norms) == set(seen) and len(norms) == 3 * 7
    for p, xs in seen.items():
        torch.testing.assert_close(norms[p], torch.cat(xs).norm(dim=0), rtol=1e-5, atol=1e-5)


def test_padding_is_excluded_from_input_norms():
    ids = _windows().input_ids
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    mask[3, 5:] = 0
    other = ids.clone()
    other[mask == 0] = (other[mask == 0] + 7) % 63 + 1  # different tokens in the padding only
    loaded = _llama()
    lmap = layer_map(loaded.module)
    a = input_norms(ScoringContext(loaded, lmap, Windows(ids, mask, "calibration", "random", 0)))
    b = input_norms(ScoringContext(loaded, lmap, Windows(other, mask, "calibration", "random", 0)))
    full = input_norms(ScoringContext(loaded, lmap, Windows(ids, torch.ones_like(ids), "calibration", "random", 0)))
    for p in a:
        torch.testing.assert_close(a[p], b[p], rtol=1e-5, atol=1e-6)  # causal + masked: real tokens unchanged
        assert bool((a[p] <= full[p] + 1e-6).all()) and not torch.allclose(a[p], full[p])


# ---------------------------------------------------------------------------------------------------- masks


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.8])
def test_unstructured_zeroes_the_ratio_in_every_row(ratio):
    loaded, lmap, _, norms = _setup()
    record = apply_sparsity(loaded.module, lmap, ratio, norms)
    total_zeros = 0
    for b in lmap.blocks:
        for p in b.linears:
            w = loaded.module.get_submodule(p).weight
            want = int(ratio * w.shape[1] + 0.5)  # round half up, per row
            assert ((w == 0).sum(dim=1) == want).all(), p
            assert record["linears"][p]["ratio"] == ratio
            assert record["linears"][p]["zeros"] == want * w.shape[0]
            assert record["linears"][p]["sparsity"] == pytest.approx(want / w.shape[1])
            total_zeros += want * w.shape[0]
    assert record["zeros"] == total_zeros
    assert record["weights"] == sum(loaded.module.get_submodule(p).weight.numel() for b in lmap.blocks
                                    for p in b.linears)
    assert record["sparsity"] == pytest.approx(ratio, abs=0.02)


@pytest.mark.parametrize("pattern, n, m", [("2:4", 2, 4), ("4:8", 4, 8)])
def test_n_m_keeps_exactly_n_of_every_m(pattern, n, m):
    loaded, lmap, _, norms = _setup()
    record = apply_sparsity(loaded.module, lmap, 1 - n / m, norms, pattern)
    for b in lmap.blocks:
        for p in b.linears:
            w = loaded.module.get_submodule(p).weight
            groups = (w != 0).reshape(w.shape[0], -1, m).sum(-1)
            assert (groups == n).all(), p
    assert record["sparsity"] == 0.5 and record["pattern"] == pattern


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_other_layouts_conv1d_and_encoders(family):
    from compress.quantize.apply import weight_matrix

    loaded = build(family)
    lmap = layer_map(loaded.module)
    norms = input_norms(ScoringContext(loaded, lmap, _windows()))
    record = apply_sparsity(loaded.module, lmap, 0.5, norms, "2:4")
    for b in lmap.blocks:
        for p in b.linears:
            w = weight_matrix(loaded.module.get_submodule(p))  # GPT-2's Conv1D stores [in, out]: rows are outputs
            assert norms[p].shape == (w.shape[1],)
            assert ((w != 0).reshape(w.shape[0], -1, 4).sum(-1) == 2).all(), p
    assert record["sparsity"] == 0.5


def test_2_4_keeps_the_two_highest_scores_of_each_group():
    w = torch.tensor([[1.0, -4.0, 3.0, 2.0, 0.1, 0.2, 0.3, 0.4]])
    norms = torch.tensor([1.0, 1.0, 1.0, 1.0, 100.0, 1.0, 1.0, 1.0])
    keep = masks(w, norms, 0.5, "2:4")
    assert keep.tolist() == [[False, True, True, False, True, False, False, True]]


def test_wanda_prunes_zero_norm_columns_first_and_keeps_small_weights_with_huge_norm():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 16, generator=g) + 3.0  # every magnitude in about [0.5, 6]
    w[:, 7] = 0.01  # the smallest weights of every row...
    norms = torch.rand(16, generator=g) + 0.5
    norms[[2, 11, 13]] = 0.0
    norms[7] = 1e6  # ...but their input is huge
    keep = masks(w, norms, 3 / 16)
    assert (~keep).nonzero()[:, 1].reshape(6, 3).tolist() == [[2, 11, 13]] * 6
    keep = masks(w, norms, 0.5)
    assert keep[:, 7].all() and not keep[:, [2, 11, 13]].any()
    assert not masks(w, None, 1 / 16)[:, 7].any()  # plain magnitude would drop them first


def test_zero_input_columns_are_pruned_first_in_a_model_and_change_nothing():
    loaded = _llama()
    lmap = layer_map(loaded.module)
    blk = loaded.module.model.layers[0]
    dead = [3, 17, 25, 30]
    with torch.no_grad():
        blk.input_layernorm.weight[dead] = 0.0  # q/k/v of block 0 never see these input columns
    ids = _windows().input_ids
    ref = _logits(loaded.module, ids)
    norms = input_norms(ScoringContext(loaded, lmap, _windows()))
    qkv = [f"model.layers.0.self_attn.{n}_proj" for n in "qkv"]
    for p in qkv:
        assert norms[p][dead].abs().max() == 0 and norms[p][[j for j in range(32) if j not in dead]].min() > 0
    apply_sparsity(loaded.module, lmap, dict.fromkeys(qkv, len(dead) / 32), norms)
    for p in qkv:
        w = loaded.module.get_submodule(p).weight
        assert ((w == 0).nonzero()[:, 1].reshape(w.shape[0], -1) == torch.tensor(dead)).all()
    torch.testing.assert_close(_logits(loaded.module, ids), ref, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------ no-ops, reloads


def test_ratio_zero_leaves_logits_identical():
    loaded, lmap, ctx, norms = _setup()
    ids = ctx.windows.input_ids
    ref, before = _logits(loaded.module, ids), _state(loaded.module)
    record = apply_sparsity(loaded.module, lmap, 0.0, norms)
    assert torch.equal(_logits(loaded.module, ids), ref) and _same_state(loaded.module, before)
    assert record["zeros"] == 0 and record["sparsity"] == 0.0


@pytest.mark.parametrize("pattern, ratio", [("unstructured", 0.6), ("2:4", 0.5)])
def test_sparsified_model_reloads_with_plain_transformers(pattern, ratio, tmp_path):
    from transformers import AutoModelForCausalLM

    loaded, lmap, ctx, norms = _setup()
    record = apply_sparsity(loaded.module, lmap, ratio, norms, pattern)
    ids = ctx.windows.input_ids
    sparse = _logits(loaded.module, ids)
    loaded.module.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert torch.equal(_logits(again, ids), sparse)
    for p, rec in record["linears"].items():
        w = again.get_submodule(p).weight
        assert int((w == 0).sum()) == rec["zeros"] > 0
        assert torch.equal(w, loaded.module.get_submodule(p).weight)


# ------------------------------------------------------------------------------------------------- adaptive


@pytest.mark.parametrize("granularity, unit, paths", [
    ("block", 1, [f"model.layers.1.{n}" for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                 "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                 "mlp.down_proj")]),
    ("linear", 9, ["model.layers.1.self_attn.v_proj"]),
])
def test_table_entry_is_the_real_kl_of_that_unit_sparsified(granularity, unit, paths):
    loaded, lmap, ctx, norms = _setup()
    before = _state(loaded.module)
    table = sparsity_table(ctx, norms, (0.0, 0.5), granularity)
    assert _same_state(loaded.module, before)  # measuring restores every weight exactly
    assert table.units[unit][1] == paths and table.distortion[unit][0] == 0.0
    assert table.kept[unit][1] == table.weights[unit] // 2
    ids = ctx.windows.input_ids
    ref = _logits(loaded.module, ids)
    apply_sparsity(loaded.module, lmap, dict.fromkeys(paths, 0.5), norms)
    assert _kl(ref, _logits(loaded.module, ids)) == pytest.approx(table.distortion[unit][1], rel=1e-4)


@pytest.mark.parametrize("granularity, target", [("block", 0.5), ("linear", 0.5), ("linear", 0.3)])
def test_adaptive_meets_the_budget_and_is_no_worse_than_uniform(granularity, target):
    loaded, lmap, ctx, norms = _setup()
    ratios = adaptive_sparsity(ctx, norms, target, granularity=granularity)
    table = sparsity_table(ctx, norms, granularity=granularity)  # cached: the table adaptive_sparsity chose from
    assert set(ratios) == {p for b in lmap.blocks for p in b.linears}
    picks = [table.choices.index(ratios[paths[0]]) for _, paths in table.units]
    assert all(ratios[p] == table.choices[c] for (_, paths), c in zip(table.units, picks, strict=True) for p in paths)
    col = table.choices.index(target)
    adaptive_sum = sum(table.distortion[u][c] for u, c in enumerate(picks))
    uniform_kept = sum(row[col] for row in table.kept)
    if uniform_kept <= sum(table.weights) * (1 - target):  # uniform meets the budget: adaptive can only do better
        assert adaptive_sum <= sum(row[col] for row in table.distortion) + 1e-12
    record = apply_sparsity(loaded.module, lmap, ratios, norms)
    assert record["zeros"] >= target * record["weights"]
    assert record["zeros"] == sum(table.weights[u] - table.kept[u][c] for u, c in enumerate(picks))


def test_adaptive_target_beyond_the_choices_is_refused():
    _, _, ctx, norms = _setup()
    with pytest.raises(UserError, match="largest candidate ratio"):
        adaptive_sparsity(ctx, norms, 0.6, choices=(0.0, 0.25, 0.5))


# ------------------------------------------------------------------------------------------------ bad input


def _bad_calls():
    good = "model.layers.0.mlp.up_proj"
    return [
        (lambda m, lm, ctx, n: apply_sparsity(m, lm, 1.0, n), "outside [0, 1)"),
        (lambda m, lm, ctx, n: apply_sparsity(m, lm, -0.1, n), "outside [0, 1)"),
        (lambda m, lm, ctx, n: apply_sparsity(m, lm, {good: 0.3, "model.layers.2.mlp.down_proj": 1.5}, n),
         "ratios: model.layers.2.mlp.down_proj 1.5 is outside [0, 1)"),
        (lambda m, lm, ctx, n: apply_sparsity(m, lm, 0.5, n, "3:2"), "--pattern '3:2' is unknown"),
        (lambda m, lm, ctx, n: apply_sparsity(m, lm, 0.5, n, "block"), "use unstructured or 2:4"),
        (lambda m, lm, ctx, n: apply_sparsity(m, lm, 0.3, n, "2:4"), "use --sparsity 50% with it"),
        (lambda m, lm, ctx, n: apply_sparsity(m, lm, {good: 0.3, "lm_head": 0.5}, n), "'lm_head' is not a Linear"),
        (lambda m, lm, ctx, n: apply_sparsity(m, lm, 0.5, {**n, good: n[good][:10]}), "recompute input_norms"),
        (lambda m, lm, ctx, n: adaptive_sparsity(ctx, n, 0.5, pattern="2:4"), "drop --adaptive"),
        (lambda m, lm, ctx, n: adaptive_sparsity(ctx, n, 0.0), "--sparsity 0.0 is outside (0, 1)"),
        (lambda m, lm, ctx, n: adaptive_sparsity(ctx, n, 1.0), "outside (0, 1)"),
        (lambda m, lm, ctx, n: adaptive_sparsity(ctx, n, 50), "outside (0, 1)"),
        (lambda m, lm, ctx, n: adaptive_sparsity(ctx, n, 0.5, granularity="row"), "granularity 'row' is unknown"),
        (lambda m, lm, ctx, n: adaptive_sparsity(ctx, n, 0.5, choices=(0.0, 1.0)), "candidate ratio 1.0"),
    ]


@pytest.mark.parametrize("index", range(len(_bad_calls())))
def test_bad_input_is_refused_before_anything_changes(index):
    call, needle = _bad_calls()[index]
    loaded, lmap, ctx, norms = _setup()
    before = _state(loaded.module)
    with pytest.raises(UserError) as err:
        call(loaded.module, lmap, ctx, norms)
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert _same_state(loaded.module, before)


def test_2_4_on_a_width_not_divisible_by_4_is_refused_before_anything_changes():
    loaded, lmap, _, norms = _setup(_llama(intermediate_size=66))
    before = _state(loaded.module)
    with pytest.raises(UserError, match=r"model\.layers\.0\.mlp\.down_proj has 66 input columns, not a multiple "
                                        "of 4; use --pattern unstructured"):
        apply_sparsity(loaded.module, lmap, 0.5, norms, "2:4")
    assert _same_state(loaded.module, before)  # q/k/v/o/gate/up of block 0 come first and were not touched
    record = apply_sparsity(loaded.module, lmap, 0.5, norms)  # unstructured handles any width
    assert record["linears"]["model.layers.0.mlp.down_proj"]["zeros"] == 33 * 32


def test_masks_refuses_bad_shapes():
    with pytest.raises(UserError, match="recompute input_norms"):
        masks(torch.randn(4, 8), torch.ones(6), 0.5)
    with pytest.raises(UserError, match="x: ratio 1.2 is outside"):
        masks(torch.randn(4, 8), torch.ones(8), 1.2, name="x")
