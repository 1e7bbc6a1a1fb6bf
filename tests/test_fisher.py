"""--measure fisher: the predicted distortion table on a tiny trained-free llama — ordered like the measured one,
growing as bits shrink, and a plan the budget holds, with nothing replayed."""

from __future__ import annotations

import torch
from tiny_models import build


def _windows(vocab: int, n: int = 4, length: int = 32):
    from compress.data import Windows

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (n, length), generator=g)
    return Windows(ids, torch.ones_like(ids), "calibration", "random ids", 0)


def test_fisher_table_grows_as_bits_shrink_and_follows_the_measured_one():
    from scipy.stats import spearmanr

    from compress.importance.context import ScoringContext
    from compress.models import layer_map
    from compress.quantize.distortion import measure_kl
    from compress.quantize.fisher import predict_fisher
    from compress.quantize.pipeline import units_for
    from compress.quantize.spec import QuantSpec

    loaded = build("llama")
    lmap = layer_map(loaded.module)
    windows = _windows(loaded.module.config.vocab_size)
    units = units_for(loaded.module, lmap, "block", embeddings=True)
    cands = [QuantSpec(8, 16), QuantSpec(4, 16), QuantSpec(3, 16), QuantSpec(2, 16)]
    before = {k: v.clone() for k, v in loaded.module.state_dict().items()}
    fisher = predict_fisher(loaded, lmap, windows, units, cands)
    assert all(torch.equal(before[k], v) for k, v in loaded.module.state_dict().items())  # nothing changed
    assert not any(p.requires_grad and p.grad is not None for p in loaded.module.parameters())
    for row in fisher.distortion:
        assert all(d > 0 for d in row) and row == sorted(row)  # fewer bits, more predicted damage
    full = measure_kl(ScoringContext(loaded, lmap, windows), units, cands)
    cells = [(f, m) for fr, mr in zip(fisher.distortion, full.distortion, strict=True)
             for f, m in zip(fr, mr, strict=True)]
    assert spearmanr([c[0] for c in cells], [c[1] for c in cells]).statistic > 0.7


def test_quantize_with_measure_fisher_holds_the_budget(tmp_path):
    from flows.quantize import QuantizeRequest, run_quantize

    text = tmp_path / "t.txt"
    text.write_text("It is a truth universally acknowledged. " * 300)
    from tiny_models import hf_dir

    model = hf_dir(tmp_path / "m", text.read_text()[:2000], dtype=torch.float32)
    result = run_quantize(QuantizeRequest(model=str(model), layerwise=True, avg_bits=4.5, candidates="8g16,4g16,3g16",
                                          measure="fisher", data=str(text), tokens=256, eval_tokens=128, seq_len=32,
                                          stream="off"))
    assert result["plan"]["meta"]["measure"] == "fisher"
    assert result["distortion_measure"].startswith("predicted kl")
    assert result["plan"]["meta"]["planned_bytes"] <= result["plan"]["meta"]["budget_bytes"]
    assert result["metrics"]["kl_mean"] > 0
