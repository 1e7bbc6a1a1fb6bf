"""Static checker of TensorRT's ONNX rules: explicit quantization (Q/DQ), opset range, op support, dynamic dims.

`check_trt(model)` reads an ONNX file (or ModelProto) without TensorRT and lists what the TensorRT 10 ONNX parser
and builder would reject (severity 'error') or need extra input for (severity 'warning', e.g. an optimization profile
for symbolic dims). It is a pre-flight check, not a substitute for building an engine.

Sources (checked 2025/2026; quoted rules are paraphrased in the messages):
- onnx-tensorrt docs/operators.md, header "TensorRT 10.15 supports operators in the inclusive range of opset 9 to
  opset 24": the op list below, DequantizeLinear types INT8/FP8/FP4/INT4 with "`x_zero_point` must be zero",
  QuantizeLinear "`y_zero_point` must be 0", "UINT8 is only supported as network input or output tensor types",
  and "INT8, INT4, FP8 and FP4 are treated as Quantized Types ... only through quantization from a floating-point
  type".
- TensorRT C++ API, IQuantizeLayer / IDequantizeLayer: zero point must only contain zeros (symmetric quantization);
  scale is a scalar (per-tensor), 1-D (per-channel, length = size of the quantization axis) or the input's rank
  (block quantization, blocked along the last or second-to-last dim); all scale coefficients strictly positive;
  scale and zero point must be build-time constants.
- TensorRT operator reference, Dequantize: block quantization (2-D scale) is supported for INT4 only (and FP4 in
  TensorRT >= 10.8).
- TensorRT developer guide, "Working with Quantized Types" / "Quantization Schemes": INT4 is weight-only; "INT4
  quantization requires per-block scales. The supported block sizes are {64, 128}. The block dimension should be
  one of the last two dimensions." Activations are quantized per-tensor; weights per-channel along the output
  channel (Conv K = axis 0, ConvTranspose axis 1, MatMul/Gemm the N axis).
- ONNX operator spec: blocked quantization (`block_size`) exists from DequantizeLinear/QuantizeLinear opset 21;
  QuantizeLinear without zero point and without `output_dtype` produces uint8.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from compress.errors import UserError

# TensorRT 10.15 ONNX parser (onnx-tensorrt docs/operators.md, rows marked "Y").
TRT_VERSION = "10.15"
TRT_MIN_OPSET = 9
TRT_MAX_OPSET = 24
TRT_SUPPORTED_OPS: frozenset[str] = frozenset(
    """
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool BatchNormalization
    BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum
    DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor
    Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual
    GridSample GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish Hardmax Identity If ImageScaler
    InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM
    LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression
    NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike
    RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax
    ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RMSNormalization
    RNN RoiAlign RotaryEmbedding Round STFT ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink
    Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh
    TensorScatter ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
    """.split()  # noqa: SIM905
)
# Rows marked "N" in the same table (named in the message so the user knows it is a known gap, not a typo).
TRT_UNSUPPORTED_OPS: frozenset[str] = frozenset(
    """
    AffineGrid Bernoulli BitShift BitwiseAnd BitwiseNot BitwiseOr BitwiseXor Col2Im CenterCropPad Compress
    ConcatFromSequence ConvInteger DFT Det DynamicQuantizeLinear ImageDecoder MatMulInteger MaxRoiPool MaxUnpool
    MelWeightMatrix Multinomial NegativeLogLikelihoodLoss Optional OptionalGetElement OptionalHasElement QLinearConv
    QLinearMatMul RegexFullMatch SequenceAt SequenceConstruct SequenceEmpty SequenceErase SequenceInsert
    SequenceLength SequenceMap SoftmaxCrossEntropyLoss SplitToSequence StringConcat StringNormalizer StringSplit
    TfIdfVectorizer Unique
    """.split()  # noqa: SIM905
)
_ONNX_DOMAINS = ("", "ai.onnx")
# Quantized element types TensorRT accepts in Q/DQ (uint8 is not one: IO tensors only).
_QUANT_TYPES: dict[int, str] = {
    TensorProto.INT8: "int8",
    TensorProto.INT4: "int4",
    TensorProto.FLOAT8E4M3FN: "fp8 e4m3",
    TensorProto.FLOAT4E2M1: "fp4 e2m1",
}
_BLOCK_TYPES = (TensorProto.INT4, TensorProto.FLOAT4E2M1)
INT4_BLOCK_SIZES = (64, 128)
# Network input/output element types TensorRT can bind (quantized types only via Q, double cast down to float).
_IO_TYPES = {
    TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE, TensorProto.INT32,
    TensorProto.INT64, TensorProto.UINT8, TensorProto.BOOL,
}
# Ops a weight may pass through between its DQ and the GEMM/conv that consumes it.
_PASS_THROUGH = {"Transpose", "Reshape", "Identity", "Cast", "Squeeze", "Unsqueeze", "Flatten"}
_WEIGHT_CONSUMERS = {"MatMul", "Gemm", "Conv", "ConvTranspose"}
LINT_MAX_BYTES = 2 * 1024**3


@dataclass
class Violation:
    """One finding: which rule, on which node, and why; severity 'error' fails the check, 'warning' does not."""

    rule: str
    node_name: str
    op_type: str
    message: str
    severity: str = "error"


@dataclass
class TrtReport:
    """Result of `check_trt`: the findings and, when polygraphy ran, its lint summary."""

    model: str
    opset: int | None
    trt_version: str = TRT_VERSION
    violations: list[Violation] = field(default_factory=list)
    lint: str = "not run"

    @property
    def errors(self) -> list[Violation]:
        """Findings that TensorRT would reject."""
        return [v for v in self.violations if v.severity == "error"]

    @property
    def warnings(self) -> list[Violation]:
        """Findings that need attention (e.g. an optimization profile) but do not fail the check."""
        return [v for v in self.violations if v.severity != "error"]

    @property
    def passed(self) -> bool:
        """True when no finding has severity 'error'."""
        return not self.errors

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return {
            "model": self.model,
            "passed": self.passed,
            "opset": self.opset,
            "trt_version": self.trt_version,
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "lint": self.lint,
            "violations": [asdict(v) for v in self.violations],
        }

    def rows(self) -> list[list[str]]:
        """Table rows (severity, rule, node, op, message), errors first; the header is `ROW_HEADER`."""
        ordered = sorted(self.violations, key=lambda v: v.severity != "error")
        return [[v.severity, v.rule, v.node_name, v.op_type, v.message] for v in ordered]


ROW_HEADER = ["severity", "rule", "node", "op", "message"]


# --------------------------------------------------------------------------------------------------- loading


def _load(model: str | os.PathLike | onnx.ModelProto) -> tuple[onnx.ModelProto, str, Path | None]:
    if isinstance(model, onnx.ModelProto):
        return model, model.graph.name or "<ModelProto>", None
    path = Path(model)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises several types (DecodeError, OSError, ValueError)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{path}: not a readable ONNX model ({reason})") from None
    return proto, str(path), path.parent


class _Graph:
    """Name lookups over one graph: constants, producers, consumers, value types/shapes."""

    def __init__(self, graph: onnx.GraphProto, base_dir: Path | None, outer: _Graph | None = None):
        self.graph = graph
        self.base_dir = base_dir
        self.consts: dict[str, TensorProto] = dict(outer.consts) if outer else {}
        self.types: dict[str, tuple[int, list]] = dict(outer.types) if outer else {}
        for init in graph.initializer:
            self.consts[init.name] = init
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        for node in graph.node:
            for out in node.output:
                self.producer[out] = node
            for i, name in enumerate(node.input):
                if name:
                    self.consumers.setdefault(name, []).append((node, i))
            if node.op_type == "Constant" and node.domain in _ONNX_DOMAINS and node.output:
                for attr in node.attribute:
                    if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                        self.consts[node.output[0]] = attr.t
        for vi in [*graph.input, *graph.value_info, *graph.output]:
            t = vi.type.tensor_type
            if vi.type.HasField("tensor_type"):
                dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
                self.types[vi.name] = (t.elem_type, dims if t.HasField("shape") else None)

    def const_array(self, name: str) -> np.ndarray | None:
        """Value of a constant input (loading external data for this tensor only), or None."""
        t = self.consts.get(name)
        if t is None:
            return None
        if t.data_location == TensorProto.EXTERNAL:
            if self.base_dir is None:
                return None
            from onnx.external_data_helper import load_external_data_for_tensor

            t2 = TensorProto()
            t2.CopyFrom(t)
            try:
                load_external_data_for_tensor(t2, str(self.base_dir))
            except OSError:
                return None
            t = t2
        try:
            return numpy_helper.to_array(t)
        except Exception:
            return None

    def elem_type(self, name: str) -> int | None:
        if name in self.consts:
            return self.consts[name].data_type
        if name in self.types:
            return self.types[name][0]
        return None

    def shape(self, name: str) -> list | None:
        if name in self.consts:
            return list(self.consts[name].dims)
        if name in self.types:
            return self.types[name][1]
        return None


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _node_label(node: onnx.NodeProto) -> str:
    return node.name or (f"<{node.op_type} -> {node.output[0]}>" if node.output else f"<{node.op_type}>")


def _dtype_name(t: int | None) -> str:
    if t is None:
        return "unknown"
    return _QUANT_TYPES.get(t) or TensorProto.DataType.Name(t).lower()


# --------------------------------------------------------------------------------------------------- rules


def _default_opset(model: onnx.ModelProto) -> int | None:
    for imp in model.opset_import:
        if imp.domain in _ONNX_DOMAINS:
            return imp.version
    return None


def _check_opset(model: onnx.ModelProto, out: list[Violation]) -> int | None:
    opset = _default_opset(model)
    if opset is None:
        out.append(Violation("opset", "", "", "model imports no default ONNX opset (ai.onnx)"))
    elif not TRT_MIN_OPSET <= opset <= TRT_MAX_OPSET:
        out.append(Violation(
            "opset", "", "",
            f"opset {opset} is outside TensorRT {TRT_VERSION}'s supported range {TRT_MIN_OPSET}..{TRT_MAX_OPSET}",
        ))
    return opset


def _check_ops(g: _Graph, functions: Mapping[tuple[str, str], onnx.FunctionProto], out: list[Violation]) -> None:
    for node in g.graph.node:
        label = _node_label(node)
        if node.domain not in _ONNX_DOMAINS:
            if (node.domain, node.op_type) in functions:  # model-local functions are inlined by the parser
                continue
            hint = " (an ONNX Runtime contrib op)" if node.domain == "com.microsoft" else ""
            out.append(Violation(
                "custom-domain", label, node.op_type,
                f"op {node.domain}::{node.op_type}{hint} is not an ONNX standard op; TensorRT has no importer for it "
                "(needs a TensorRT plugin)",
            ))
        elif node.op_type not in TRT_SUPPORTED_OPS:
            why = "marked unsupported" if node.op_type in TRT_UNSUPPORTED_OPS else "not listed"
            out.append(Violation(
                "unsupported-op", label, node.op_type,
                f"{node.op_type} is {why} in the TensorRT {TRT_VERSION} ONNX operator support matrix",
            ))


def _weight_consumer(g: _Graph, name: str) -> tuple[onnx.NodeProto, int, bool] | None:
    """The GEMM/conv consuming `name` (through pass-through ops), its input index, and whether the path was direct."""
    direct = True
    seen = 0
    while seen < 8:
        seen += 1
        users = g.consumers.get(name, [])
        if len(users) != 1:
            for node, idx in users:
                if node.op_type in _WEIGHT_CONSUMERS:
                    return node, idx, direct
            return None
        node, idx = users[0]
        if node.op_type in _WEIGHT_CONSUMERS:
            return node, idx, direct
        if node.op_type not in _PASS_THROUGH or not node.output:
            return None
        if node.op_type not in ("Identity", "Cast"):
            direct = False
        name = node.output[0]
    return None


def _channel_axis(consumer: onnx.NodeProto, rank: int) -> int | None:
    """Output-channel axis of the weight input of a GEMM/conv (per-channel scales go along it)."""
    if consumer.op_type == "MatMul":
        return rank - 1
    if consumer.op_type == "Gemm":
        return 0 if _attr(consumer, "transB", 0) else 1
    if consumer.op_type == "Conv":
        return 0
    if consumer.op_type == "ConvTranspose":
        return 1
    return None


def _reduction_axis(consumer: onnx.NodeProto, rank: int) -> int | None:
    """Input-channel (K) axis of the weight input of a GEMM (INT4 blocks run along it)."""
    if consumer.op_type == "MatMul":
        return rank - 2
    if consumer.op_type == "Gemm":
        return 1 if _attr(consumer, "transB", 0) else 0
    return None


def _q_type(g: _Graph, node: onnx.NodeProto) -> int | None:
    """Quantized element type of a Q's output or a DQ's input."""
    if node.op_type == "QuantizeLinear":
        out_dtype = _attr(node, "output_dtype", 0)
        if out_dtype:
            return out_dtype
        if len(node.input) > 2 and node.input[2]:
            return g.elem_type(node.input[2])
        return TensorProto.UINT8  # ONNX default when neither zero point nor output_dtype is given
    t = g.elem_type(node.input[0])
    if t is None and node.input[0] in g.producer and g.producer[node.input[0]].op_type == "QuantizeLinear":
        t = _q_type(g, g.producer[node.input[0]])
    if t is None and len(node.input) > 2 and node.input[2]:
        t = g.elem_type(node.input[2])
    return t


def _check_qdq_node(g: _Graph, node: onnx.NodeProto, opset: int | None, out: list[Violation]) -> None:
    label, op = _node_label(node), node.op_type
    is_dq = op == "DequantizeLinear"

    def bad(rule: str, msg: str, severity: str = "error") -> None:
        out.append(Violation(rule, label, op, msg, severity))

    if len(node.input) < 2:
        bad("qdq-scale", "missing scale input")
        return
    x, scale_name = node.input[0], node.input[1]
    zp_name = node.input[2] if len(node.input) > 2 else ""
    qtype = _q_type(g, node)

    # quantized element type
    if qtype is not None and qtype not in _QUANT_TYPES:
        bad("qdq-dtype", f"quantized type {_dtype_name(qtype)} is not supported by TensorRT Q/DQ "
                         f"(allowed: {', '.join(_QUANT_TYPES.values())}; uint8 is for network I/O only)"
                         + ("; set output_dtype or an int8 zero point" if qtype == TensorProto.UINT8
                            and not is_dq and not zp_name else ""))

    # zero point: absent or all zeros, build-time constant
    if zp_name:
        zp = g.const_array(zp_name)
        if zp is None:
            bad("zero-point", f"zero point '{zp_name}' is not a build-time constant (TensorRT needs all-zero)")
        elif np.any(zp.astype(np.float32) != 0):
            nz = int(np.count_nonzero(zp.astype(np.float32)))
            bad("zero-point", f"zero point '{zp_name}' has {nz} non-zero value(s); TensorRT supports symmetric "
                              "quantization only (zero point absent or all zeros)")

    # scale: constant, positive, finite
    scale_shape = g.shape(scale_name)
    scale = g.const_array(scale_name)
    if scale_name not in g.consts:
        bad("qdq-scale", f"scale '{scale_name}' is not a build-time constant")
    elif scale is not None:
        s = scale.astype(np.float32)
        if not np.all(np.isfinite(s)):
            bad("qdq-scale", f"scale '{scale_name}' has non-finite values")
        elif np.any(s <= 0):
            bad("qdq-scale", f"scale '{scale_name}' has {int(np.count_nonzero(s <= 0))} value(s) <= 0; "
                             "TensorRT requires strictly positive scales")

    # granularity
    x_is_const = x in g.consts
    x_shape = g.shape(x)
    src_q = g.producer.get(x) if is_dq else None
    src_q = src_q if src_q is not None and src_q.op_type == "QuantizeLinear" else None
    # a weight: a constant, or (for a DQ) the output of a Q whose input is a constant (fake-quantized weight)
    is_weight = x_is_const or (src_q is not None and src_q.input[0] in g.consts)
    if x_shape is None and src_q is not None:
        x_shape = g.shape(src_q.input[0])
    rank = len(x_shape) if x_shape is not None else None
    axis = _attr(node, "axis", 1)
    if rank:
        axis = axis + rank if axis < 0 else axis
    block_size = _attr(node, "block_size", 0) or 0
    follow = node.output[0] if node.output else ""
    if not is_dq:  # Q: the weight consumer sits behind the paired DQ
        dqs = [n for n, _ in g.consumers.get(follow, []) if n.op_type == "DequantizeLinear"]
        follow = dqs[0].output[0] if dqs and dqs[0].output else ""
    consumer = _weight_consumer(g, follow) if follow and is_weight else None
    srank = len(scale_shape) if scale_shape is not None else None

    if block_size:
        if opset is not None and opset < 21:
            bad("block-opset", f"block_size={block_size} (blocked quantization) needs opset >= 21, model has {opset}")
        if qtype is not None and qtype not in _BLOCK_TYPES:
            bad("qdq-block", f"block quantization is supported for int4/fp4 only, not {_dtype_name(qtype)}")
        if srank is not None and rank is not None and srank != rank:
            bad("qdq-scale", f"block-quantized scale must have the input's rank {rank}, got shape {scale_shape}")
        elif scale_shape is not None and x_shape is not None and None not in x_shape:
            want = list(x_shape)
            want[axis] = math.ceil(x_shape[axis] / block_size)
            if list(scale_shape) != want:
                bad("qdq-scale", f"block scale shape {list(scale_shape)} does not match input {list(x_shape)} with "
                                 f"block_size={block_size} on axis {axis} (expected {want})")
        if rank is not None and axis not in (rank - 1, rank - 2):
            bad("qdq-block", f"blocked axis {axis} must be one of the last two dims of the rank-{rank} input")
    elif srank is not None and srank >= 2:
        bad("qdq-scale", f"scale shape {list(scale_shape)}: rank >= 2 needs block_size (block quantization); "
                         "per-tensor is a scalar, per-channel a 1-D tensor")
    elif srank == 1 and scale_shape[0] != 1:
        if not is_weight:
            bad("qdq-scale", f"per-channel scale {list(scale_shape)} on an activation; TensorRT quantizes "
                             "activations per-tensor (scalar scale)")
        if x_shape is not None and rank and x_shape[axis] is not None and scale_shape[0] != x_shape[axis]:
            bad("qdq-scale", f"per-channel scale length {scale_shape[0]} != input dim {x_shape[axis]} on axis {axis}")
        if consumer is not None and consumer[2] and consumer[1] == 1 and rank:
            want_axis = _channel_axis(consumer[0], rank)
            if want_axis is not None and axis != want_axis:
                bad("qdq-axis", f"per-channel axis {axis} is not the output-channel axis {want_axis} of the weight "
                                f"of {consumer[0].op_type} '{_node_label(consumer[0])}'")

    # INT4: weight-only, blocked DequantizeLinear on a constant 2-D weight feeding a GEMM
    if qtype == TensorProto.INT4:
        if not is_weight:
            bad("int4", f"int4 {op} input '{x}' is not a constant weight; TensorRT supports int4 for weight-only "
                        "quantization (store the weight as an int4 initializer feeding a DequantizeLinear)")
        if not block_size:
            bad("int4", f"int4 {op} must be block-quantized (block_size attribute, 2-D scales)")
        if is_dq:
            if rank is not None and rank != 2:
                bad("int4", f"int4 weight must be 2-D, got rank {rank}")
            if block_size and block_size not in INT4_BLOCK_SIZES:
                bad("int4-block-size", f"block_size={block_size}: TensorRT documents int4 block sizes "
                                       f"{list(INT4_BLOCK_SIZES)}; other sizes may fail to build", "warning")
            if block_size and consumer is not None and consumer[2] and consumer[1] == 1 and rank:
                want_axis = _reduction_axis(consumer[0], rank)
                if want_axis is not None and axis != want_axis:
                    bad("int4", f"int4 blocks run along axis {axis}; they must run along the input (K) axis "
                                f"{want_axis} of the weight of {consumer[0].op_type} '{_node_label(consumer[0])}'")

    # placement: Q must feed DQ; DQ must read a constant or a Q; weight DQ should feed a GEMM/conv
    if not is_dq:
        users = g.consumers.get(node.output[0], []) if node.output else []
        if not users and node.output and node.output[0] not in {o.name for o in g.graph.output}:
            bad("qdq-pair", "QuantizeLinear output is unused", "warning")
        for n, _ in users:
            if n.op_type != "DequantizeLinear":
                bad("qdq-pair", f"QuantizeLinear output feeds {n.op_type} '{_node_label(n)}'; TensorRT needs each "
                                "Q to be followed by a DequantizeLinear")
                break
    else:
        src = g.producer.get(x)
        if not x_is_const and (src is None or src.op_type != "QuantizeLinear"):
            where = f"{src.op_type} '{_node_label(src)}'" if src is not None else "a graph input"
            bad("qdq-pair", f"DequantizeLinear input '{x}' comes from {where}; TensorRT needs a constant weight or "
                            "a QuantizeLinear output (quantized types exist only inside Q/DQ)")
        if is_weight and consumer is None and qtype != TensorProto.INT4:
            bad("qdq-placement", "dequantized weight does not feed MatMul/Gemm/Conv/ConvTranspose; TensorRT will "
                                 "not run a quantized kernel for it", "warning")
        if is_weight and consumer is None and qtype == TensorProto.INT4:
            bad("qdq-placement", "int4 weight does not feed MatMul/Gemm; TensorRT's int4 weight-only quantization "
                                 "targets GEMMs", "warning")


def _check_io(g: _Graph, profile: Mapping[str, tuple] | None, out: list[Violation]) -> None:
    profile = dict(profile or {})
    for vi in g.graph.input:
        if vi.name in g.consts:  # old-style initializers listed as inputs
            continue
        t = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and t.elem_type not in _IO_TYPES:
            out.append(Violation("io-dtype", vi.name, "<input>",
                                 f"input type {_dtype_name(t.elem_type)} cannot be a TensorRT network input"))
        if not vi.type.HasField("tensor_type") or not t.HasField("shape"):
            out.append(Violation("dynamic-shape", vi.name, "<input>",
                                 "input has no shape (rank unknown); TensorRT needs at least the rank", "warning"))
            continue
        dims = list(t.shape.dim)
        dyn = [(i, d.dim_param or "?") for i, d in enumerate(dims) if not d.HasField("dim_value")]
        if vi.name in profile:
            _check_profile_entry(vi.name, dims, profile.pop(vi.name), out)
        elif dyn:
            names = ", ".join(f"dim {i} '{p}'" for i, p in dyn)
            out.append(Violation("dynamic-shape", vi.name, "<input>",
                                 f"symbolic dims ({names}): build needs an optimization profile (min/opt/max)",
                                 "warning"))
    for name in profile:
        out.append(Violation("profile", name, "<input>", "profile names an input the model does not have"))
    for vi in g.graph.output:
        t = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and t.elem_type and t.elem_type not in _IO_TYPES:
            out.append(Violation("io-dtype", vi.name, "<output>",
                                 f"output type {_dtype_name(t.elem_type)} cannot be a TensorRT network output"))


def _check_profile_entry(name: str, dims: list, bounds: tuple, out: list[Violation]) -> None:
    try:
        lo, opt, hi = (list(b) for b in bounds)
    except (TypeError, ValueError):
        out.append(Violation("profile", name, "<input>", "profile entry must be (min, opt, max) shapes"))
        return
    if not len(lo) == len(opt) == len(hi) == len(dims):
        out.append(Violation("profile", name, "<input>", f"profile shapes must have the input's rank {len(dims)}"))
        return
    for i, d in enumerate(dims):
        a, b, c = lo[i], opt[i], hi[i]
        if not 0 <= a <= b <= c:
            out.append(Violation("profile", name, "<input>", f"dim {i}: need 0 <= min <= opt <= max, got {a},{b},{c}"))
        elif d.HasField("dim_value") and not a == b == c == d.dim_value:
            out.append(Violation("profile", name, "<input>", f"dim {i} is static {d.dim_value}; profile gives "
                                                             f"{a},{b},{c}"))


def _subgraphs(node: onnx.NodeProto) -> Iterable[onnx.GraphProto]:
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            yield from a.graphs


def _walk(g: _Graph, opset: int | None, functions: Mapping, out: list[Violation]) -> None:
    _check_ops(g, functions, out)
    for node in g.graph.node:
        if node.domain in _ONNX_DOMAINS and node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            _check_qdq_node(g, node, opset, out)
        for sub in _subgraphs(node):
            _walk(_Graph(sub, g.base_dir, outer=g), opset, functions, out)


# --------------------------------------------------------------------------------------------------- polygraphy


def polygraphy_available() -> bool:
    """True when polygraphy and onnx-graphsurgeon (the `trt-tools` extra) are importable."""
    try:
        import onnx_graphsurgeon  # noqa: F401
        import polygraphy  # noqa: F401
    except ImportError:
        return False
    return True


def _run_lint(model: onnx.ModelProto, path: Path | None, src: str, timeout: float) -> tuple[str, list[Violation]]:
    """Run `polygraphy check lint` in a subprocess; return a status line and its findings."""
    import json

    if not polygraphy_available():
        return "skipped: polygraphy not installed (pip install 'compress[trt-tools]')", []
    size = model.ByteSize() if path is None else _model_bytes(model, path)
    if size > LINT_MAX_BYTES:
        return f"skipped: model is {size / 1024**3:.1f} GB (> 2 GB)", []
    with tempfile.TemporaryDirectory(prefix="trt_lint_") as tmp:
        model_file = Path(src) if path is not None else Path(tmp) / "model.onnx"
        if path is None:
            onnx.save(model, str(model_file))
        report_file = Path(tmp) / "lint.json"
        cmd = [sys.executable, "-c", "import sys; from polygraphy.tools import main; sys.exit(main())",
               "check", "lint", str(model_file), "-o", str(report_file)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return f"skipped: polygraphy lint timed out after {timeout:.0f}s", []
        if not report_file.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            return f"failed: polygraphy lint wrote no report ({tail[0][:200]})", []
        data = json.loads(report_file.read_text())
    found = []
    for entry in data.get("lint_entries", []):
        source = str(entry.get("source", ""))
        # 'exception' from the ONNX checker/loader means an invalid model; an ONNX Runtime failure alone does not
        # prove TensorRT fails (different kernels), so it is reported as a warning.
        level = "error" if entry.get("level") == "exception" and source != "onnxruntime" else "warning"
        msg = " ".join(str(entry.get("message", "")).split())[:500]
        nodes = entry.get("nodes") or [""]
        for n in nodes:
            found.append(Violation("polygraphy-lint", n, "", f"[{source}] {msg}" if source else msg, level))
    summary = data.get("summary", {})
    status = f"ran: {len(summary.get('passing', []))} nodes passing, {len(summary.get('failing', []))} failing"
    return status, found


def _model_bytes(model: onnx.ModelProto, path: Path) -> int:
    """Size of an ONNX file plus the external-data files its initializers point to."""
    total = path.stat().st_size
    locations = {
        e.value for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL
        for e in t.external_data if e.key == "location"
    }
    return total + sum((path.parent / loc).stat().st_size for loc in locations if (path.parent / loc).exists())


# --------------------------------------------------------------------------------------------------- entry point


def check_trt(
    model: str | os.PathLike | onnx.ModelProto,
    profile: Mapping[str, tuple] | None = None,
    lint: bool | None = None,
    lint_timeout: float = 600.0,
) -> TrtReport:
    """Check an ONNX model against TensorRT's explicit-quantization rules, opset range and op support.

    `profile` maps input name -> (min, opt, max) shapes and silences its dynamic-dim warning; `lint=True` (or None:
    when installed) also runs polygraphy's ONNX lint (ONNX checker + ONNX Runtime) and adds its findings.
    """
    proto, src, base_dir = _load(model)
    out: list[Violation] = []
    opset = _check_opset(proto, out)
    functions = {(f.domain, f.name): f for f in proto.functions}
    root = _Graph(proto.graph, base_dir)
    _walk(root, opset, functions, out)
    for f in proto.functions:  # local functions are inlined by the parser: their bodies must be supported too
        fg = onnx.helper.make_graph(list(f.node), f.name, [], [])
        _walk(_Graph(fg, base_dir, outer=root), opset, functions, out)
    _check_io(root, profile, out)
    report = TrtReport(model=src, opset=opset, violations=out)
    if lint or (lint is None and polygraphy_available()):
        report.lint, found = _run_lint(proto, None if base_dir is None else Path(src), src, lint_timeout)
        report.violations.extend(found)
    return report
