"""Quantizers, packing, plans, allocators and artifacts on tiny models (known answers, brute force)."""

from __future__ import annotations

import itertools
import json
import random

import numpy as np
import pytest
import torch
from tiny_models import build
from typer.testing import CliRunner

from cli import app
from compress.artifact import save_artifact
from compress.artifact_formats import load_artifact
from compress.errors import UserError
from compress.metrics import weight_footprint
from compress.models import layer_map
from compress.plan import Plan
from compress.quantize.allocate import allocate_by_rank, solve_dp
from compress.quantize.apply import apply_plan, quantizable
from compress.quantize.modules import PackedWeight, QuantEmbedding, TiedQuantHead
from compress.quantize.packing import pack, packed_bytes, unpack
from compress.quantize.rtn import quantize_rtn
from compress.quantize.spec import QuantSpec


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_unpack_round_trips_exactly(bits):
    g = torch.Generator().manual_seed(bits)
    for n in (1, 7, 8, 33, 1000):
        codes = torch.randint(0, 2**bits, (n,), generator=g).to(torch.uint8)
        packed = pack(codes, bits)
        assert packed.numel() == packed_bytes(n, bits)
        assert torch.equal(unpack(packed, bits, n), codes)


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_layout_is_the_little_endian_bit_stream_across_chunks(bits):
    """Artifacts on disk hold this layout: code j's bit i is bit j·bits + i of the stream, 8 stream bits a byte
    (least significant first), the same whether packed in one step or in chunks."""
    from compress.quantize import packing

    n = packing.CHUNK_CODES + 13  # crosses a chunk boundary and ends in a partial byte
    codes = torch.randint(0, 2**bits, (n,), generator=torch.Generator().manual_seed(bits)).to(torch.uint8)
    stream = [(int(c) >> i) & 1 for c in codes.tolist() for i in range(bits)]
    stream += [0] * (-len(stream) % 8)
    want = [sum(stream[k + i] << i for i in range(8)) for k in range(0, len(stream), 8)]
    packed = pack(codes, bits)
    assert packed.tolist() == want
    assert torch.equal(unpack(packed, bits, n), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_error_is_bounded_by_the_step_and_packs_losslessly(bits, symmetric):
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    spec = QuantSpec(bits, 32, symmetric)
    q = quantize_rtn(w, spec)
    assert int(q.codes.max()) < 2**bits
    step = q.scales.float().abs().repeat_interleave(32, dim=1)
    err = (q.dequantize() - w).abs()
    assert (err <= step * 1.001 + 1e-6).all()  # rounding (half a step) plus, at the range ends, the grid offset
    assert float((err / step).mean()) < 0.3  # uniform rounding error averages a quarter step
    packed = PackedWeight.from_quantized(q)
    assert torch.equal(packed.dequantize(), q.dequantize())
    assert packed.stored_weight_bytes() == spec.stored_bytes(16, 64)


def test_symmetric_scale_maps_the_largest_magnitude_weight_to_minus_half_range():
    w = torch.tensor([[0.5, -2.0, 1.0, 0.25] * 8])
    q = quantize_rtn(w, QuantSpec(4, 32, True))
    assert float(q.scales[0, 0]) == pytest.approx(0.25)  # -2.0 / -8
    assert int(q.codes[0, 1]) == 0 and torch.equal(q.dequantize(), w)


def test_bits_per_weight_definitions():
    assert QuantSpec(4, 32, True).bits_per_weight(576) == 4.5
    assert QuantSpec(3, 32, True).bits_per_weight(576) == 3.5
    assert QuantSpec(4, 32, False).bits_per_weight(576) == 4 + 20 / 32
    assert QuantSpec(8, 0, True).bits_per_weight(576) == 8 + 16 / 576
    with pytest.raises(UserError, match="unknown bit width 7"):
        QuantSpec(7)
    with pytest.raises(UserError, match="does not divide"):
        QuantSpec(4, 48).check_shape("x", 64)


def test_dp_is_the_true_optimum_on_small_random_instances():
    rng = random.Random(0)
    for _ in range(60):
        n, k = rng.randint(1, 5), rng.randint(1, 4)
        dist = [[rng.random() for _ in range(k)] for _ in range(n)]
        sizes = [[rng.randint(1, 20) for _ in range(k)] for _ in range(n)]
        budget = rng.randint(sum(min(r) for r in sizes), sum(max(r) for r in sizes))
        best = min((c for c in itertools.product(range(k), repeat=n)
                    if sum(sizes[u][c[u]] for u in range(n)) <= budget),
                   key=lambda c: sum(dist[u][c[u]] for u in range(n)))
        picks = solve_dp(dist, sizes, budget, resolution=10**6)
        assert sum(sizes[u][picks[u]] for u in range(n)) <= budget
        assert sum(dist[u][picks[u]] for u in range(n)) == pytest.approx(sum(dist[u][best[u]] for u in range(n)))
    with pytest.raises(UserError, match="below the smallest"):
        solve_dp([[0.0, 1.0]], [[10, 5]], 4)


def test_dp_fits_a_budget_equal_to_the_smallest_plan_with_coarse_resolution():
    """Large sizes that do not divide the resolution step must not make the all-smallest plan look too big."""
    sizes = [[3_760_129, 1_990_657, 1_105_921]] * 30 + [[30_081_024, 15_925_248, 8_847_360]]
    dist = [[0.001, 0.01, np.inf]] * 30 + [[0.01, 0.1, np.inf]]
    budget = 30 * 1_990_657 + 15_925_248
    assert solve_dp(dist, sizes, budget, resolution=8192) == [1] * 31
    picks = solve_dp(dist, sizes, budget + 1_769_472, resolution=8192)  # room for one block at 8 bits
    assert sorted(picks[:30]) == [0] + [1] * 29 and picks[30] == 1


def test_rank_allocator_lowers_the_least_important_first():
    sizes = [[8, 4, 3]] * 4
    assert allocate_by_rank([2, 0, 3, 1], sizes, 26) == [1, 0, 1, 0]
    assert allocate_by_rank([2, 0, 3, 1], sizes, 15) == [1, 1, 2, 1]  # all one level down (16), then unit 2


def test_plan_precedence_and_validation():
    names = ["a.0.q", "a.0.k", "a.1.q", "emb"]
    plan = Plan({"a.0.q": {"bits": 8}, "re:a\\.\\d\\.q": {"bits": 3}, "_default": {"bits": 4, "group_size": 64}})
    specs = plan.resolve(names)
    assert specs["a.0.q"].bits == 8 and specs["a.1.q"].bits == 3 and specs["emb"] == QuantSpec(4, 64)
    with pytest.raises(UserError, match="not a quantizable module"):
        Plan({"nope": {"bits": 4}}).resolve(names)
    with pytest.raises(UserError, match="matches no quantizable"):
        Plan({"re:zzz.*": {"bits": 4}}).resolve(names)
    with pytest.raises(UserError, match="unknown keys"):
        Plan({"_default": {"bits": 4, "colour": "red"}})
    with pytest.raises(UserError, match="not a plan"):
        Plan.from_dict({"a": 1})
    shown = {"model": "m", "plan": {"rules": {"_default": {"bits": 4}}, "meta": {}}}  # `--show-plan --json` output
    assert Plan.from_dict(shown).spec_for("anything") == QuantSpec(4)


def _tiny_quantized(include_embeddings: bool = True):
    loaded = build("llama")
    model = loaded.module
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    lmap = layer_map(model)
    names = quantizable(model, lmap)
    plan = Plan({"re:.*mlp.*": {"bits": 3}, "_default": {"bits": 4}, "model.embed_tokens": {"bits": 8}})
    specs = plan.resolve(names if include_embeddings else names[:-1])
    reference = {n: quantize_rtn(model.get_submodule(n).weight, s).dequantize() for n, s in specs.items()}
    record = apply_plan(model, lmap, specs)
    return loaded, lmap, specs, reference, record


def test_apply_plan_packs_and_keeps_tied_weights_tied():
    loaded, lmap, specs, reference, record = _tiny_quantized()
    model = loaded.module
    assert isinstance(model.model.embed_tokens, QuantEmbedding) and isinstance(model.lm_head, TiedQuantHead)
    assert any("tied" in n for n in record.notes)
    for n in specs:
        torch.testing.assert_close(model.get_submodule(n).packed.dequantize(), reference[n], rtol=0, atol=0)
    foot = weight_footprint(model)
    want = sum(s.stored_bytes(*reference[n].shape) for n, s in specs.items())
    assert foot["weight_bytes"] == want
    assert foot["weight_params"] == sum(r.numel() for r in reference.values())


def test_artifact_reloads_to_the_same_outputs(tmp_path):
    loaded, lmap, specs, _, _ = _tiny_quantized()
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        before = loaded.module(ids).logits
    save_artifact(loaded, specs, tmp_path / "art", {"plan": {}})
    back = load_artifact(tmp_path / "art")
    with torch.inference_mode():
        after = back.module(ids).logits
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-5)  # tiny model: eager vs sdpa attention
    for n in specs:
        assert torch.equal(back.module.get_submodule(n).packed.dequantize(),
                           loaded.module.get_submodule(n).packed.dequantize())
    assert weight_footprint(back.module)["bpw"] == weight_footprint(loaded.module)["bpw"]
    assert json.loads((tmp_path / "art" / "compress.json").read_text())["modules"].keys() == specs.keys()


