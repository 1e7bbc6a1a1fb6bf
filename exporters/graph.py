"""Small ONNX helpers shared by the graph rewriters: loading, atomic saving, matching weights by value, records,
and running a decoder graph (prefill + decode with KV cache) in ONNX Runtime."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from compress.errors import UserError

TWO_GB = 2**31 - 1
MS_DOMAIN = "com.microsoft"
MATCH_ATOL = 1e-6


@dataclass
class RewriteRecord:
    """What a graph rewrite did: layers rewritten (name → how), bits histogram, weight bytes, notes."""

    kind: str
    layers: dict[str, str] = field(default_factory=dict)
    bits: dict[str, int] = field(default_factory=dict)
    weight_bytes_before: int = 0
    weight_bytes_after: int = 0
    shared: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    requantized: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    opset: int = 0
    out_path: str = ""
    check: dict[str, float] = field(default_factory=dict)  # max |Δlogit| vs the float graph, when asked for

    def count_bits(self, label: str) -> None:
        """Add one layer to the histogram under `label` (e.g. '4' or '3→4')."""
        self.bits[label] = self.bits.get(label, 0) + 1

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return asdict(self)


def load_model(model: onnx.ModelProto | str | Path) -> onnx.ModelProto:
    """A ModelProto with its external data (model.onnx_data) loaded into memory; protos are copied, not mutated."""
    if isinstance(model, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return copy
    path = Path(model)
    if path.is_dir():
        path = path / "model.onnx"
    if not path.is_file():
        raise UserError(f"ONNX model not found: {path}")
    return onnx.load(str(path), load_external_data=True)


def save_model_atomic(model: onnx.ModelProto, out_path: Path | str) -> Path:
    """Write `model` to `out_path` through a temporary sibling; external data (`<name>_data`) only above 2 GB."""
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    big = model.ByteSize() > TWO_GB
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        data_name = f"{out.name}_data"
        if big:
            onnx.save_model(model, str(tmp / out.name), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
        else:
            onnx.save_model(model, str(tmp / out.name))
        for f in sorted(tmp.iterdir(), key=lambda p: p.name == out.name):  # data first, the .onnx last
            os.chmod(f, 0o644)
            os.replace(f, out.parent / f.name)
        stale = out.parent / data_name
        if not big and stale.exists():  # left by an earlier, larger write of the same name
            stale.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Top-level initializers by name."""
    return {t.name: t for t in model.graph.initializer}


