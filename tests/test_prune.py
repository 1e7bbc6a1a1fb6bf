"""Pruning on tiny models: greedy finds a known answer, pruned models reload exactly, bad input exits 2."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import ToyLM, build, rotation
from typer.testing import CliRunner

from cli import app
from compress.data import Windows
from compress.importance.context import ScoringContext
from compress.models import layer_map, load_model
from compress.models.hf import LoadedModel
from compress.prune.blocks import remove_blocks, select_blocks
from compress.prune.sublayers import remove_sublayers
from flows.prune import resolve_amount

runner = CliRunner()


def _windows(vocab: int, n: int = 4, length: int = 12) -> Windows:
    ids = torch.randint(1, vocab, (n, length), generator=torch.Generator().manual_seed(1))
    return Windows(ids, torch.ones_like(ids), "calibration", "random", 0)


def _kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    from compress.metrics import kl_per_token, log_softmax_chunked

    return float(kl_per_token(log_softmax_chunked(ref_logits), logits).mean())


def _build(family: str) -> LoadedModel:
    """tiny_models.build, but Gemma 3 gets mixed sliding/full layers and a window shorter than the test windows."""
    if family != "gemma3_text":
        return build(family)
    from tiny_models import COMMON
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(**COMMON, head_dim=8, sliding_window=4, final_logit_softcapping=5.0,
                           layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    cfg._attn_implementation = "eager"
    return LoadedModel(AutoModelForCausalLM.from_config(cfg).eval(), None, "decoder", "gemma3_text", "tiny-gemma3")


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """Tiny llama and gemma3 (sliding/full layer_types) decoders saved as HF dirs (3 blocks each)."""
    out = {}
    for fam in ("llama", "gemma3_text"):
        path = tmp_path_factory.mktemp(fam)
        _build(fam).module.save_pretrained(path)
        out[fam] = path
    return out


def _logits(module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        out = module(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    return out.logits if hasattr(out, "logits") else out


def test_greedy_finds_the_cancelling_pair_that_one_shot_misses():
    # Rotations in one plane add up: removing blocks removes the sum of their angles. One-shot ablation takes the
    # two smallest angles (0.2 + 0.25 = 0.45 removed); greedy takes 0.2, then re-measures and takes −0.5, which
    # cancels it (net −0.3 removed).
    toy = LoadedModel(ToyLM([rotation(a, 8) for a in (0.2, 0.25, -0.5, 1.2)]), None, "decoder", "toy", "toy")
    lmap = layer_map(toy.module)
    ctx = ScoringContext(toy, lmap, _windows(16))
    one_shot = select_blocks(ctx, 2, "ablation")
    greedy = select_blocks(ctx, 2, "greedy")
    assert sorted(one_shot.removed) == [0, 1]
    assert greedy.removed == [0, 2]
    assert greedy.divergence[-1] < one_shot.divergence[-1]
    ref = _logits(toy.module, ctx.windows.input_ids)
    remove_blocks(toy.module, lmap, greedy.removed)
    assert len(toy.module.layers) == 2
    assert _kl(ref, _logits(toy.module, ctx.windows.input_ids)) == pytest.approx(greedy.divergence[-1], rel=1e-4)


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2"])
def test_block_pruned_model_reloads_with_plain_transformers(family, tmp_path):
    from transformers import AutoModelForCausalLM

    loaded = _build(family)
    lmap = layer_map(loaded.module)
    ctx = ScoringContext(loaded, lmap, _windows(64))
    sel = select_blocks(ctx, 1, "greedy")
    ids = ctx.windows.input_ids
    ref = _logits(loaded.module, ids)
    types = list(getattr(loaded.module.config, "layer_types", None) or [])
    remove_blocks(loaded.module, lmap, sel.removed)
    pruned = _logits(loaded.module, ids)
    assert _kl(ref, pruned) == pytest.approx(sel.divergence[-1], rel=1e-4)  # replayed choice = real model
    loaded.module.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert again.config.num_hidden_layers == 2
    if family == "gemma3_text":
        assert again.config.layer_types == [t for i, t in enumerate(types) if i != sel.removed[0]]
    torch.testing.assert_close(_logits(again, ids), pruned, rtol=0, atol=1e-5)


def test_prune_blocks_cli_writes_a_plain_model(tiny_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "pruned"
    r = runner.invoke(app, ["prune", str(tiny_dirs["gemma3_text"]), "--blocks", "34%", "--method", "ablation",
                            "--tokens", "64", "--eval-tokens", "32", "--seq-len", "16", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["count"] == 1 and len(result["removed"]) == 1 and result["params_after"] < result["params_before"]
    assert result["metrics"]["kl_mean"] > 0 and not (out / "compress.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    original = load_model(str(tiny_dirs["gemma3_text"]))
    remove_blocks(original.module, layer_map(original.module), result["removed"])
    ids = _windows(64).input_ids
    torch.testing.assert_close(_logits(model, ids), _logits(original.module, ids), rtol=0, atol=1e-5)


def test_eval_data_scores_the_choice_on_other_text_beside_its_selection_kl(tmp_path):
    """--data two sources, --eval-data a third: the held-out windows come from the third text only, and the
    result puts the selection KL (calibration) beside the held-out KL."""
    import random

    from tiny_models import hf_dir

    rng = random.Random(0)
    texts = {name: " ".join(rng.choice(words) for _ in range(3000)) for name, words in
             (("a", ["the", "sense", "and", "manor", "ball"]), ("b", ["thou", "shalt", "lord", "unto", "spake"]),
              ("c", ["ship", "whale", "sea", "harpoon", "deck"]))}
    for name, text in texts.items():
        (tmp_path / f"{name}.txt").write_text(text)
    model = hf_dir(tmp_path / "m", " ".join(texts.values()), dtype=torch.float32)
    r = runner.invoke(app, ["prune", str(model), "--blocks", "1", "--method", "ablation",
                            "--data", f"{tmp_path / 'a.txt'},{tmp_path / 'b.txt'}", "--eval-data",
                            str(tmp_path / "c.txt"), "--tokens", "128", "--eval-tokens", "64", "--seq-len", "16",
                            "--json"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["evaluation"]["source"] == str(tmp_path / "c.txt")
    gen = result["generalization"]
    assert gen["divergence"] == "kl" and gen["selection"] == result["selection"]["divergence"][-1]
    assert gen["heldout"] == result["metrics"]["kl_mean"]
    assert gen["heldout_over_selection"] == round(gen["heldout"] / gen["selection"], 4)
    bad = runner.invoke(app, ["prune", str(model), "--blocks", "1", "--eval-data", str(tmp_path / "nope.txt")])
    assert bad.exit_code == 2 and "--eval-data" in bad.stderr


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_finercut_artifact_reloads_to_identical_outputs(family, tiny_dirs, tmp_path):
    out, png = tmp_path / "fc", tmp_path / "fc.png"
    r = runner.invoke(app, ["prune", str(tiny_dirs[family]), "--sublayers", "3", "--tokens", "64",
                            "--eval-tokens", "32", "--seq-len", "16", "--out", str(out), "--plot", str(png), "--json"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    units = [(d["block"], d["sublayer"]) for d in result["removed"]]
    assert len(units) == 3 and png.stat().st_size > 0
    assert result["params_before"] - result["params_after"] == sum(d["params"] for d in result["removed"])
    original = load_model(str(tiny_dirs[family]))
    remove_sublayers(original.module, layer_map(original.module), units, "decoder")
    again = load_model(str(out))
    ids = _windows(64).input_ids
    torch.testing.assert_close(_logits(again.module, ids), _logits(original.module, ids), rtol=0, atol=0)
    assert runner.invoke(app, ["load", str(out), "--json"]).exit_code == 0
    from transformers import AutoModelForCausalLM

    with pytest.raises((OSError, ValueError), match="compress-pruned-v1"):  # refused, never silently re-initialised
        AutoModelForCausalLM.from_pretrained(out)


def test_removed_attention_keeps_generation_with_cache_exact():
    loaded = build("llama")
    remove_sublayers(loaded.module, layer_map(loaded.module), [(0, "attn"), (1, "mlp")], "decoder")
    ids = torch.tensor([[0, 0, 5, 9, 12, 7], [3, 4, 5, 6, 7, 8]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])  # left padding: masks read the cache length from layer 0
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert loaded.module.generate(ids, use_cache=True, **kw).tolist() == \
        loaded.module.generate(ids, use_cache=False, **kw).tolist()


def test_finercut_artifact_exports_to_onnx_without_the_removed_ops(tmp_path):
    """Attention of block 1 and FFN of block 2 removed: the graph loses their MatMuls, keeps one KV shape per layer
    (the removed attention appends zero keys) and validates against the pruned model through two decode steps."""
    import onnx

    from compress.prune.artifact import save_pruned
    from flows.export import ExportRequest, run_export

    full, loaded = build("llama"), build("llama")
    removed = remove_sublayers(loaded.module, layer_map(loaded.module), [(1, "attn"), (2, "mlp")], "decoder")
    save_pruned(loaded, removed, tmp_path / "fc", {"prune": {}})
    r = run_export(ExportRequest(model=str(tmp_path / "fc"), out=tmp_path / "onnx"))
    assert r["passed"]
    names = [c["name"] for v in r["validation"].values() for c in v["checks"]]
    assert "decode2/logits" in names
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx")).graph
    matmuls = sum(n.op_type == "MatMul" for n in graph.node)
    ref = run_export(ExportRequest(model=_save(full, tmp_path / "full"), out=tmp_path / "onnx-full"))
    full_matmuls = sum(n.op_type == "MatMul" for n in onnx.load(str(tmp_path / "onnx-full" / "model.onnx")).graph.node)
    assert ref["passed"] and full_matmuls - matmuls == 4 + 2 + 3  # q/k/v/o, the two attention products, FFN
    shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input if "past" in i.name}
    assert shapes["past_key_values.1.key"] == shapes["past_key_values.0.key"]


def _save(loaded: LoadedModel, path) -> str:
    loaded.module.save_pretrained(path)
    return str(path)


def test_amounts_round_half_up():
    assert resolve_amount("25%", "--blocks", 30, "blocks") == 8
    assert resolve_amount("7", "--blocks", 30, "blocks") == 7
    assert resolve_amount("12.5%", "--sublayers", 60, "sublayers") == 8


@pytest.mark.parametrize("args, needle", [
    (["--blocks", "3"], "at least one must stay"),
    (["--blocks", "5"], "would remove 5"),
    (["--blocks", "100%"], "inside (0, 100)"),
    (["--blocks", "0%"], "inside (0, 100)"),
    (["--blocks", "150%"], "inside (0, 100)"),
    (["--blocks", "-1"], "write a count"),
    (["--blocks", "1%"], "rounds to 0"),
    (["--sublayers", "6"], "at least one must stay"),
    (["--blocks", "1", "--method", "magic"], "--method magic: use bi, ablation, greedy"),
    (["--sublayers", "1", "--method", "bi"], "applies to --blocks"),
    (["--blocks", "1", "--sublayers", "1"], "choose one"),
    ([], "choose one"),
    (["--width", "25"], "give a percentage"),
    (["--width", "100%"], "inside (0, 100)"),
    (["--width", "25%", "--importance", "magic"], "--importance magic: use activation or taylor"),
    (["--blocks", "1", "--adaptive"], "--adaptive applies to --width"),
    (["--width", "25%", "--method", "bi"], "applies to --blocks"),
    (["--width", "25%", "--blocks", "1"], "choose one"),
    (["--blocks", "1", "--heal", "-3"], "--heal -3"),
    (["--sparsity", "50"], "give a percentage"),
    (["--sparsity", "30%", "--pattern", "3:3"], "--pattern"),
    (["--sparsity", "50%", "--pattern", "2:4", "--adaptive"], "N:M sparsity has one fixed ratio"),
    (["--sparsity", "50%", "--granularity", "head"], "--granularity head"),
])
def test_bad_input_exits_2_and_writes_nothing(args, needle, tiny_dirs, tmp_path):
    out = tmp_path / "out"
    r = runner.invoke(app, ["prune", str(tiny_dirs["llama"]), *args, "--tokens", "32", "--seq-len", "16",
                            "--out", str(out)])
    assert r.exit_code == 2, r.output
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert list(tmp_path.iterdir()) == []


def test_width_uniform_is_a_plain_model_and_adaptive_reloads(tiny_dirs, tmp_path):
    """--width 50%: a smaller dense model transformers loads by itself; --adaptive: per-block shapes at no more
    parameters than uniform, reloaded by `compress load` to the outputs it was evaluated with."""
    from transformers import AutoModelForCausalLM

    src = str(tiny_dirs["llama"])
    common = ["--tokens", "64", "--eval-tokens", "32", "--seq-len", "16", "--json"]
    r = runner.invoke(app, ["prune", src, "--width", "50%", "--out", str(tmp_path / "u"), "--plot",
                            str(tmp_path / "u.png"), *common])
    assert r.exit_code == 0, r.output
    uniform = json.loads(r.stdout)
    assert uniform["params_after"] < uniform["params_before"] and (tmp_path / "u.png").stat().st_size > 0
    assert uniform["width"]["uniform"] and uniform["width"]["config_updated"]
    ids = _windows(64).input_ids
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "u").eval()
    ours = load_model(str(tmp_path / "u"))
    torch.testing.assert_close(_logits(plain, ids), _logits(ours.module, ids), rtol=0, atol=0)
    r = runner.invoke(app, ["prune", src, "--width", "50%", "--adaptive", "--out", str(tmp_path / "a"), *common])
    assert r.exit_code == 0, r.output
    adaptive = json.loads(r.stdout)
    assert adaptive["params_after"] <= uniform["params_after"]
    assert adaptive["selection"]["divergence"][-1] is not None
    back = load_model(str(tmp_path / "a"))
    assert sum(p.numel() for p in back.module.parameters()) == adaptive["params_after"]
    assert torch.isfinite(_logits(back.module, ids)).all()
    assert runner.invoke(app, ["load", str(tmp_path / "a"), "--json"]).exit_code == 0


def test_heal_lowers_the_calibration_kl_and_reports_before_and_after(tiny_dirs, tmp_path):
    r = runner.invoke(app, ["prune", str(tiny_dirs["llama"]), "--blocks", "1", "--method", "bi", "--heal", "12",
                            "--heal-lr", "5e-4", "--tokens", "64", "--eval-tokens", "64", "--seq-len", "16", "--json"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    h = result["heal"]
    assert h["steps"] == 12 and len(h["losses"]) == 12 and h["loss_last_pass"] < h["loss_first_pass"]
    assert h["metrics_before"]["kl_mean"] > 0 and result["metrics"]["kl_mean"] > 0
    assert any("healed 12 steps" in n for n in result["notes"])


def test_sparsity_uniform_and_adaptive_save_plain_models_with_their_zeros(tiny_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    src = str(tiny_dirs["llama"])
    common = ["--tokens", "64", "--eval-tokens", "32", "--seq-len", "16", "--json"]
    for extra, name in ((["--pattern", "2:4"], "nm"), (["--adaptive", "--granularity", "linear"], "ad")):
        r = runner.invoke(app, ["prune", src, "--sparsity", "50%", *extra, "--out", str(tmp_path / name),
                                "--plot", str(tmp_path / f"{name}.png"), *common])
        assert r.exit_code == 0, r.output
        result = json.loads(r.stdout)
        assert result["sparsity"]["sparsity"] >= 0.5 - 1e-9 if name == "ad" else result["sparsity"]["sparsity"] > 0.49
        back = AutoModelForCausalLM.from_pretrained(tmp_path / name)
        zeros = sum(int((back.get_submodule(p).weight == 0).sum()) for p in result["sparsity"]["linears"])
        assert zeros == result["sparsity"]["zeros"]
        assert result["selection"]["divergence"][-1] > 0 and result["metrics"]["kl_mean"] > 0
        assert (tmp_path / f"{name}.png").stat().st_size > 0
