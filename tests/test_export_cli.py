"""`compress export` / `compress validate` on a tiny decoder: complete dirs, exit codes 0 / 1 / 2."""

from __future__ import annotations

import json

import pytest
from tiny_models import build
from typer.testing import CliRunner

from cli import app
from compress.errors import UserError


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setattr("compress.models.load_model", lambda *a, **k: build("llama"))
    monkeypatch.setattr("compress.inputs.check_model", lambda *a, **k: None)  # "tiny" stands for build("llama")


def test_export_writes_graph_validation_and_summary(tmp_path, tiny):
    out = tmp_path / "onnx"
    r = CliRunner().invoke(app, ["export", "tiny", "--onnx", str(out), "--data", "self", "--tokens", "64",
                                 "--seq-len", "16", "--json"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["passed"] is True
    assert {"model.onnx", "export.json", "validation.json", "README.md", "config.json"} <= {p.name for p in
                                                                                         out.iterdir()}
    assert "PASSED" in (out / "README.md").read_text()
    checks = result["validation"]["vs source"]["checks"]
    assert any(c["name"].startswith("decode") for c in checks)


def test_a_validation_failure_exits_1(tmp_path, tiny, monkeypatch):
    from dataclasses import replace

    import exporters.validate as v

    monkeypatch.setitem(v.DEFAULT_TOLERANCE, "fp32", replace(v.DEFAULT_TOLERANCE["fp32"], rel_tol=-1.0))
    r = CliRunner().invoke(app, ["export", "tiny", "--onnx", str(tmp_path / "o"), "--data", "self", "--tokens", "32",
                                 "--seq-len", "16"])
    assert r.exit_code == 1, r.output
    assert "VALIDATION FAILED" in r.stdout
    r = CliRunner().invoke(app, ["validate", str(tmp_path / "o"), "--reference", "tiny", "--data", "self",
                                 "--tokens", "32", "--seq-len", "16"])
    assert r.exit_code == 1


@pytest.mark.parametrize("args, needle", [
    (["--format", "int3"], "use one of fp32, fp16, int4, qdq"),
    (["--format", "int4"], "--target ort"),
    (["--format", "qdq"], "--target trt"),
    (["--opset", "7"], "--opset 7"),
])
def test_bad_export_input_exits_2_and_writes_nothing(tmp_path, tiny, args, needle):
    r = CliRunner().invoke(app, ["export", "tiny", "--onnx", str(tmp_path / "o"), *args])
    assert r.exit_code == 2, r.output
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("target, fmt", [("ort", "int4"), ("trt", "qdq")])
def test_quantized_artifact_exports_with_its_own_codes_and_validates_twice(tmp_path, monkeypatch, target, fmt):
    from flows.export import ExportRequest, run_export
    from flows.quantize import QuantizeRequest, run_quantize

    monkeypatch.setattr("compress.models.load_model", lambda *a, **k: build("llama"))
    art = tmp_path / "art"
    run_quantize(QuantizeRequest(model="tiny", bits=4, target=target, embeddings="quantize", evaluate=False, out=art))
    result = run_export(ExportRequest(model=str(art), out=tmp_path / "onnx", fmt=fmt, data="self", tokens=32,
                                      seq_len=16))
    assert result["passed"], result["validation"]
    assert set(result["validation"]) == {"vs artifact (kernel rounding)", "vs original float"}
    rewrite = result["export"]["extra"]["rewrite"]
    assert rewrite["layers"] and any("embed" in n for n in rewrite["layers"])
    assert json.loads((tmp_path / "onnx" / "validation.json").read_text())["format"] == fmt


def test_int8_activations_set_the_accuracy_level_and_validate_by_distribution(tmp_path, monkeypatch):
    import onnx

    from flows.export import ExportRequest, run_export
    from flows.quantize import QuantizeRequest, run_quantize

    monkeypatch.setattr("compress.models.load_model", lambda *a, **k: build("llama"))
    art = tmp_path / "art"
    run_quantize(QuantizeRequest(model="tiny", bits=4, target="ort", embeddings="quantize", evaluate=False, out=art))
    result = run_export(ExportRequest(model=str(art), out=tmp_path / "onnx", fmt="int4", accuracy_level=4,
                                      data="self", tokens=32, seq_len=16))
    own = result["validation"]["vs artifact (int8 activations: KL and top-1)"]
    assert result["passed"] and own["tolerance"]["kl_max"] == 0.01 and not own["tolerance"]["elementwise"]
    levels = {a.i for n in onnx.load(str(tmp_path / "onnx" / "model.onnx")).graph.node if n.op_type == "MatMulNBits"
              for a in n.attribute if a.name == "accuracy_level"}
    assert levels == {4}
    with pytest.raises(UserError, match="applies to --format int4"):
        run_export(ExportRequest(model=str(art), out=tmp_path / "x", fmt="qdq", accuracy_level=4))
    with pytest.raises(UserError, match="use 0"):
        run_export(ExportRequest(model=str(art), out=tmp_path / "x", fmt="int4", accuracy_level=2))


def test_a_trt_artifact_with_a_quantized_embedding_passes_check_trt(tmp_path, monkeypatch):
    from exporters.trt_rules import check_trt
    from flows.export import ExportRequest, run_export
    from flows.quantize import QuantizeRequest, run_quantize

    monkeypatch.setattr("compress.models.load_model", lambda *a, **k: build("llama"))
    run_quantize(QuantizeRequest(model="tiny", bits=4, target="trt", embeddings="quantize", evaluate=False,
                                 out=tmp_path / "art"))
    run_export(ExportRequest(model=str(tmp_path / "art"), out=tmp_path / "q", fmt="qdq", validate=False))
    report = check_trt(tmp_path / "q" / "model.onnx", lint=False)
    assert report.passed, report.rows()


@pytest.mark.parametrize("fmt", ["fp32", "int4"])
def test_fused_attention_keeps_the_io_and_validates(tmp_path, monkeypatch, fmt):
    import onnx

    import exporters.graph
    from flows.export import ExportRequest, run_export
    from flows.quantize import QuantizeRequest, run_quantize

    monkeypatch.setattr("compress.models.load_model", lambda *a, **k: build("llama-hd16"))
    saves = []
    real_save = exporters.graph.save_model_atomic
    monkeypatch.setattr(exporters.graph, "save_model_atomic", lambda m, path: saves.append(path) or real_save(m, path))
    model = "tiny"
    if fmt == "int4":
        model = str(tmp_path / "art")
        run_quantize(QuantizeRequest(model="tiny", bits=4, target="ort", embeddings="quantize", evaluate=False,
                                     out=tmp_path / "art"))
    plain = run_export(ExportRequest(model=model, out=tmp_path / "plain", fmt=fmt, data="self", tokens=32,
                                     seq_len=16))
    saves.clear()
    fused = run_export(ExportRequest(model=model, out=tmp_path / "fused", fmt=fmt, data="self", tokens=32,
                                     seq_len=16, fuse_attention=True))
    assert fused["passed"], fused["validation"]
    graphs = {k: onnx.load(str(tmp_path / k / "model.onnx")).graph for k in ("plain", "fused")}
    ops = [n.op_type for n in graphs["fused"].node]
    layers = build("llama-hd16").module.config.num_hidden_layers
    assert ops.count("GroupQueryAttention") == layers and "Softmax" not in ops
    assert len(graphs["fused"].node) < len(graphs["plain"].node) / 2
    for part in ("input", "output"):
        assert [i.name for i in getattr(graphs["fused"], part)] == [i.name for i in getattr(graphs["plain"], part)]
    assert fused["export"]["extra"]["fusion"]["layers"] == layers
    assert plain["passed"]
    # rewrites (codes, fusion) happen on one in-memory graph, saved once; nothing of the exporter's staging is left
    assert len(saves) == 1
    assert sorted(f.name for f in (tmp_path / "fused").iterdir() if f.name.startswith(".")) == [".compress-output"]


def test_fused_attention_is_refused_for_tensorrt_graphs(tmp_path, tiny):
    r = CliRunner().invoke(app, ["export", "tiny", "--onnx", str(tmp_path / "o"), "--format", "qdq",
                                 "--fuse-attention"])
    assert r.exit_code == 2 and "TensorRT" in r.stderr
    r = CliRunner().invoke(app, ["export", "tiny", "--onnx", str(tmp_path / "o"), "--fuse-attention"])
    assert r.exit_code == 2 and "multiple of 16" in r.stderr and not (tmp_path / "o").exists()
