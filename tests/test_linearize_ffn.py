"""RePaViT-style FFN linearization: channels whose activation is exactly linear on the data merge away exactly;
the FFN shrinks; non-BERT blocks are refused by name."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build

from compress.data import Windows
from compress.errors import UserError
from compress.models import layer_map
from compress.reparam.linearize_ffn import LinearizedOutput, apply, linear_fit


def _windows(n: int = 4, length: int = 12) -> Windows:
    ids = torch.randint(1, 64, (n, length), generator=torch.Generator().manual_seed(1))
    return Windows(ids, torch.ones_like(ids), "calibration", "random", 0)


def _emb(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state


def test_linear_fit_recovers_a_line_and_relu_on_positive_inputs():
    z = torch.randn(1000, 3) + torch.tensor([10.0, 0.0, -10.0])
    a, b, resid = linear_fit(z, torch.relu)
    torch.testing.assert_close(a, torch.tensor([1.0, a[1].item(), 0.0]), atol=1e-5, rtol=0)
    assert resid[0] < 1e-8 and resid[2] < 1e-8 and resid[1] > 1e-3  # only the channel around 0 is bent
    assert abs(float(b[0])) < 1e-4


def test_channels_that_stay_in_relus_linear_part_merge_exactly():
    loaded = build("bert")
    model = loaded.module
    model.config.hidden_act = "relu"
    lmap = layer_map(model)
    h = model.config.intermediate_size
    for b in lmap.blocks:
        inter = model.get_submodule(b.path).intermediate
        inter.intermediate_act_fn = torch.nn.ReLU()
        with torch.no_grad():
            inter.dense.bias[: h // 4] += 100.0  # these pre-activations are always positive: ReLU is the identity
    ids = _windows().input_ids
    before = _emb(model, ids)
    record = apply(model, lmap, _windows(), 0.25)
    after = _emb(model, ids)
    assert all(v["linearized"] == h // 4 and v["fit_residual_chosen"] < 1e-6 for v in record["layers"].values())
    torch.testing.assert_close(after, before, atol=1e-3, rtol=1e-4)
    block = model.get_submodule(lmap.blocks[0].path)
    assert isinstance(block.output, LinearizedOutput) and block.intermediate.dense.out_features == h - h // 4


def test_gelu_linearization_drifts_a_little_and_grows_with_the_share():
    drift = []
    for ratio in (0.1, 0.5):
        loaded = build("bert")
        ids = _windows().input_ids
        before = _emb(loaded.module, ids)
        apply(loaded.module, layer_map(loaded.module), _windows(), ratio)
        drift.append(float((_emb(loaded.module, ids) - before).abs().mean()))
    assert 0 < drift[0] < drift[1]


def test_refuses_non_bert_blocks_and_bad_shares():
    llama = build("llama")
    with pytest.raises(UserError, match="not a BERT-style block"):
        apply(llama.module, layer_map(llama.module), _windows(), 0.25)
    bert = build("bert")
    for ratio in (0.0, 1.0):
        with pytest.raises(UserError, match="inside"):
            apply(bert.module, layer_map(bert.module), _windows(), ratio)


def test_cli_refuses_saving_or_combining_linearization(tmp_path):
    from typer.testing import CliRunner

    from cli import app

    for extra in (["--out", str(tmp_path / "x")], ["--fold-bn"]):
        r = CliRunner().invoke(app, ["reparam", "minilm-l6", "--linearize-ffn", "25%", *extra])
        assert r.exit_code == 2 and "runs alone" in r.stderr and not (tmp_path / "x").exists()
    r = CliRunner().invoke(app, ["reparam", "minilm-l6", "--linearize-ffn", "25"])
    assert r.exit_code == 2 and "percentage" in r.stderr
