"""Streaming (block by block from disk) against the in-memory path on tiny llamas saved in bf16: the same artifact
bytes, the same evaluation, and memory-free skeletons."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import TEXT, hf_dir

from compress.stream.checkpoint import Checkpoint

REPO = Path(__file__).resolve().parents[1]



@pytest.fixture(scope="module", params=["untied", "tied-sharded"])
def model_dir(request, tmp_path_factory) -> Path:
    tied = request.param.startswith("tied")
    shard = "40KB" if "sharded" in request.param else None
    return hf_dir(tmp_path_factory.mktemp("hf") / request.param, TEXT, tied=tied, shard=shard)


def _weights(root: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(root.glob("*.safetensors*"))}


def _quantize(model: Path, out: Path, stream: str, text: Path, **kw):
    from flows.quantize import QuantizeRequest, run_quantize

    req = QuantizeRequest(model=str(model), bits=4, group_size=16, data=str(text), tokens=128, eval_tokens=128,
                          seq_len=32, out=out, stream=stream, **kw)
    return run_quantize(req)


@pytest.mark.parametrize("method,extra", [("rtn", {}), ("gptq", {}), ("hqq", {"symmetric": False}),
                                          ("rtn", {"embeddings": "quantize"})])
def test_stream_on_and_off_write_the_same_bytes(model_dir, text_file, tmp_path, method, extra):
    off = _quantize(model_dir, tmp_path / "off", "off", text_file, method=method, **extra)
    on = _quantize(model_dir, tmp_path / "on", "on", text_file, method=method, **extra)
    assert on["stream"] and "stream" not in off
    assert _weights(tmp_path / "on") == _weights(tmp_path / "off")
    assert on["specs"] == off["specs"] and on["size_bytes"] == off["size_bytes"] and on["bpw"] == off["bpw"]
    for k in ("ppl", "ppl_ref", "kl_mean", "top1_agreement"):
        assert on["metrics"][k] == pytest.approx(off["metrics"][k], rel=1e-4, abs=1e-6), k


def test_unchanged_floats_keep_the_checkpoint_dtype(model_dir, text_file, tmp_path):
    _quantize(model_dir, tmp_path / "q", "on", text_file)
    stored = Checkpoint(tmp_path / "q").dtypes
    assert stored["model.norm.weight"] == torch.bfloat16
    assert stored["model.embed_tokens.weight"] == torch.bfloat16
    assert stored["model.layers.0.self_attn.q_proj.packed.qweight"] == torch.uint8


def test_the_streamed_artifact_loads_and_generates(model_dir, text_file, tmp_path):
    from compress.models import load_model

    _quantize(model_dir, tmp_path / "q", "on", text_file)
    loaded = load_model(str(tmp_path / "q"))
    ids = loaded.tokenizer("It is a truth", return_tensors="pt")["input_ids"]
    out = loaded.module.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5


def test_streaming_eval_matches_the_in_memory_eval(model_dir, text_file, tmp_path):
    from compress.data import load_windows
    from compress.evaluate import evaluate
    from compress.models import load_model
    from compress.stream.evaluate import evaluate_streaming
    from compress.stream.lazy import open_lazy

    _quantize(model_dir, tmp_path / "q", "off", text_file, method="rtn")
    cand, ref = load_model(str(tmp_path / "q")), load_model(str(model_dir))
    windows = load_windows(str(text_file), ref, split="evaluation", tokens=128, seq_len=32)
    whole = evaluate(cand, ref, windows)
    streamed = evaluate_streaming(open_lazy(tmp_path / "q", "q"), open_lazy(model_dir, "ref"), windows)
    assert streamed.size_bytes == whole.size_bytes and streamed.bpw == whole.bpw
    for k in ("ppl", "ppl_ref", "kl_mean", "kl_median", "top1_agreement"):
        assert getattr(streamed, k) == pytest.approx(getattr(whole, k), rel=1e-4, abs=1e-6), k


def test_the_skeleton_holds_no_weights(model_dir):
    from compress.stream.lazy import open_lazy

    lazy = open_lazy(model_dir, "m")
    assert all(p.device.type == "meta" for p in lazy.model.parameters())
    lazy.load_block(1)
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in lazy.blocks[1].parameters())
    lazy.drop_block(1)
    assert all(p.device.type == "meta" for p in lazy.model.parameters())


def test_outputs_past_one_shard_are_sharded_like_hugging_face(model_dir, text_file, tmp_path, monkeypatch):
    import json

    import compress.stream.shards as shards
    from compress.models import load_model

    monkeypatch.setattr(shards, "SHARD_BYTES", 30_000)
    _quantize(model_dir, tmp_path / "off", "off", text_file)
    _quantize(model_dir, tmp_path / "on", "on", text_file)
    files = _weights(tmp_path / "on")
    assert files == _weights(tmp_path / "off")
    index = json.loads(files["model.safetensors.index.json"])
    n = len(files) - 1
    assert n >= 3 and set(index["weight_map"].values()) == {f"model-{k:05d}-of-{n:05d}.safetensors"
                                                             for k in range(1, n + 1)}
    assert not list((tmp_path / "on").glob(".shard-*"))
    on, off = load_model(str(tmp_path / "on")), load_model(str(tmp_path / "off"))
    ids = torch.tensor([[1, 5, 9, 12, 40]])
    assert torch.equal(on.module(ids).logits, off.module(ids).logits)


def test_compress_eval_streams_the_same_report(model_dir, text_file, tmp_path):
    from flows.evaluation import EvalRequest, run_eval

    _quantize(model_dir, tmp_path / "q", "off", text_file)
    kw = dict(model=str(tmp_path / "q"), reference=str(model_dir), data=str(text_file), tokens=128, seq_len=32)
    whole = run_eval(EvalRequest(**kw, stream="off"))["candidate"]
    streamed = run_eval(EvalRequest(**kw, stream="on"))["candidate"]
    assert streamed["provenance"]["streamed"] and streamed["tokens"] == whole["tokens"]
    for k in ("ppl", "ppl_ref", "kl_mean", "top1_agreement", "size_bytes", "bpw"):
        assert streamed[k] == pytest.approx(whole[k], rel=1e-4, abs=1e-6), k


def test_bad_stream_requests_are_refused_in_one_line(model_dir, text_file, tmp_path):
    from compress.errors import UserError

    with pytest.raises(UserError, match="--stream maybe: use auto, on, off"):
        _quantize(model_dir, tmp_path / "a", "maybe", text_file)
    with pytest.raises(UserError, match="--measure full replays the whole model"):
        _quantize_lw(model_dir, tmp_path / "b", text_file, measure="full")
    with pytest.raises(UserError, match="--data self"):
        from flows.quantize import QuantizeRequest, run_quantize

        run_quantize(QuantizeRequest(model=str(model_dir), bits=4, group_size=16, stream="on", out=tmp_path / "c"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_stream_off_refuses_a_model_larger_than_free_memory(model_dir, monkeypatch):
    import compress.stream.decide as decide
    from compress.errors import UserError

    monkeypatch.setattr(decide, "available_bytes", lambda: 1000)
    with pytest.raises(UserError, match="needs about .* GiB in memory.*use --stream on"):
        decide.decide(str(model_dir), "off")
    assert decide.decide(str(model_dir), "auto").stream


def _quantize_lw(model: Path, out: Path, text: Path, stream: str = "on", **kw):
    from flows.quantize import QuantizeRequest, run_quantize

    return run_quantize(QuantizeRequest(model=str(model), layerwise=True, avg_bits=4.5, data=str(text), tokens=128,
                                        eval_tokens=128, seq_len=32, out=out, stream=stream,
                                        candidates="8g16,4g16,3g16", **kw))


def test_layerwise_fisher_streamed_and_in_memory_write_the_same_bytes(model_dir, text_file, tmp_path, monkeypatch):
    import compress.stream.fisher as fisher

    off = _quantize_lw(model_dir, tmp_path / "off", text_file, stream="off", measure="fisher")
    monkeypatch.setattr(fisher, "IN_MEMORY_BYTES", 0)  # the hidden states go through files
    on = _quantize_lw(model_dir, tmp_path / "on", text_file, offload_dir=tmp_path)
    assert on["plan"]["meta"]["measure"] == "fisher" and on["distortion_measure"].startswith("predicted kl")
    assert on["distortion"] == off["distortion"]  # block by block, from disk or memory: the same numbers
    assert on["plan"]["meta"]["units"] == off["plan"]["meta"]["units"]
    assert len(set(on["plan"]["meta"]["units"].values())) > 1  # the budget mixes widths
    assert _weights(tmp_path / "on") == _weights(tmp_path / "off")
    assert not list(tmp_path.glob("compress-fisher-*"))  # the spilled hidden states are gone


def test_the_blockwise_fisher_equals_one_whole_model_backward():
    """Block by block (each block recomputed from its kept input, the gradient handed down) gives the same diagonal
    Fisher as autograd through the whole model, embedding and tied head included."""
    from test_fisher import _windows
    from tiny_models import build

    from compress.models import layer_map
    from compress.quantize.apply import weight_matrix
    from compress.quantize.distortion import _fake_quant
    from compress.quantize.fisher import fisher_squares, predict_fisher
    from compress.quantize.pipeline import units_for
    from compress.quantize.spec import QuantSpec

    for family in ("llama", "gemma2", "gpt2"):  # untied; tied with scaled embeddings and capped logits; Conv1D
        loaded = build(family)
        lmap = layer_map(loaded.module)
        windows = _windows(loaded.module.config.vocab_size)
        units = units_for(loaded.module, lmap, "block", embeddings=True)
        cands = [QuantSpec(8, 16), QuantSpec(3, 16)]
        table = predict_fisher(loaded, lmap, windows, units, cands)
        g2 = fisher_squares(loaded.module, [m for u in units for m in u.modules], windows)
        for unit, row in zip(units, table.distortion, strict=True):
            for c, got in zip(cands, row, strict=True):
                want = 0.0
                for m in unit.modules:
                    w = weight_matrix(loaded.module.get_submodule(m)).detach().float()
                    want += 0.5 * float((g2[m] * (_fake_quant(w, c) - w) ** 2).sum())
                assert got == pytest.approx(want, rel=1e-3), (family, unit.name, c.label())


def test_the_fisher_backward_in_groups_of_linears_predicts_the_same_table(monkeypatch):
    """A block's squares held a few Linears at a time (one backward pass per group, the block inputs kept on disk
    until the last pass) give exactly the table of one pass with every square held."""
    from test_fisher import _windows
    from tiny_models import build

    import compress.stream.fisher as fisher
    from compress.models import layer_map
    from compress.quantize.fisher import predict_fisher
    from compress.quantize.pipeline import units_for
    from compress.quantize.spec import QuantSpec

    loaded = build("llama")
    lmap = layer_map(loaded.module)
    windows = _windows(loaded.module.config.vocab_size)
    units = units_for(loaded.module, lmap, "block", embeddings=True)
    cands = [QuantSpec(8, 16), QuantSpec(3, 16)]
    whole = predict_fisher(loaded, lmap, windows, units, cands)
    shapes = {n: loaded.module.get_submodule(n).weight.shape for n in lmap.blocks[0].linears}
    assert len(fisher._groups(shapes)) == 1
    monkeypatch.setattr(fisher, "FISHER_GROUP_BYTES", 1)  # every Linear a pass of its own
    monkeypatch.setattr(fisher, "IN_MEMORY_BYTES", 0)  # block inputs in files, read once per pass
    assert len(fisher._groups(shapes)) == len(shapes) > 1
    grouped = predict_fisher(loaded, lmap, windows, units, cands)
    assert grouped.distortion == whole.distortion


def test_an_offload_dir_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    import compress.stream.fisher as fisher
    from compress.errors import EnvironmentFault, UserError
    from flows.options import StreamOptions

    with pytest.raises(UserError, match="--offload-dir .*missing: not a directory"):
        StreamOptions(offload_dir=tmp_path / "missing").check_stream()
    monkeypatch.setattr(fisher, "IN_MEMORY_BYTES", 0)
    store = fisher._Store(1, tmp_path)

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full)  # the disk fills up
    try:
        with pytest.raises(EnvironmentFault, match="--offload-dir .*cannot write the hidden states.*No space left"):
            store.put(0, 0, torch.zeros(4))
    finally:
        store.close()
    assert not list(tmp_path.iterdir())


def test_a_damaged_streamed_artifact_is_refused_before_use(model_dir, text_file, tmp_path):
    from compress.errors import UserError
    from compress.stream.lazy import open_lazy

    _quantize(model_dir, tmp_path / "q", "on", text_file)
    weights = tmp_path / "q" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(UserError, match="model.safetensors"):
        open_lazy(tmp_path / "q", "q")


def _cli(*args: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **({"COMPRESS_FAULT_AT": fault} if fault else {})}
    launch = "import sys; from cli import main; sys.argv[0] = 'compress'; main()"
    return subprocess.run([sys.executable, "-c", launch, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


def test_resume_after_a_sigkill_writes_the_same_artifact(model_dir, text_file, tmp_path):
    def quantize(out: Path, *extra: str, fault: str | None = None):
        return _cli("quantize", str(model_dir), "--bits", "4", "--group-size", "16", "--method", "gptq", "--data",
                    str(text_file), "--tokens", "128", "--eval-tokens", "128", "--seq-len", "32", "--stream", "on",
                    "--out", str(out), *extra, fault=fault)

    assert quantize(tmp_path / "whole").returncode == 0
    out, partial = tmp_path / "q", tmp_path / ".q.partial"
    assert quantize(out, fault="after-block-1").returncode == -signal.SIGKILL
    assert not out.exists() and len(list(partial.glob(".group-*.safetensors"))) == 2  # blocks 0 and 1 kept
    before = {f.name: f.read_bytes() for f in partial.iterdir()}
    other = quantize(out, "--resume", "--seed", "1")  # other calibration windows: another artifact
    assert other.returncode == 2 and "had other inputs" in other.stderr
    assert {f.name: f.read_bytes() for f in partial.iterdir()} == before  # refused without touching it
    resumed = quantize(out, "--resume", "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed an interrupted run" in json.loads(resumed.stdout)["notes"]
    assert _weights(out) == _weights(tmp_path / "whole") and not partial.exists()
    nothing = quantize(tmp_path / "never", "--resume")
    assert nothing.returncode == 2 and "no interrupted run" in nothing.stderr


def test_no_eval_writes_the_same_artifact_without_metrics(model_dir, text_file, tmp_path):
    _quantize(model_dir, tmp_path / "evaluated", "on", text_file)
    run = _cli("quantize", str(model_dir), "--bits", "4", "--group-size", "16", "--data", str(text_file), "--tokens",
               "128", "--eval-tokens", "128", "--seq-len", "32", "--stream", "on", "--no-eval", "--json", "--out",
               str(tmp_path / "q"))
    assert run.returncode == 0, run.stderr
    assert "metrics" not in json.loads(run.stdout)
    assert _weights(tmp_path / "q") == _weights(tmp_path / "evaluated")


def test_device_choices_resolve_or_refuse_in_one_line(monkeypatch):
    from compress.errors import UserError
    from compress.stream.decide import resolve_device

    assert resolve_device("cpu", True).type == "cpu" and resolve_device("auto", False).type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto", True).type == "cpu"
    with pytest.raises(UserError, match="torch sees no CUDA device"):
        resolve_device("cuda", True)
    with pytest.raises(UserError, match="unknown|use one of|--device"):
        resolve_device("tpu", True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto", True).type == "cuda" and resolve_device("auto", False).type == "cpu"
    with pytest.raises(UserError, match="only streamed runs compute on the GPU"):
        resolve_device("cuda", False)


def test_an_explicit_cpu_device_writes_the_same_bytes(model_dir, text_file, tmp_path):
    _quantize(model_dir, tmp_path / "auto", "on", text_file)
    _quantize(model_dir, tmp_path / "cpu", "on", text_file, device="cpu")
    assert _weights(tmp_path / "auto") == _weights(tmp_path / "cpu")


def test_gguf_export_streams_the_same_bytes_and_validates(model_dir, text_file, tmp_path):
    pytest.importorskip("llama_cpp")
    from exporters.gguf import export_gguf
    from flows.gguf import GgufRequest, run_gguf_export
    from flows.quantize import QuantizeRequest, run_quantize

    run_quantize(QuantizeRequest(model=str(model_dir), bits=4, group_size=32, target="gguf", data=str(text_file),
                                 tokens=128, evaluate=False, seq_len=32, out=tmp_path / "art"))
    for src in (model_dir, tmp_path / "art"):
        export_gguf(src, tmp_path / "whole.gguf")
        result = run_gguf_export(GgufRequest(model=str(src), out=tmp_path / "streamed.gguf", data=str(text_file),
                                             tokens=64, seq_len=32, stream="on"))
        assert result["stream"] and result["passed"], result.get("validation")
        assert (tmp_path / "streamed.gguf").read_bytes() == (tmp_path / "whole.gguf").read_bytes()
        (tmp_path / "whole.gguf").unlink()
        (tmp_path / "streamed.gguf").unlink()
        Path(str(tmp_path / "streamed.gguf") + ".json").unlink()
