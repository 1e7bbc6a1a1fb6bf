"""The importance matrix (issue 17): weighted RTN never loses to min/max on the weighted error, the block-by-block
collection equals the statistics of one whole forward, the llama.cpp GGUF round-trips, and `quantize` collects,
reuses, writes and refuses matrices as documented."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import TEXT, build, hf_dir

from compress.errors import UserError
from compress.quantize.rtn import quantize_rtn
from compress.quantize.spec import QuantSpec

SPECS = [QuantSpec(4, 32, True, "rtn"), QuantSpec(4, 32, False, "rtn"), QuantSpec(3, 16, True, "rtn"),
         QuantSpec(8, 32, True, "rtn"), QuantSpec(4, 32, True, "rtn", positive_scale=True),
         QuantSpec(2, 32, False, "rtn")]


def _group_errors(w, spec, imp, weighted: bool) -> torch.Tensor:
    deq = quantize_rtn(w, spec, imp if weighted else None).dequantize()
    g = spec.group_for(w.shape[1])
    return (((deq - w) ** 2) * imp).reshape(w.shape[0], -1, g).sum(-1)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.label())
def test_weighted_rtn_is_never_worse_per_group_and_better_overall(spec):
    torch.manual_seed(1)
    w = torch.randn(48, 128) * torch.rand(1, 128) * 2
    imp = torch.rand(128) ** 4 * 10
    plain, weighted = _group_errors(w, spec, imp, False), _group_errors(w, spec, imp, True)
    assert bool((weighted <= plain * (1 + 1e-5) + 1e-9).all())
    assert float(weighted.sum()) < 0.95 * float(plain.sum())


def test_weighted_rtn_codes_stay_in_range_and_scales_fp16():
    torch.manual_seed(2)
    w = torch.randn(16, 64)
    for spec in SPECS:
        q = quantize_rtn(w, spec, torch.rand(64) + 0.01)
        assert q.scales.dtype == torch.float16 and bool(torch.isfinite(q.scales.float()).all())
        assert int(q.codes.max()) <= 2**spec.bits - 1
        if spec.positive_scale:
            assert bool((q.scales.float() >= 0).all())


def _lazy(loaded):
    from compress.models import layer_map
    from compress.stream.lazy import LazyModel

    return LazyModel.resident(loaded, layer_map(loaded.module))


def _windows(n: int = 6, seq: int = 16, vocab: int = 64):
    from compress.data import Windows

    ids = torch.randint(3, vocab, (n, seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[-1, -5:] = 0  # padding is not counted
    return Windows(ids, mask, "calibration", "test", 0)


def test_blockwise_collection_equals_one_whole_forward():
    from compress.quantize.apply import quantizable
    from compress.quantize.imatrix import collect

    loaded = build("llama")
    lazy = _lazy(loaded)
    names = quantizable(loaded.module, lazy.lmap)
    windows = _windows()
    imat = collect(lazy, windows, names)
    sums: dict[str, torch.Tensor] = {}
    hooks = []
    keep = windows.attention_mask.bool()
    for n in names:
        if n == lazy.lmap.embeddings:
            continue

        def pre(m, args, n=n):
            x = args[0][keep].double()
            sums[n] = sums.get(n, 0) + (x * x).sum(0)
        hooks.append(loaded.module.get_submodule(n).register_forward_pre_hook(pre))
    with torch.inference_mode():
        loaded.module(input_ids=windows.input_ids, attention_mask=windows.attention_mask, use_cache=False)
    for h in hooks:
        h.remove()
    assert set(sums) <= set(imat.sums) and len(sums) == 3 * 7 + 1
    for n, s in sums.items():
        assert imat.counts[n] == int(keep.sum())
        torch.testing.assert_close(imat.sums[n], s, rtol=1e-5, atol=1e-8)


def test_gguf_round_trip_uses_llama_cpp_names(tmp_path):
    import gguf

    from compress.quantize.imatrix import ImportanceMatrix, load_gguf, save_gguf

    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "lm_head"]
    imat = ImportanceMatrix(datasets=["emma.txt"], chunk_size=512, chunks=4)
    for k, n in enumerate(names):
        imat.add(n, torch.randn(10 + k, 8))
    save_gguf(imat, tmp_path / "im.gguf", num_blocks=2)
    reader = gguf.GGUFReader(str(tmp_path / "im.gguf"))
    stored = {t.name for t in reader.tensors}
    assert {"blk.0.attn_q.weight.in_sum2", "blk.1.ffn_down.weight.counts", "output.weight.in_sum2"} <= stored
    back = load_gguf(tmp_path / "im.gguf", names, 2)
    assert back.counts == imat.counts and back.datasets == ["emma.txt"] and back.chunk_size == 512
    for n in names:
        torch.testing.assert_close(back.sums[n], imat.sums[n].float().double())


def test_a_matrix_of_another_width_is_refused_naming_the_module():
    from compress.quantize.imatrix import ImportanceMatrix

    imat = ImportanceMatrix()
    imat.add("model.layers.0.self_attn.q_proj", torch.randn(4, 16))
    with pytest.raises(UserError, match="q_proj has 16 input channels, the model 32"):
        imat.check({"model.layers.0.self_attn.q_proj": 32}, "x.gguf")
    with pytest.raises(UserError, match="no entry for model.layers.0.mlp.up_proj"):
        imat.check({"model.layers.0.mlp.up_proj": 32}, "x.gguf")


# ---- quantize: collect, reuse, write, refuse

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return hf_dir(tmp_path_factory.mktemp("hf") / "tiny", TEXT, dtype=torch.float32, tied=True)


def _quantize(model: Path, text: Path, out: Path | None = None, **kw) -> dict:
    from flows.quantize import QuantizeRequest, run_quantize

    req = QuantizeRequest(model=str(model), bits=4, group_size=16, data=str(text), tokens=128, eval_tokens=128,
                          seq_len=32, out=out, embeddings="quantize", **kw)
    return run_quantize(req)


def _weights(root: Path) -> bytes:
    return b"".join(f.read_bytes() for f in sorted(root.glob("*.safetensors")))


def test_quantize_collects_writes_and_reuses_the_matrix(tiny_dir, text_file, tmp_path):
    from compress.quantize.imatrix import FILE

    made = _quantize(tiny_dir, text_file, tmp_path / "a", imatrix_out=tmp_path / "im.gguf")
    assert made["imatrix"]["source"] == "collected" and (tmp_path / "a" / FILE).is_file()
    assert (tmp_path / "im.gguf").read_bytes() == (tmp_path / "a" / FILE).read_bytes()
    reused = _quantize(tiny_dir, text_file, tmp_path / "b", imatrix=tmp_path / "im.gguf")
    assert _weights(tmp_path / "a") == _weights(tmp_path / "b")
    plain = _quantize(tiny_dir, text_file, tmp_path / "c", use_imatrix=False)
    assert "imatrix" not in plain and not (tmp_path / "c" / FILE).exists()
    assert _weights(tmp_path / "c") != _weights(tmp_path / "a")
    assert reused["metrics"]["kl_mean"] < plain["metrics"]["kl_mean"]


def test_no_data_means_plain_rtn(tiny_dir, text_file):
    from flows.quantize import QuantizeRequest, wants_imatrix

    assert not wants_imatrix(QuantizeRequest(model=str(tiny_dir), bits=4))
    assert wants_imatrix(QuantizeRequest(model=str(tiny_dir), bits=4, data=str(text_file)))
    assert not wants_imatrix(QuantizeRequest(model=str(tiny_dir), bits=4, data=str(text_file), method="gptq"))


def test_layerwise_measures_with_the_matrix(tiny_dir, text_file):
    from flows.quantize import QuantizeRequest, run_quantize

    req = QuantizeRequest(model=str(tiny_dir), layerwise=True, avg_bits=5.0, candidates="8,4", group_size=16,
                          data=str(text_file), tokens=128, eval_tokens=128, seq_len=32, measure="fast")
    result = run_quantize(req)
    assert "importance-weighted RTN" in result["distortion_measure"] and result["imatrix"]["modules"] > 0


@pytest.mark.parametrize("kw,message", [
    ({"method": "gptq", "imatrix": "IM"}, "--imatrix weights RTN's rounding"),
    ({"use_imatrix": False, "imatrix": "IM"}, "--no-imatrix turns the importance matrix off"),
    ({"imatrix": "missing.gguf"}, "no such file"),
])
def test_bad_imatrix_options_are_refused(tiny_dir, text_file, tmp_path, kw, message):
    kw = {k: (tmp_path / "im.gguf" if v == "IM" else v) for k, v in kw.items()}
    (tmp_path / "im.gguf").write_bytes(b"")
    with pytest.raises(UserError, match=message):
        _quantize(tiny_dir, text_file, **kw)


def test_imatrix_out_without_calibration_is_refused(tiny_dir, tmp_path):
    from flows.quantize import QuantizeRequest, run_quantize

    with pytest.raises(UserError, match="needs --method rtn and calibration data"):
        run_quantize(QuantizeRequest(model=str(tiny_dir), bits=4, group_size=16, imatrix_out=tmp_path / "x.gguf"))


def test_a_matrix_from_another_model_exits_2_naming_the_mismatch(tiny_dir, text_file, tmp_path):
    from compress.quantize.imatrix import ImportanceMatrix, save_gguf

    other = ImportanceMatrix()
    for n in ["model.layers.0.self_attn.q_proj"]:
        other.add(n, torch.randn(4, 48))
    save_gguf(other, tmp_path / "other.gguf", 3)
    with pytest.raises(UserError, match="q_proj has 48 input channels"):
        _quantize(tiny_dir, text_file, imatrix=tmp_path / "other.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf")
    with pytest.raises(UserError, match="not a readable GGUF imatrix"):
        _quantize(tiny_dir, text_file, imatrix=tmp_path / "junk.gguf")


def test_cli_refuses_an_imatrix_out_it_did_not_write(tiny_dir, text_file, tmp_path):
    from typer.testing import CliRunner

    from cli import app

    theirs = tmp_path / "theirs.gguf"
    theirs.write_bytes(b"user data")
    result = CliRunner().invoke(app, ["quantize", str(tiny_dir), "--bits", "4", "--group-size", "16", "--data",
                                      str(text_file), "--imatrix-out", str(theirs)])
    assert result.exit_code == 2 and "--imatrix-out" in result.stderr and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert theirs.read_bytes() == b"user data"
