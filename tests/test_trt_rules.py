"""exporters.trt_rules: TensorRT Q/DQ, opset and op-support rules on tiny hand-built ONNX graphs."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper

from compress.errors import UserError
from exporters.trt_rules import check_trt, polygraphy_available

K, N, BLOCK = 128, 16, 64


def _model(nodes, inits, x_shape=(2, K), y_shape=(2, N), opset=21, extra_opsets=()):
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TP.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", TP.FLOAT, list(y_shape))],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), *extra_opsets])


def int4_block_model(block=BLOCK, axis=0, scale_shape=None, opset=21):
    rng = np.random.default_rng(0)
    q = rng.integers(-8, 8, size=(K, N))
    scale_shape = scale_shape or (K // block, N)
    w = helper.make_tensor("w_q", TP.INT4, [K, N], q.flatten().tolist())
    s = helper.make_tensor("w_s", TP.FLOAT, list(scale_shape), (rng.random(scale_shape) * 0.1 + 0.01).ravel().tolist())
    dq = helper.make_node("DequantizeLinear", ["w_q", "w_s"], ["w"], name="dq_w", axis=axis, block_size=block)
    mm = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    return _model([dq, mm], [w, s], opset=opset)


def int8_channel_model(zp_value=0, q_type=TP.INT8, axis=1, n_scale=N, scale_value=0.02):
    rng = np.random.default_rng(1)
    lo, hi = (-127, 128) if q_type == TP.INT8 else (0, 256)
    q = rng.integers(lo, hi, size=(K, N))
    w = helper.make_tensor("w_q", q_type, [K, N], q.ravel().tolist())
    s = helper.make_tensor("w_s", TP.FLOAT, [n_scale], [scale_value] * n_scale)
    zp = helper.make_tensor("w_zp", q_type, [n_scale], [zp_value] * n_scale)
    dq = helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_zp"], ["w"], name="dq_w", axis=axis)
    mm = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    return _model([dq, mm], [w, s, zp], opset=13)


def qdq_activation_model():
    """Q/DQ on the activation (per-tensor, int8 zero point) and per-channel int8 weight -> MatMul."""
    m = int8_channel_model()
    g = m.graph
    g.initializer.extend([helper.make_tensor("x_s", TP.FLOAT, [], [0.05]),
                          helper.make_tensor("x_zp", TP.INT8, [], [0])])
    g.node[1].input[0] = "x_dq"
    g.node.insert(0, helper.make_node("QuantizeLinear", ["x", "x_s", "x_zp"], ["x_q"], name="q_x"))
    g.node.insert(1, helper.make_node("DequantizeLinear", ["x_q", "x_s", "x_zp"], ["x_dq"], name="dq_x"))
    return m


def _run_ort(model, x_shape=(2, K), optimize=True):
    opts = ort.SessionOptions()
    if not optimize:  # ORT fuses DQ(int4)+MatMul into MatMulNBits, which may quantize activations: not exact
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(2).standard_normal(x_shape).astype(np.float32)
    return sess.run(None, {"x": x})[0]


def _rules(report, severity="error"):
    return {(v.rule, v.node_name) for v in report.violations if v.severity == severity}


# ------------------------------------------------------------------------------------------ clean graphs


@pytest.mark.parametrize("make", [int4_block_model, int8_channel_model, qdq_activation_model])
def test_clean_graphs_pass_and_run_in_onnxruntime(make):
    model = make()
    onnx.checker.check_model(model, full_check=True)
    assert _run_ort(model).shape == (2, N)  # the rules we accept are real: ORT CPU runs these graphs
    report = check_trt(model, lint=False)
    assert report.passed, report.rows()
    assert report.violations == []


def test_int4_block_dequant_matches_reference():
    model = int4_block_model()
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    w = inits["w_q"].astype(np.float32) * np.repeat(inits["w_s"], BLOCK, axis=0)
    x = np.random.default_rng(2).standard_normal((2, K)).astype(np.float32)
    np.testing.assert_allclose(_run_ort(model, optimize=False), x @ w, rtol=1e-4, atol=1e-4)


def conv_qdq_model():
    """Per-tensor int8 activation Q/DQ and per-output-channel (axis 0) int8 weight DQ -> Conv."""
    rng = np.random.default_rng(3)
    w = helper.make_tensor("w_q", TP.INT8, [8, 3, 3, 3], rng.integers(-127, 128, size=8 * 27).tolist())
    inits = [w, helper.make_tensor("w_s", TP.FLOAT, [8], [0.01] * 8), helper.make_tensor("x_s", TP.FLOAT, [], [0.05]),
             helper.make_tensor("x_zp", TP.INT8, [], [0])]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_s", "x_zp"], ["x_q"], name="q_x"),
        helper.make_node("DequantizeLinear", ["x_q", "x_s", "x_zp"], ["x_dq"], name="dq_x"),
        helper.make_node("DequantizeLinear", ["w_q", "w_s"], ["w"], name="dq_w", axis=0),
        helper.make_node("Conv", ["x_dq", "w"], ["y"], name="conv", pads=[1, 1, 1, 1]),
    ]
    return _model(nodes, inits, x_shape=(1, 3, 8, 8), y_shape=(1, 8, 8, 8), opset=13)


def gemm_int4_transb_model():
    """Gemm with transB=1: the weight is [N, K], so int4 blocks run along axis 1."""
    rng = np.random.default_rng(4)
    w = helper.make_tensor("w_q", TP.INT4, [N, K], rng.integers(-8, 8, size=N * K).tolist())
    s = helper.make_tensor("w_s", TP.FLOAT, [N, K // BLOCK], (rng.random(N * K // BLOCK) * 0.1 + 0.01).tolist())
    nodes = [
        helper.make_node("DequantizeLinear", ["w_q", "w_s"], ["w"], name="dq_w", axis=1, block_size=BLOCK),
        helper.make_node("Gemm", ["x", "w"], ["y"], name="gemm", transB=1),
    ]
    return _model(nodes, [w, s], opset=21)


def test_conv_and_gemm_layouts_pass_and_run():
    conv = conv_qdq_model()
    assert _run_ort(conv, x_shape=(1, 3, 8, 8)).shape == (1, 8, 8, 8)
    assert check_trt(conv, lint=False).violations == []
    gemm = gemm_int4_transb_model()
    assert _run_ort(gemm).shape == (2, N)
    assert check_trt(gemm, lint=False).violations == []
    conv.graph.node[2].attribute[0].i = 1  # per-channel on the Conv weight's input-channel axis
    conv.graph.initializer[0].dims[:] = [3, 8, 3, 3]  # keep the scale length consistent with axis 1
    assert ("qdq-axis", "dq_w") in _rules(check_trt(conv, lint=False))


def test_fake_quantized_float_weight_q_dq_conv():
    """pytorch-quantization style: float weight -> Q(per-channel, axis 0) -> DQ -> Conv; activation per-tensor."""
    m = conv_qdq_model()
    w = np.random.default_rng(5).standard_normal((8, 3, 3, 3)).astype(np.float32)
    m.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(w, "w_f"))
    m.graph.initializer.append(helper.make_tensor("w_zp", TP.INT8, [8], [0] * 8))
    m.graph.node.insert(2, helper.make_node("QuantizeLinear", ["w_f", "w_s", "w_zp"], ["w_q"], name="q_w", axis=0))
    assert _run_ort(m, x_shape=(1, 3, 8, 8)).shape == (1, 8, 8, 8)
    report = check_trt(m, lint=False)
    assert report.violations == [], report.rows()


def test_int4_on_activation_is_rejected():
    m = qdq_activation_model()
    for t in m.graph.initializer:
        if t.name == "x_zp":
            t.CopyFrom(helper.make_tensor("x_zp", TP.INT4, [], [0]))
    assert ("int4", "q_x") in _rules(check_trt(m, lint=False))


def test_contrib_op_inside_if_branch_and_local_function():
    fused = helper.make_node("FusedMatMul", ["x", "x"], ["z"], name="fused", domain="com.microsoft")
    inner = helper.make_graph([fused], "then", [], [helper.make_tensor_value_info("z", TP.FLOAT, None)])
    cond = helper.make_tensor("c", TP.BOOL, [], [True])
    if_node = helper.make_node("If", ["c"], ["y"], name="branch", then_branch=inner, else_branch=inner)
    fn = helper.make_function("local", "MyOp", ["a"], ["b"],
                              [helper.make_node("Unique", ["a"], ["b"], name="uniq_in_fn")],
                              [helper.make_opsetid("", 21)])
    call = helper.make_node("MyOp", ["x"], ["u"], name="call", domain="local")
    model = _model([if_node, call], [cond], extra_opsets=[helper.make_opsetid("local", 1)])
    model.functions.append(fn)
    rules = _rules(check_trt(model, lint=False))
    assert ("custom-domain", "fused") in rules and ("unsupported-op", "uniq_in_fn") in rules
    assert not any(node == "call" for _, node in rules)  # the local function call itself is fine


# ------------------------------------------------------------------------------------------ violations


def test_nonzero_zero_point_names_the_node():
    report = check_trt(int8_channel_model(zp_value=3), lint=False)
    assert not report.passed
    assert ("zero-point", "dq_w") in _rules(report)
    v = next(v for v in report.violations if v.rule == "zero-point")
    assert v.op_type == "DequantizeLinear" and "non-zero" in v.message


def test_matmulnbits_contrib_op_is_unsupported():
    w = helper.make_tensor("w_packed", TP.UINT8, [N, K // 32, 16], [0] * (N * K // 32 * 16))
    s = helper.make_tensor("w_s", TP.FLOAT, [N * K // 32], [0.01] * (N * K // 32))
    node = helper.make_node("MatMulNBits", ["x", "w_packed", "w_s"], ["y"], name="mm_nbits", domain="com.microsoft",
                            K=K, N=N, bits=4, block_size=32)
    model = _model([node], [w, s], extra_opsets=[helper.make_opsetid("com.microsoft", 1)])
    assert _run_ort(model).shape == (2, N)  # a valid ORT model, but not a TensorRT one
    report = check_trt(model, lint=False)
    assert not report.passed
    assert ("custom-domain", "mm_nbits") in _rules(report)


def test_uint8_dequantize_is_rejected():
    model = int8_channel_model(zp_value=0, q_type=TP.UINT8)
    assert _run_ort(model).shape == (2, N)  # fine for ORT
    report = check_trt(model, lint=False)
    assert ("qdq-dtype", "dq_w") in _rules(report)


def test_quantize_without_zero_point_defaults_to_uint8():
    m = qdq_activation_model()
    for n in m.graph.node[:2]:
        del n.input[2]
    report = check_trt(m, lint=False)
    assert ("qdq-dtype", "q_x") in _rules(report)


def test_wrong_per_channel_scale_length():
    report = check_trt(int8_channel_model(n_scale=N - 1), lint=False)
    assert ("qdq-scale", "dq_w") in _rules(report)


def test_per_channel_on_input_axis_of_matmul_weight():
    report = check_trt(int8_channel_model(axis=0, n_scale=K), lint=False)
    assert ("qdq-axis", "dq_w") in _rules(report)


def test_wrong_block_scale_shape():
    report = check_trt(int4_block_model(scale_shape=(K // BLOCK + 1, N)), lint=False)
    assert ("qdq-scale", "dq_w") in _rules(report)


def test_int4_blocks_along_output_axis():
    report = check_trt(int4_block_model(axis=1, block=8, scale_shape=(K, N // 8)), lint=False)
    assert ("int4", "dq_w") in _rules(report)


def test_int4_without_blocks():
    m = int4_block_model()
    dq = m.graph.node[0]
    for a in list(dq.attribute):
        dq.attribute.remove(a)
    dq.attribute.extend([helper.make_attribute("axis", 1)])
    m.graph.initializer[1].CopyFrom(helper.make_tensor("w_s", TP.FLOAT, [N], [0.01] * N))
    report = check_trt(m, lint=False)
    assert ("int4", "dq_w") in _rules(report)


def test_int4_block_size_outside_documented_set_is_a_warning():
    model = int4_block_model(block=32)
    assert _run_ort(model).shape == (2, N)
    report = check_trt(model, lint=False)
    assert report.passed
    assert ("int4-block-size", "dq_w") in _rules(report, "warning")


def test_block_quantization_needs_opset_21():
    report = check_trt(int4_block_model(opset=20), lint=False)
    assert ("block-opset", "dq_w") in _rules(report)


def test_opset_out_of_range():
    report = check_trt(int8_channel_model().__class__(), lint=False)  # empty model: no opset import
    assert ("opset", "") in _rules(report)
    m = int8_channel_model()
    m.opset_import[0].version = 8
    assert ("opset", "") in _rules(check_trt(m, lint=False))


def test_non_positive_scale():
    report = check_trt(int8_channel_model(scale_value=0.0), lint=False)
    assert ("qdq-scale", "dq_w") in _rules(report)


def test_unsupported_standard_op():
    node = helper.make_node("Unique", ["x"], ["y"], name="uniq")
    report = check_trt(_model([node], []), lint=False)
    assert ("unsupported-op", "uniq") in _rules(report)


# ------------------------------------------------------------------------------------------ dynamic dims


def test_dynamic_dims_are_warnings_and_profile_silences_them():
    model = int8_channel_model()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    report = check_trt(model, lint=False)
    assert report.passed
    warn = [v for v in report.warnings if v.rule == "dynamic-shape"]
    assert len(warn) == 1 and warn[0].node_name == "x" and "batch" in warn[0].message
    quiet = check_trt(model, profile={"x": ((1, K), (4, K), (16, K))}, lint=False)
    assert quiet.violations == []
    bad = check_trt(model, profile={"x": ((1, K), (4, K))}, lint=False)
    assert not bad.passed and bad.errors[0].rule == "profile"


# ------------------------------------------------------------------------------------------ files and output


def test_file_with_external_data(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(int8_channel_model(zp_value=5), str(path), save_as_external_data=True, size_threshold=0,
              location="m.data")
    report = check_trt(path, lint=False)
    assert report.model == str(path)
    assert ("zero-point", "dq_w") in _rules(report)


def test_unreadable_file_raises_user_error(tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"\x00not an onnx file\xff" * 3)
    with pytest.raises(UserError, match="broken.onnx"):
        check_trt(bad, lint=False)
    with pytest.raises(UserError, match="missing.onnx"):
        check_trt(tmp_path / "missing.onnx", lint=False)


def test_report_json_and_rows():
    report = check_trt(int8_channel_model(zp_value=1, q_type=TP.UINT8), lint=False)
    d = json.loads(json.dumps(report.to_dict()))
    assert d["passed"] is False and d["errors"] == len(report.errors) >= 2
    rows = report.rows()
    assert rows[0][0] == "error" and all(len(r) == 5 for r in rows)


@pytest.mark.skipif(not polygraphy_available(), reason="polygraphy (trt-tools extra) not installed")
def test_polygraphy_lint_runs_on_clean_graph():
    report = check_trt(int4_block_model(), lint=True)
    assert report.lint.startswith("ran"), report.lint
    assert report.passed, report.rows()


@pytest.mark.skipif(not polygraphy_available(), reason="polygraphy (trt-tools extra) not installed")
def test_polygraphy_lint_reports_invalid_graph():
    model = _model([helper.make_node("Relu", ["nope"], ["y"], name="r")], [], y_shape=(2, K))
    report = check_trt(model, lint=True)
    assert not report.passed
    assert any(v.rule == "polygraphy-lint" and "onnx_checker" in v.message for v in report.errors)


def test_lint_skips_gracefully(monkeypatch, tmp_path):
    import exporters.trt_rules as tr

    monkeypatch.setattr(tr, "polygraphy_available", lambda: False)
    report = check_trt(int4_block_model(), lint=True)
    assert report.lint.startswith("skipped: polygraphy not installed") and report.passed
    monkeypatch.setattr(tr, "polygraphy_available", lambda: True)
    monkeypatch.setattr(tr, "LINT_MAX_BYTES", 100)
    path = tmp_path / "m.onnx"
    onnx.save(int4_block_model(), str(path))
    report = check_trt(path, lint=True)
    assert report.lint.startswith("skipped: model is") and report.passed


def test_check_trt_cli_exits_1_on_a_nonzero_zero_point_and_0_on_the_clean_graph(tmp_path):
    from typer.testing import CliRunner

    from cli import app

    good, bad = tmp_path / "good.onnx", tmp_path / "bad.onnx"
    onnx.save(int8_channel_model(), str(good))
    onnx.save(int8_channel_model(zp_value=3), str(bad))
    ok = CliRunner().invoke(app, ["check-trt", str(good), "--no-lint"])
    assert ok.exit_code == 0, ok.output
    assert "PASS" in ok.stdout
    fail = CliRunner().invoke(app, ["check-trt", str(bad), "--no-lint", "--json"])
    assert fail.exit_code == 1
    assert any(v["rule"] == "zero-point" for v in json.loads(fail.stdout)["violations"])
    missing = CliRunner().invoke(app, ["check-trt", str(tmp_path / "none.onnx")])
    assert missing.exit_code == 2 and len(missing.stderr.strip().splitlines()) == 1