@pytest.mark.parametrize("args, needle", [
    (["--bits", "7"], "unknown bit width 7"),
    (["--bits", "4", "--group-size", "48"], "does not divide"),
    (["--layerwise"], "needs one budget"),
    (["--layerwise", "--avg-bits", "4", "--candidates", "4,9"], "unknown bit width 9"),
    (["--bits", "4", "--layerwise"], "choose one mode"),
    (["--layerwise", "--avg-bits", "1.0", "--candidates", "4,3"], "below the smallest plan"),
    (["--layerwise", "--avg-bits", "20", "--candidates", "4,3"], "nothing to allocate"),
    (["--layerwise", "--avg-bits", "4", "--allocator", "rank"], "pass --scores"),
    (["--plan", "PLAN_MISSING_MODULE"], "not a quantizable module"),
    (["--plan", "PLAN_BAD_SCHEMA"], "not a plan"),
    (["--plan", "PLAN_NOT_JSON"], "not valid JSON"),
    (["--layerwise", "--avg-bits", "4", "--candidates", "8g0,4a", "--target", "trt"], "needs symmetric"),
    (["--layerwise", "--avg-bits", "4", "--candidates", "8,3", "--target", "ort"], "2/4/8-bit"),
    (["--bits", "4", "--group-size", "0", "--target", "ort"], "power-of-two group"),
    (["--bits", "4", "--target", "tflite"], "use one of torch, ort, trt, gguf"),
])
def test_quantize_bad_input_exits_2_and_writes_nothing(tmp_path, monkeypatch, args, needle):
    monkeypatch.setattr("compress.models.load_model", lambda *a, **k: _tiny_loaded())
    monkeypatch.setattr("compress.inputs.check_model", lambda *a, **k: None)  # "tiny" stands for _tiny_loaded()
    plans = {"PLAN_MISSING_MODULE": {"rules": {"model.layers.99.mlp.up_proj": {"bits": 4}}},
             "PLAN_BAD_SCHEMA": {"layers": [4, 4]}, "PLAN_NOT_JSON": None}
    for i, a in enumerate(args):
        if a in plans:
            path = tmp_path / f"{a}.json"
            path.write_text("{not json" if plans[a] is None else json.dumps(plans[a]))
            args = [*args[:i], str(path), *args[i + 1:]]
    result = CliRunner().invoke(app, ["quantize", "tiny", *args, "--data", str(_text(tmp_path)),
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert needle in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def _tiny_loaded():
    return build("llama")


def _text(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("hello world " * 200)
    return p


def test_gptq_with_white_inputs_is_weighted_round_to_nearest_and_beats_it_on_correlated_inputs():
    from compress.quantize.gptq import gptq_quantize

    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 64, generator=g)
    spec = QuantSpec(3, 32, True)
    white = gptq_quantize(w, torch.eye(64), spec)  # uncorrelated inputs: no error to spread, equal importance
    rtn = quantize_rtn(w, spec, torch.ones(64))
    assert torch.equal(white.codes, rtn.codes) and torch.equal(white.scales, rtn.scales)
    mix = torch.randn(64, 64, generator=g)
    x = torch.randn(2048, 64, generator=g) @ mix  # strongly correlated input features
    h = 2 * x.T @ x / len(x)
    gq = gptq_quantize(w, h, spec)
    out_err = lambda q: float(((x @ (q.dequantize() - w).T) ** 2).mean())  # noqa: E731
    assert out_err(gq) < 0.7 * out_err(quantize_rtn(w, spec))


def test_gptq_takes_the_most_active_groups_first_and_beats_weighted_rtn_asymmetric_too():
    from compress.quantize.gptq import gptq_quantize, group_order

    diag = torch.tensor([1.0, 1, 5, 5, 0, 0, 2, 2])  # groups of 2: sums 2, 10, 0, 4
    assert group_order(diag, 2).tolist() == [2, 3, 6, 7, 0, 1, 4, 5]
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 96, generator=g)
    x = (torch.randn(1024, 96, generator=g) @ torch.randn(96, 96, generator=g)) * torch.linspace(0.1, 3, 96)
    h = 2 * x.T @ x / len(x)
    gq = gptq_quantize(w, h, QuantSpec(4, 32, False, "gptq"))
    rtn = quantize_rtn(w, QuantSpec(4, 32, False), torch.diag(h))
    out_err = lambda q: float(((x @ (q.dequantize() - w).T) ** 2).mean())  # noqa: E731
    assert gq.zeros is not None and out_err(gq) < 0.7 * out_err(rtn)


def test_hqq_zero_point_reduces_the_error_of_min_max_rounding():
    from compress.quantize.hqq import hqq_quantize

    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    w[0, 0] = 8.0  # an outlier stretches one group's range
    spec = QuantSpec(3, 32, False, "hqq")
    h = hqq_quantize(w, spec)
    assert h.zeros.dtype == torch.float16
    assert float((h.dequantize() - w).abs().mean()) < float((quantize_rtn(w, QuantSpec(3, 32, False)).dequantize()
                                                             - w).abs().mean())
    packed = PackedWeight.from_quantized(h)
    assert torch.equal(packed.dequantize(), h.dequantize())
    assert packed.stored_weight_bytes() == spec.stored_bytes(64, 128)
    with pytest.raises(UserError, match="asymmetric"):
        hqq_quantize(w, QuantSpec(3, 32, True, "hqq"))


def test_gptq_pass_quantizes_every_block_in_sequence():
    from compress.data import Windows
    from compress.quantize.modules import QuantLinear
    from compress.quantize.pipeline import quantize

    loaded = build("llama")
    lmap = layer_map(loaded.module)
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    w = Windows(ids, torch.ones_like(ids), "calibration", "test", 0)
    linears = [p for b in lmap.blocks for p in b.linears]
    with torch.inference_mode():
        before = loaded.module(ids).logits
    specs, record = quantize(loaded, lmap, Plan.uniform(QuantSpec(4, 32, True, "gptq"), linears), w)
    assert all(isinstance(loaded.module.get_submodule(p), QuantLinear) for p in linears)
    assert set(record.specs.values()) == {"q4g32s-gptq"}
    with torch.inference_mode():
        after = loaded.module(ids).logits
    assert 0 < float((after - before).abs().mean()) < 0.1 * float(before.abs().mean())


def test_gptq_quantizes_a_tied_head_from_the_final_hidden_states():
    from compress.data import Windows
    from compress.quantize.pipeline import quantize

    loaded = build("llama")
    model = loaded.module
    model.config.tie_word_embeddings = True
    model.tie_weights()
    lmap = layer_map(model)
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    w = Windows(ids, torch.ones_like(ids), "calibration", "test", 0)
    emb = model.model.embed_tokens.weight.detach().clone()
    specs, record = quantize(loaded, lmap, Plan({"_default": {"bits": 4, "method": "gptq"}}), w)
    assert isinstance(model.lm_head, TiedQuantHead)
    codes = model.model.embed_tokens.packed.dequantize()
    assert not torch.equal(codes, quantize_rtn(emb, QuantSpec(4, 32, True)).dequantize())  # GPTQ moved codes
    assert float((codes - emb).abs().mean()) < 0.2 * float(emb.abs().mean())


def test_fast_measure_keeps_the_anchor_column_and_scales_the_rest_by_error_energy():
    from compress.data import load_windows
    from compress.importance.context import ScoringContext
    from compress.quantize.distortion import measure_kl
    from compress.quantize.pipeline import units_for

    loaded = _tiny_loaded()
    lmap = layer_map(loaded.module)
    windows = load_windows("self", loaded, split="calibration", tokens=64, seq_len=16)
    units = units_for(loaded.module, lmap, "block", embeddings=True)
    cands = [QuantSpec(8, 32), QuantSpec(4, 32), QuantSpec(2, 32)]
    full = measure_kl(ScoringContext(loaded, lmap, windows), units, cands)
    fast = measure_kl(ScoringContext(loaded, lmap, windows), units, cands, anchor=1)
    for f, g in zip(full.distortion, fast.distortion, strict=True):
        assert g[1] == pytest.approx(f[1], rel=1e-6)
        assert g[0] < g[1] < g[2]  # more bits, less error energy
    assert "scaled" in fast.measure and fast.sizes == full.sizes


def test_every_method_in_the_help_has_a_handler_and_no_other():
    from compress.quantize.choices import METHOD
    from compress.quantize.pipeline import METHOD_HANDLERS
    from compress.quantize.spec import METHODS

    assert list(METHOD_HANDLERS) == list(METHOD) == list(METHODS)


@pytest.mark.parametrize("spec", [QuantSpec(4), QuantSpec(3), QuantSpec(4, 32, False), QuantSpec(8, 0),
                                  QuantSpec.k(4), QuantSpec.k(6)], ids=lambda s: s.label())
def test_row_slices_and_chunked_lookups_equal_the_whole_table(spec):
    """A vocabulary-sized table is dequantized 8,192 rows at a time (streamed heads, embedding lookups): the slices
    and the lookups are exactly the whole table's."""
    from compress.quantize.modules import TABLE_ROWS, PackedWeight, QuantEmbedding

    rows = TABLE_ROWS * 2 + 100
    w = torch.randn(rows, 256, generator=torch.Generator().manual_seed(0))
    p = PackedWeight.from_quantized(quantize_rtn(w, spec))
    full = p.dequantize()
    for s in range(0, rows, TABLE_ROWS):
        assert torch.equal(p.dequantize_rows(s, min(s + TABLE_ROWS, rows)), full[s:s + TABLE_ROWS])
    emb = QuantEmbedding(rows, 256, spec)
    emb.packed = p
    ids = torch.randint(0, rows, (2, 40), generator=torch.Generator().manual_seed(1))
    assert torch.equal(emb(ids), torch.nn.functional.embedding(ids, full))
