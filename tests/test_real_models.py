"""Real weights, real text: SmolLM2-135M and all-MiniLM-L6-v2 from the offline zoo (pulled on first use)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from cli import app
from compress.data import load_windows
from compress.evaluate import evaluate
from compress.importance import score_model
from compress.models import layer_map, load_model
from compress.models.zoo import model_dir

pytestmark = pytest.mark.slow
ANCHOR_Q4_0_KL = 0.318  # ANCHORS.md: llama.cpp Q4_0 and ORT MatMulNBits int4 block 32 on SmolLM2


def q4_0_round_trip(w: torch.Tensor, group: int = 32) -> torch.Tensor:
    """llama.cpp Q4_0: per group of 32 inputs, d = (signed max-magnitude weight) / -8 stored in fp16, q in [-8, 7]."""
    g = w.reshape(-1, group)
    idx = g.abs().argmax(dim=1, keepdim=True)
    d = g.gather(1, idx) / -8.0
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    q = torch.clamp(torch.floor(g * inv + 8.5), max=15) - 8
    return (q * d.half().float()).reshape(w.shape)


def test_smollm2_layer_map(smollm2):
    lmap = layer_map(smollm2.module)
    assert (lmap.family, lmap.num_blocks, lmap.num_sublayers) == ("llama", 30, 60)
    assert lmap.total_params == 134_515_008  # tied embedding counted once
    assert lmap.head == "lm_head" and lmap.embeddings == "model.embed_tokens" and lmap.final_norm == "model.norm"
    assert all(len(b.linears) == 7 for b in lmap.blocks)


def test_smollm2_scores_every_block_and_sublayer(smollm2, austen):
    w = load_windows(str(austen), smollm2, tokens=256, seq_len=256)
    report = score_model(smollm2, w, ["lim", "zd", "ablation"])
    assert report.num_blocks == 30 and len(report.sublayers) == 60 and report.divergence == "kl"
    abl, lim = report.block_scores("ablation"), report.block_scores("lim")
    assert all(v is not None and v > 0 for v in abl + lim)
    assert all(s["scores"]["ablation"] > 0 for s in report.sublayers)
    # Removing the first block destroys the model (attention sink / embedding mixing); a middle block barely matters.
    assert abl[0] > 10 * sorted(abl)[15] and lim[0] > 0.5


def test_eval_self_is_exact_and_q4_0_reproduces_the_anchor(smollm2, austen, tmp_path):
    persuasion = str(austen / "persuasion.txt")
    result = CliRunner().invoke(app, ["eval", "smollm2-135m", "--reference", "smollm2-135m", "--data", persuasion,
                                      "--protocol", "anchors", "--json"])
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    for key in ("ppl", "ppl_ref", "kl_mean", "kl_median", "kl_p99", "top1_agreement", "emb_cosine", "size_bytes",
                "bpw", "provenance"):
        assert key in d
    assert d["kl_mean"] < 1e-6 and d["top1_agreement"] == 1.0 and d["emb_cosine"] is None
    assert d["tokens"] == 3072 and d["ppl"] == pytest.approx(d["ppl_ref"])
    assert d["bpw"] == pytest.approx(32.0) and d["provenance"]["reference_sha256"] == d["provenance"]["model_sha256"]

    cand = load_model("smollm2-135m")
    lmap = layer_map(cand.module)
    with torch.no_grad():
        for blk in lmap.blocks:
            for path in blk.linears:
                lin = cand.module.get_submodule(path)
                lin.weight.copy_(q4_0_round_trip(lin.weight))
    windows = load_windows(persuasion, smollm2, split="all", tokens=3072, seq_len=512, sequential=True)
    report = evaluate(cand, smollm2, windows)
    assert report.kl_mean == pytest.approx(ANCHOR_Q4_0_KL, rel=0.20), report
    assert 0.55 < report.top1_agreement < 0.75 and report.ppl > report.ppl_ref
    assert report.provenance["windows_sha256"] == d["provenance"]["windows_sha256"]


def test_self_data_is_sampled_from_the_model_and_seeded(smollm2):
    a = load_windows("self", smollm2, tokens=64, seq_len=32, seed=5)
    b = load_windows("self", smollm2, tokens=64, seq_len=32, seed=5)
    ev = load_windows("self", smollm2, split="evaluation", tokens=64, seq_len=32, seed=5)
    assert a.input_ids.shape == (2, 32) and torch.equal(a.input_ids, b.input_ids)
    assert not torch.equal(a.input_ids, ev.input_ids)
    assert (a.input_ids[:, 0] == smollm2.tokenizer.bos_token_id).all()


def test_gguf_spec_loads_the_same_model_as_the_converted_cache(smollm2):
    gguf = next((model_dir("smollm2-135m") / "source").glob("*.gguf"))
    direct = load_model(str(gguf))
    ids = smollm2.tokenizer("The capital of France is", return_tensors="pt").input_ids
    assert ids[0, 0] == smollm2.tokenizer.bos_token_id  # transformers 4.57.6's GGUF tokenizer prepends BOS
    with torch.inference_mode():
        a = direct.module(ids).logits
        b = smollm2.module(ids).logits
    torch.testing.assert_close(a, b)
    assert smollm2.tokenizer.decode(int(b[0, -1].argmax())).strip() == "Paris"


def test_minilm_scores_with_encoder_divergence(minilm, austen):
    w = load_windows(str(austen), minilm, tokens=1024, seq_len=128)
    report = score_model(minilm, w, ["lim", "zd", "ablation"])
    assert report.num_blocks == 6 and len(report.sublayers) == 12
    assert report.divergence == "1-cos(mean-pooled embedding)"
    assert all(0 < v < 2 for v in report.block_scores("ablation"))
    ev = evaluate(minilm, minilm, load_windows(str(austen), minilm, split="evaluation", tokens=512, seq_len=128))
    assert ev.emb_cosine == pytest.approx(1.0, abs=1e-6) and ev.kl_mean is None and ev.bpw == pytest.approx(32.0)


def test_minilm_self_data_is_refused():
    result = CliRunner().invoke(app, ["score", "minilm-l6", "--data", "self"])
    assert result.exit_code == 2 and "cannot generate" in result.stderr


def test_uniform_rtn_matches_the_anchor_and_the_artifact_reloads_exactly(smollm2, austen, tmp_path):
    """Our q4g32 symmetric RTN of the blocks (embedding float) is the Q4_0 scheme: KL within ±20% of 0.318."""
    from compress.artifact import save_artifact
    from compress.plan import Plan
    from compress.quantize.pipeline import quantize
    from compress.quantize.spec import QuantSpec

    persuasion = str(austen / "persuasion.txt")
    windows = load_windows(persuasion, smollm2, split="all", tokens=3072, seq_len=512, sequential=True)
    cand = load_model("smollm2-135m")
    lmap = layer_map(cand.module)
    linears = [p for b in lmap.blocks for p in b.linears]
    specs, _ = quantize(cand, lmap, Plan.uniform(QuantSpec(4, 32, True), linears))
    ids = windows.input_ids[:1, :128]
    with torch.inference_mode():
        in_memory = cand.module(ids).logits
    save_artifact(cand, specs, tmp_path / "q4", {"plan": {}})
    back = load_model(str(tmp_path / "q4"))
    with torch.inference_mode():
        assert torch.equal(back.module(ids).logits, in_memory)
    report = evaluate(back, smollm2, windows)
    assert report.kl_mean == pytest.approx(ANCHOR_Q4_0_KL, rel=0.20), report
    _gate_real_reports(report, evaluate(smollm2, smollm2, windows), tmp_path)
    on_disk = (tmp_path / "q4" / "model.safetensors").stat().st_size
    assert abs(on_disk - report.size_bytes) / report.size_bytes < 0.03
    linear_params = sum(smollm2.module.get_submodule(p).weight.numel() for p in linears)
    embed_params = smollm2.module.get_submodule(lmap.embeddings).weight.numel()
    assert report.bpw == pytest.approx((4.5 * linear_params + 32 * embed_params) / (linear_params + embed_params),
                                       abs=1e-3)


def _gate_real_reports(q4, self_report, tmp_path):
    """The gate on real SmolLM2 reports: the q4 candidate passes a loose KL limit, fails a tight one (exit 1)."""
    (tmp_path / "base.json").write_text(json.dumps(self_report.to_dict()))
    (tmp_path / "cand.json").write_text(json.dumps(q4.to_dict()))
    args = ["gate", "--baseline", str(tmp_path / "base.json"), "--candidate", str(tmp_path / "cand.json"),
            "--min-top1", "0.6", "--max-ppl-increase", "30%"]
    assert CliRunner().invoke(app, [*args, "--max-kl", "0.4"]).exit_code == 0
    failed = CliRunner().invoke(app, [*args, "--max-kl", "0.1", "--junit", str(tmp_path / "j.xml")])
    assert failed.exit_code == 1 and "gate failed: max_kl" in failed.stderr


def test_block_pruned_smollm2_loads_with_plain_transformers(austen, tmp_path):
    """`compress prune --blocks` on the real model: the output is a plain transformers directory with 28 layers."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "pruned"
    r = CliRunner().invoke(app, ["prune", "smollm2-135m", "--blocks", "2", "--method", "bi", "--data",
                                 str(austen / "emma.txt"), "--tokens", "256", "--eval-tokens", "256", "--seq-len",
                                 "128", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert plain.config.num_hidden_layers == 28 and len(plain.model.layers) == 28
    ours = load_model(str(out))
    ids = torch.tensor([[1, 504, 3458, 282, 253, 2736, 30, 378, 314, 253, 4021]])
    with torch.inference_mode():
        torch.testing.assert_close(plain(ids).logits, ours.module(ids).logits, rtol=0, atol=0)
    assert sum(p.numel() for p in plain.parameters()) == result["params_after"]


def test_a_gguf_converts_tensor_by_tensor_to_the_same_weights(smollm2, tmp_path):
    """--stream on a .gguf reads it through convert_gguf: block by block, every tensor equal to transformers' own
    whole-file load (the zoo's cached conversion)."""
    from compress.stream.checkpoint import Checkpoint
    from compress.stream.gguf_shards import convert_gguf

    source = model_dir("smollm2-135m")
    convert_gguf(next((source / "source").glob("*.gguf")), tmp_path)
    ours, theirs = Checkpoint(tmp_path), Checkpoint(source)
    assert sorted(ours.shapes) == sorted(theirs.shapes)
    for name in theirs.shapes:
        assert torch.equal(ours.read([name])[name], theirs.read([name])[name]), name
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "config.json").is_file()