def tensor_bytes(t: onnx.TensorProto) -> int:
    """Bytes of an initializer's payload."""
    if t.raw_data:
        return len(t.raw_data)
    return numpy_helper.to_array(t).nbytes


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of initializers of rank ≥ 2 (weight matrices, tables, scales, zero points; not norms or shapes)."""
    return sum(tensor_bytes(t) for t in model.graph.initializer if len(t.dims) >= 2)


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """Tensor name → node writing it."""
    return {o: node for node in model.graph.node for o in node.output}


def constant_of(model: onnx.ModelProto, name: str, inits: dict, prods: dict) -> tuple[str, bool] | None:
    """The initializer behind tensor `name` and whether it is seen transposed (through one 2-D Transpose node)."""
    if name in inits:
        return name, False
    node = prods.get(name)
    if node is not None and node.op_type == "Transpose" and node.input[0] in inits:
        perm = [a.ints for a in node.attribute if a.name == "perm"]
        if not perm or list(perm[0]) == [1, 0]:
            return node.input[0], True
    return None


@dataclass
class WeightSite:
    """One MatMul/Gather reading a constant weight that matched a quantized module."""

    module: str
    node: onnx.NodeProto
    init: str
    stored_out_in: bool  # the initializer as stored is [out, in] (the artifact's layout) rather than [in, out]
    via_transpose: bool  # a MatMul reads it through a Transpose node


def _fingerprint(a: np.ndarray) -> np.ndarray:
    """A strided 8×8 sample (no copy of the whole matrix, even for a transposed view)."""
    return a[:: max(1, a.shape[0] // 8), :: max(1, a.shape[1] // 8)]


def _equal(arr: np.ndarray, w: np.ndarray, fp: np.ndarray) -> bool:
    if float(np.abs(_fingerprint(arr) - fp).max(initial=0.0)) > MATCH_ATOL:
        return False
    return bool(np.array_equal(arr, w) or float(np.abs(arr - w).max(initial=0.0)) <= MATCH_ATOL)


def match_weights(model: onnx.ModelProto, linears: dict[str, np.ndarray],
                  gathers: dict[str, np.ndarray] | None = None) -> list[WeightSite]:
    """Find, by value, the MatMul/Gemm reading each of `linears` and the Gather reading each of `gathers` ([out, in]).

    An initializer matches when it equals the weight exactly or within 1e-6: a MatMul reads [in, out] directly or
    [out, in] through a Transpose; a Gather reads the [rows, dim] table. Each module must match exactly one
    initializer (one may feed several nodes); otherwise UserError naming the modules.
    """
    gathers = gathers or {}
    inits = initializers(model)
    prods = producers(model)
    shapes: dict[tuple, list[str]] = {}
    for name, w in linears.items():
        shapes.setdefault(("mm", *w.shape), []).append(name)
    for name, w in gathers.items():
        shapes.setdefault(("gather", *w.shape), []).append(name)
    fps = {n: _fingerprint(w) for n, w in [*linears.items(), *gathers.items()]}
    sites: list[WeightSite] = []
    for node in model.graph.node:
        if node.op_type == "MatMul" and len(node.input) == 2:
            src = constant_of(model, node.input[1], inits, prods)
            kind, table = "mm", linears
        elif node.op_type == "Gemm" and plain_gemm(node):
            src = constant_of(model, node.input[1], inits, prods)
            if src is not None and _attr(node, "transB", 0):
                src = (src[0], not src[1])
            kind, table = "mm", linears
        elif node.op_type == "Gather" and node.input[0] in inits:
            src, kind, table = (node.input[0], True), "gather", gathers
        else:
            continue
        if src is None:
            continue
        init, stored_out_in = src
        t = inits[init]
        if t.data_type != onnx.TensorProto.FLOAT or len(t.dims) != 2:
            continue
        dims = tuple(t.dims) if stored_out_in else tuple(t.dims)[::-1]
        names = shapes.get((kind, *dims), [])
        if not names:
            continue
        arr = numpy_helper.to_array(t)
        arr = arr if stored_out_in else arr.T
        for mod in names:
            if _equal(arr, table[mod], fps[mod]):
                sites.append(WeightSite(mod, node, init, stored_out_in, node.input[1] not in inits))
    _check_unique(list(linears) + list(gathers), sites)
    return sites


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def plain_gemm(node: onnx.NodeProto) -> bool:
    """A Gemm that is x·B (+ C): transA 0, alpha 1, beta 1 (as torch.addmm / Linear export it)."""
    return (len(node.input) >= 2 and not _attr(node, "transA", 0) and _attr(node, "alpha", 1.0) == 1.0
            and _attr(node, "beta", 1.0) == 1.0)


def _check_unique(modules: list[str], sites: list[WeightSite]) -> None:
    inits_of: dict[str, set[str]] = {}
    per_node = Counter()
    for s in sites:
        inits_of.setdefault(s.module, set()).add(s.init)
        per_node[id(s.node)] += 1
    missing = [m for m in modules if m not in inits_of]
    if missing:
        raise UserError(f"{len(missing)} quantized module(s) not found by value in the ONNX graph: "
                        f"{', '.join(missing[:6])}{' …' if len(missing) > 6 else ''} — export the float graph from "
                        "this artifact's dequantized_copy (weights must equal the dequantized codes to 1e-6)")
    twice = {m for m, i in inits_of.items() if len(i) > 1} | {s.module for s in sites if per_node[id(s.node)] > 1}
    if twice:
        raise UserError(f"quantized module(s) matched more than once in the ONNX graph: {', '.join(sorted(twice)[:6])}"
                        " (identical weights?); cannot tell which codes belong where")


def replace_node(model: onnx.ModelProto, old: onnx.NodeProto, new: list[onnx.NodeProto]) -> None:
    """Swap `old` (found by its outputs, unique in a graph) for `new` at the same position."""
    nodes = model.graph.node
    outs = list(old.output)
    for i, n in enumerate(nodes):
        if n is old or (n.output and n.output[0] == outs[0] and list(n.output) == outs):
            del nodes[i]
            for j, m in enumerate(new):
                nodes.insert(i + j, m)
            return
    raise RuntimeError(f"node {old.name} not in graph")


def drop_dead_nodes(model: onnx.ModelProto) -> None:
    """Remove nodes whose outputs nothing reads (e.g. a Transpose that fed a rewritten MatMul, or a whole attention
    subgraph replaced by one fused node): one walk back from the graph outputs over the topologically sorted nodes."""
    g = model.graph
    needed = {o.name for o in g.output}
    alive = []
    for n in reversed(list(g.node)):
        if any(o in needed for o in n.output):
            alive.append(n)
            needed.update(n.input)
            for a in n.attribute:  # subgraphs (If/Loop) read outer names too
                if a.type == onnx.AttributeProto.GRAPH:
                    needed.update(i for sn in a.g.node for i in sn.input)
    alive.reverse()
    del g.node[:]
    g.node.extend(alive)


def drop_unused_initializers(model: onnx.ModelProto) -> list[str]:
    """Remove initializers no node (or graph output) reads; returns their names."""
    used = {i for n in model.graph.node for i in n.input}
    used |= {o.name for o in model.graph.output}
    for n in model.graph.node:  # subgraphs (If/Loop) read outer names too
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                used |= {i for sn in a.g.node for i in sn.input}
    dead = [t.name for t in model.graph.initializer if t.name not in used]
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    dead_set = set(dead)
    vi = [v for v in model.graph.input if v.name not in dead_set]
    del model.graph.input[:]
    model.graph.input.extend(vi)
    return dead


def ensure_opset(model: onnx.ModelProto, domain: str, version: int) -> int:
    """Import `domain` at ≥ `version` (bumping an existing import); returns the version now imported."""
    for op in model.opset_import:
        if op.domain == domain:
            op.version = max(op.version, version)
            return op.version
    model.opset_import.append(onnx.helper.make_opsetid(domain, version))
    return version


def unique_name(model_names: set[str], base: str) -> str:
    """`base`, or `base_1`, `base_2`… not yet in `model_names` (which is updated)."""
    name, i = base, 0
    while name in model_names:
        i += 1
        name = f"{base}_{i}"
    model_names.add(name)
    return name


def all_names(model: onnx.ModelProto) -> set[str]:
    """Every tensor and node name in the top graph."""
    names = {t.name for t in model.graph.initializer} | {i.name for i in model.graph.input}
    for n in model.graph.node:
        names.update(n.input)
        names.update(n.output)
        if n.name:
            names.add(n.name)
    return names


# --------------------------------------------------------------------------------------------- running decoders
def session(model: onnx.ModelProto | str | Path, threads: int = 2, exact: bool = True):
    """A CPU InferenceSession (one intra-op pool of `threads`).

    `exact` keeps fp32 arithmetic where ORT would otherwise fuse DequantizeLinear→MatMul into MatMulNBits with
    int8-quantized activations (its default accuracy level 4, ~3e-3 relative on logits).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if exact:
        opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def decoder_feed(sess, ids: np.ndarray, past: dict[str, np.ndarray] | None, past_len: int) -> dict[str, np.ndarray]:
    """Inputs for an optimum text-generation-with-past graph: ids, mask, positions and the (empty) KV cache."""
    batch, seq = ids.shape
    feed: dict[str, np.ndarray] = {}
    for inp in sess.get_inputs():
        n = inp.name
        if n == "input_ids":
            feed[n] = ids.astype(np.int64)
        elif n == "attention_mask":
            feed[n] = np.ones((batch, past_len + seq), np.int64)
        elif n == "position_ids":
            feed[n] = np.broadcast_to(np.arange(past_len, past_len + seq, dtype=np.int64), (batch, seq)).copy()
        elif n.startswith("past_key_values"):
            if past is not None:
                feed[n] = past[n]
            else:
                shape = [batch if i == 0 else (0 if i == 2 else d) for i, d in enumerate(inp.shape)]
                feed[n] = np.zeros([int(d) if isinstance(d, int) else 0 for d in shape], np.float32)
        else:
            raise UserError(f"decoder graph input {n!r} is not one an optimum text-generation graph has")
    return feed


