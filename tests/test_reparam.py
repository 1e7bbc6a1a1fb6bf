"""Structural reparameterization: BN folding, RepVGG branch merging, norm folding, the equivalence check, saving."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import COMMON, build
from torch import nn

from compress.errors import UserError
from compress.models.hf import LoadedModel
from compress.reparam import bn_fold, merge_linear, norm_fold, repvgg
from compress.reparam.check import compare, equivalence, outputs
from flows.reparam import run_reparam


def _randomize_bn(model: nn.Module, seed: int = 0, var_low: float = 0.5) -> nn.Module:
    """Non-trivial running statistics and affine parameters on every BatchNorm."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + var_low)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=g) * 0.3)
    return model.eval()


def _count(model: nn.Module, cls) -> int:
    return sum(isinstance(m, cls) for m in model.modules())


def _x(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


class Untraceable(nn.Module):
    """Data-dependent control flow at the top: fx cannot trace it, its children can be traced one by one."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.conv = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        x = self.stem(x)
        if x.sum() > 0:  # data-dependent: torch.fx fails here
            x = x * 1.0
        return self.bn(self.conv(x))


# ----- fold-bn -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("groups,dims", [(1, 2), (4, 2), (1, 1)])
def test_conv_bn_fold_exact(groups, dims):
    torch.manual_seed(0)
    conv, bn = (nn.Conv2d, nn.BatchNorm2d) if dims == 2 else (nn.Conv1d, nn.BatchNorm1d)
    model = _randomize_bn(nn.Sequential(conv(4, 8, 3, padding=1), bn(8), nn.ReLU(),
                                        conv(8, 8, 3, stride=2, padding=1, groups=groups, bias=False), bn(8),
                                        conv(8, 4, 1), bn(4, affine=False)))
    x = _x(2, 4, *([12] * dims))
    ref = outputs(model, x)
    rec = bn_fold.apply(model, x)
    assert rec.count == 3 and rec.passed and rec.equivalence["checked"]
    assert _count(model, nn.modules.batchnorm._BatchNorm) == 0
    assert compare(ref, outputs(model, x))["rel_diff"] < 1e-5
    assert rec.to_dict()["changes"] == ["1 -> 0", "4 -> 3", "6 -> 5"]


def test_fold_through_fx_fallback():
    """The root does not trace: its children are traced one by one (stem folds); the conv/bn pair called directly
    from the untraceable forward is left alone and the note says why."""
    model = _randomize_bn(Untraceable())
    x = _x(2, 3, 10, 10)
    rec = bn_fold.apply(model, x)
    assert rec.changes == ["stem.1 -> stem.0"] and rec.passed
    notes = " ".join(rec.notes)
    assert "bn: called from code torch.fx could not trace" in notes and "Untraceable" in notes


def test_linear_bn1d_and_3d_refusal():
    model = _randomize_bn(nn.Sequential(nn.Linear(6, 10), nn.BatchNorm1d(10), nn.Tanh(), nn.Linear(10, 3)))
    rec = bn_fold.apply(model, _x(5, 6))
    assert rec.count == 1 and rec.passed and isinstance(model[1], nn.Identity)
    # (N, C, L) input: BN1d normalises dim 1, the Linear acts on the last dim -> must not fold
    model = _randomize_bn(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(3)))
    rec = bn_fold.apply(model, _x(2, 3, 4))
    assert rec.count == 0 and isinstance(model[1], nn.BatchNorm1d) and "dim 1" in " ".join(rec.notes)


def test_bn_before_conv_only_where_exact():
    x = _x(2, 4, 9, 9)
    model = _randomize_bn(nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, groups=2)))  # no padding: exact
    rec = bn_fold.apply(model, x)
    assert rec.count == 1 and rec.passed and rec.edits[0]["where"] == "before"
    model = _randomize_bn(nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect")))
    assert bn_fold.apply(model, x).count == 1  # reflect padding commutes with a per-channel affine map
    model = _randomize_bn(nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, padding=1)))  # zero padding
    rec = bn_fold.apply(model, x)
    assert rec.count == 0 and "zero-pads" in " ".join(rec.notes)
    model = _randomize_bn(nn.Sequential(nn.BatchNorm1d(5), nn.Linear(5, 3)))
    assert bn_fold.apply(model, _x(4, 5)).count == 1


def test_bn_in_train_mode_switched_to_eval_and_noted():
    model = _randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).train()
    rec = bn_fold.apply(model, _x(2, 3, 8, 8))
    assert not model.training and rec.count == 1 and rec.passed
    assert any("training mode" in n and "eval" in n for n in rec.notes)


def test_conv_output_with_two_users_is_not_folded():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    model = _randomize_bn(Two())
    rec = bn_fold.apply(model, _x(1, 3, 4, 4))
    assert rec.count == 0 and isinstance(model.bn, nn.BatchNorm2d)


def test_mobilenet_v2_all_52_fold():
    from compress.models.mobilenet_v2 import MobileNetV2

    torch.manual_seed(0)
    model = _randomize_bn(MobileNetV2(num_classes=10))
    assert _count(model, nn.BatchNorm2d) == 52
    x = _x(2, 3, 64, 64)
    rec = bn_fold.apply(model, x)
    assert rec.count == 52 and rec.passed, rec.equivalence
    assert _count(model, nn.BatchNorm2d) == 0


def test_sabotaged_fold_is_caught(monkeypatch):
    """A fold with the wrong eps changes the outputs: the equivalence check must say so."""
    real = bn_fold._bn_affine

    def wrong_eps(bn):
        eps, bn.eps = bn.eps, 1e-2
        try:
            return real(bn)
        finally:
            bn.eps = eps

    monkeypatch.setattr(bn_fold, "_bn_affine", wrong_eps)
    model = _randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1),
                                        nn.BatchNorm2d(4)), var_low=0.01)
    x = _x(2, 3, 8, 8)
    rec = bn_fold.apply(model, x)
    assert rec.count == 2 and rec.equivalence["pass"] is False and not rec.passed
    assert rec.equivalence["max_abs_diff"] > rec.equivalence["tolerance"]
    model = _randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)), var_low=0.01)
    with pytest.raises(UserError, match="outputs changed"):
        run_reparam(model, ["fold-bn"], sample_inputs=x)


def test_equivalence_function_on_two_models():
    a = nn.Linear(4, 3)
    b = nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    x = _x(2, 4)
    assert equivalence(a, b, x)["pass"]
    with torch.no_grad():
        b.bias.add_(1e-2)
    eq = equivalence(a, b, x)
    assert not eq["pass"] and eq["cosine"] < 1


def test_nothing_to_fold_is_zero_changes():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    rec = bn_fold.apply(model)
    assert rec.count == 0 and rec.passed and rec.equivalence["checked"] is False
    result = run_reparam(model, ["fold-bn", "merge-branches", "fold-norm"], sample_inputs=_x(2, 4))
    assert result["changes"] == 0 and result["equivalence"]["pass"]
    assert [r["count"] for r in result["records"]] == [0, 0, 0]


# ----- merge-branches ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("groups", [1, 2])
def test_tiny_repvgg_merges_into_plain_convs(groups):
    torch.manual_seed(0)
    model = _randomize_bn(repvgg.TinyRepVGG(groups=groups))
    x = _x(2, 3, 32, 32)
    assert _count(model, nn.Conv2d) == 10 and _count(model, nn.BatchNorm2d) == 12
    ref = outputs(model, x)
    rec = repvgg.apply(model, x)
    assert rec.count == 5 and rec.passed, rec.equivalence
    assert _count(model, nn.Conv2d) == 5 and _count(model, nn.BatchNorm2d) == 0
    assert all(hasattr(b, "rbr_reparam") and not hasattr(b, "rbr_dense") for b in model.stages)
    assert compare(ref, outputs(model, x))["rel_diff"] < 1e-5


def test_fold_bn_then_merge_branches():
    model = _randomize_bn(repvgg.TinyRepVGG())
    x = _x(2, 3, 32, 32)
    result = run_reparam(model, ["fold-bn", "merge-branches"], sample_inputs=x)
    fold, merge = result["records"]
    assert fold["count"] == 10 and merge["count"] == 5  # the 2 identity BNs fold in the merge
    assert result["modules_after"]["conv"] == 5 and result["modules_after"]["batchnorm"] == 0
    assert result["equivalence"]["pass"]


def test_block_without_reparam_forward_is_refused():
    class Fake(nn.Module):
        def __init__(self):
            super().__init__()
            self.rbr_dense = repvgg.conv_bn(4, 4, 3, 1, 1)
            self.rbr_1x1 = repvgg.conv_bn(4, 4, 1, 1, 0)

        def forward(self, x):
            return self.rbr_dense(x) + self.rbr_1x1(x)

    with pytest.raises(UserError, match="Fake.*rbr_reparam"):
        repvgg.apply(nn.Sequential(Fake()), _x(1, 4, 6, 6))


# ----- fold-norm ------------------------------------------------------------------------------------------------------

def _randomize_norms(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or ".ln_" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _tied_llama() -> nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(**COMMON, tie_word_embeddings=True)
    cfg._attn_implementation = "eager"
    return _randomize_norms(AutoModelForCausalLM.from_config(cfg).eval())


def test_rmsnorm_fold_tiny_llama_exact():
    model = _randomize_norms(build("llama").module)  # untied head: the final norm folds into lm_head
    rec = norm_fold.apply(model)
    assert rec.count == 3 * 2 + 1 and rec.passed, rec.equivalence
    assert all(float((m.weight.detach() - 1).abs().max()) == 0 for n, m in model.named_modules()
               if type(m).__name__ == "LlamaRMSNorm")
    assert "model.layers.0.input_layernorm -> model.layers.0.self_attn.q_proj, model.layers.0.self_attn.k_proj, " \
           "model.layers.0.self_attn.v_proj" in rec.changes


def test_final_norm_skipped_when_tied_unless_untie():
    model = _tied_llama()
    rec = norm_fold.apply(model)
    assert rec.count == 6 and rec.passed
    assert any("model.norm skipped" in n and "untie" in n for n in rec.notes)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model = _tied_llama()
    rec = norm_fold.apply(model, untie=True)
    assert rec.count == 7 and rec.passed
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings is False and any("untied" in n for n in rec.notes)


def test_gemma_offset_norm_and_gpt2_layernorm():
    model = _randomize_norms(build("gemma").module)
    rec = norm_fold.apply(model)
    assert rec.count == 6 and rec.passed and any("1 + weight" in n for n in rec.notes)
    assert float(model.model.layers[0].input_layernorm.weight.detach().abs().max()) == 0
    model = _randomize_norms(build("gpt2").module)
    rec = norm_fold.apply(model)
    assert rec.count == 6 and rec.passed


def test_post_norm_family_refused():
    with pytest.raises(UserError, match="bert is post-norm"):
        norm_fold.apply(build("bert").module)


def test_layernorm_fold_plain_module():
    class PreNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(8)
            self.a, self.b = nn.Linear(8, 4, bias=False), nn.Linear(8, 4)

        def forward(self, x):
            h = self.norm(x)
            return self.a(h) * self.b(h)

    model = _randomize_norms(PreNorm())
    rec = norm_fold.apply(model, _x(3, 5, 8))
    assert rec.count == 1 and rec.passed and model.a.bias is not None  # beta needed a bias on `a`


# ----- merge-linear, saving ---------------------------------------------------------------------------------------

def test_merge_linear():
    model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.1), nn.Linear(16, 4), nn.ReLU(),
                          nn.Linear(4, 1, bias=False), nn.Linear(1, 4))  # last pair is low-rank: would grow
    rec = merge_linear.apply(model, _x(3, 8))
    assert rec.count == 1 and rec.passed and isinstance(model[0], nn.Identity)
    assert rec.changes == ["0 + 2"]  # through the (eval-mode) Dropout
    assert "4 -> 5 (12 -> 20 params)" in " ".join(rec.notes)
    assert merge_linear.apply(model, _x(3, 8), allow_growth=True).changes == ["4 + 5"]


def test_save_and_load_cnn_and_decoder(tmp_path, monkeypatch):
    from compress.models import load_model
    model = _randomize_bn(repvgg.TinyRepVGG())
    x = _x(2, 3, 32, 32)
    ref = outputs(model, x)
    result = run_reparam(model, ["fold-bn", "merge-branches"], tmp_path / "rep", sample_inputs=x)
    assert result["out"] == str(tmp_path / "rep")
    loaded = load_model(str(tmp_path / "rep"))
    assert _count(loaded.module, nn.Conv2d) == 5 and _count(loaded.module, nn.BatchNorm2d) == 0
    assert compare(ref, outputs(loaded.module, x))["pass"]

    lm = LoadedModel(_tied_llama(), None, "decoder", "llama", "tiny-llama")
    ids = {"input_ids": torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))}
    ref = outputs(lm.module, ids)
    result = run_reparam(lm, ["fold-norm"], tmp_path / "llama", untie=True)
    assert result["records"][0]["count"] == 7
    again = load_model(str(tmp_path / "llama"))
    assert again.extra["manifest"]["format"] == "compress-reparam-v1"
    assert again.module.lm_head.weight is not again.module.model.embed_tokens.weight
    assert compare(ref, outputs(again.module, ids))["pass"]


def test_unknown_pass_is_a_user_error():
    with pytest.raises(UserError, match="unknown pass 'fold-everything'"):
        run_reparam(nn.Linear(2, 2), ["fold-everything"])


def test_reparam_cli_folds_every_bn_of_the_real_mobilenet_v2_and_reloads(tmp_path):
    from typer.testing import CliRunner

    from cli import app
    from compress.models import load_model

    out = tmp_path / "folded"
    r = CliRunner().invoke(app, ["reparam", "mobilenet-v2", "--fold-bn", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["changes"] == 52 and result["modules_after"]["batchnorm"] == 0 and result["equivalence"]["pass"]
    original, back = load_model("mobilenet-v2"), load_model(str(out))
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = original.module(x), back.module(x)
    assert float((a - b).abs().max()) <= 1e-4 * float(a.abs().max())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in back.module.modules())
    nothing = CliRunner().invoke(app, ["reparam", str(out), "--fold-bn", "--json"])
    assert nothing.exit_code == 0 and json.loads(nothing.stdout)["changes"] == 0
    bad = CliRunner().invoke(app, ["reparam", "mobilenet-v2"])
    assert bad.exit_code == 2 and "choose at least one pass" in bad.stderr
