"""`compress export --gguf` on a tiny llama: the file, its llama.cpp validation, and bad input (exit 2, no file)."""

from __future__ import annotations

import json

import pytest
from test_gguf import _tiny, _tokenizer, needs_llamacpp
from typer.testing import CliRunner

from cli import app


@pytest.fixture
def tiny(monkeypatch):
    tok = _tokenizer()
    monkeypatch.setattr("compress.models.load_model", lambda spec, *a, **k: _tiny(tok, family="qwen2" if "qwen" in
                                                                                 str(spec) else "llama"))
    monkeypatch.setattr("compress.inputs.check_model", lambda spec, arch=None: None)  # "tiny" is not a real name


@pytest.fixture
def artifact(tmp_path, tiny):
    from flows.quantize import QuantizeRequest, run_quantize

    out = tmp_path / "art"
    run_quantize(QuantizeRequest(model="tiny", bits=4, target="gguf", embeddings="quantize", evaluate=False, out=out))
    return out


@needs_llamacpp
def test_gguf_export_is_validated_in_llamacpp_against_artifact_and_original(tmp_path, artifact):
    out = tmp_path / "m.gguf"
    r = CliRunner().invoke(app, ["export", str(artifact), "--gguf", str(out), "--data", "self", "--tokens", "64",
                                 "--seq-len", "32", "--json"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["passed"] and out.is_file() and json.loads((tmp_path / "m.gguf.json").read_text())["passed"]
    own, orig = result["validation"]["vs artifact (llama.cpp, 8-bit activations)"], result["validation"][
        "vs original float"]
    assert own["kl_mean"] < 0.02 and own["top1_agreement"] >= 0.9
    assert orig["kl_max"] is None and orig["passed"]
    assert result["export"]["n_approximated"] == 0 and not result["not_exact"]


@needs_llamacpp
def test_gguf_gate_on_the_original_fails_with_exit_1(tmp_path, artifact):
    r = CliRunner().invoke(app, ["export", str(artifact), "--gguf", str(tmp_path / "m.gguf"), "--data", "self",
                                 "--tokens", "64", "--seq-len", "32", "--max-kl", "0"])
    assert r.exit_code == 1, r.output
    assert "VALIDATION FAILED" in r.stdout


def test_gguf_without_validation_writes_the_file(tmp_path, artifact):
    r = CliRunner().invoke(app, ["export", str(artifact), "--gguf", str(tmp_path / "m.gguf"), "--no-validate"])
    assert r.exit_code == 0, r.output
    assert "not validated" in " ".join(r.stdout.split()) and (tmp_path / "m.gguf").is_file()


@pytest.mark.parametrize("args, needle", [
    ([], "exactly one of --onnx"),
    (["--onnx", "ONNX", "--gguf", "x.gguf"], "exactly one of --onnx"),
    (["--gguf", "x.bin"], "OUT.gguf"),
    (["--gguf", "x.gguf", "--float-type", "Q3_K"], "--float-type Q3_K"),
])
def test_bad_gguf_input_exits_2(tmp_path, tiny, args, needle):
    args = [a.replace("x.", str(tmp_path / "x.")).replace("ONNX", str(tmp_path / "o")) for a in args]
    r = CliRunner().invoke(app, ["export", "tiny", *args, "--no-validate"])
    assert r.exit_code == 2, r.output
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_a_non_llama_model_is_refused_and_nothing_is_written(tmp_path, tiny):
    r = CliRunner().invoke(app, ["export", "tiny-qwen", "--gguf", str(tmp_path / "q.gguf"), "--no-validate"])
    assert r.exit_code == 2, r.output
    assert len(r.stderr.strip().splitlines()) == 1 and not list(tmp_path.iterdir())