def run_decoder(sess, ids: np.ndarray, steps: int = 1, tokens: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """Logits of a prefill over `ids`, then `steps` decode steps with the KV cache: one array per call.

    Each step feeds `tokens[i]` ([batch, 1]) when given, else the greedy choice of the previous logits.
    """
    out_names = [o.name for o in sess.get_outputs()]
    outs = dict(zip(out_names, sess.run(None, decoder_feed(sess, ids, None, 0)), strict=True))
    logits = [outs["logits"]]
    past_len = ids.shape[1]
    for i in range(steps):
        nxt = tokens[i] if tokens is not None else outs["logits"][:, -1:].argmax(-1)
        past = {n.replace("present", "past_key_values"): v for n, v in outs.items() if n.startswith("present")}
        outs = dict(zip(out_names, sess.run(None, decoder_feed(sess, nxt, past, past_len)), strict=True))
        logits.append(outs["logits"])
        past_len += 1
    return logits


def max_logit_diff(a: onnx.ModelProto | str | Path, b: onnx.ModelProto | str | Path, ids: np.ndarray,
                   steps: int = 1) -> dict[str, float]:
    """Max |logit difference| of two decoder graphs over a prefill of `ids` and `steps` KV-cache decode steps.

    Both graphs decode the same tokens (greedy from `a`), so the comparison is like for like.
    """
    la = run_decoder(session(a), ids, steps)
    lb = run_decoder(session(b), ids, steps, tokens=[x[:, -1:].argmax(-1) for x in la[:-1]])
    scale = max(float(np.abs(la[0]).max()), 1e-12)
    diffs = [float(np.abs(x - y).max()) for x, y in zip(la, lb, strict=True)]
    return {"prefill_max_abs": diffs[0], "decode_max_abs": max(diffs[1:], default=0.0),
            "max_abs": max(diffs), "max_rel": max(diffs) / scale}


def rewrite_file(model: onnx.ModelProto | str | Path, out_path: Path | str, rewrite: Callable[[onnx.ModelProto], Any],
                 check_ids: np.ndarray | None = None):
    """`rewrite` (an in-place graph rewrite returning its RewriteRecord) on a copy of `model` (a graph or its path),
    saved atomically to `out_path`; with `check_ids`, both graphs also run (prefill + one decode step) into
    `record.check`."""
    m = load_model(model)
    record = rewrite(m)
    save_model_atomic(m, out_path)
    record.out_path = str(out_path)
    if check_ids is not None:
        record.check = max_logit_diff(model, out_path, check_ids, steps=1)
    return record
