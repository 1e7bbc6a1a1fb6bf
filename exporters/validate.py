"""Check an exported ONNX graph against the torch model it came from, on held-out inputs, with onnxruntime (CPU).

Decoders: the with-past graph runs the prefill with an empty past, then `decode_steps` single-token steps fed with
its own returned present KV; every step's logits are compared with torch's. Encoders: last hidden state and the
pooled embedding. Other modules (CNNs): every output, positionally.

Tolerance rule (per check, `fmt` default in brackets, each overridable):
  elementwise  max|onnx - ref| <= rel_tol × max|ref| + 1e-6        rel_tol [fp32 1e-4, fp16 5e-2]
  logits       KL(ref ‖ onnx) mean <= kl_max, top-1 agreement >= top1_min   [fp32 1e-4 / 0.99, fp16 1e-3 / 0.95]
  other        smallest per-sample cosine >= cos_min                         [fp32 0.99999, fp16 0.999]
fp16 is looser because its 11-bit mantissa's rounding compounds over depth: SmolLM2's 30 layers measured 2% of
max|ref| on the KV cache, 0.8% on the logits. Pass `elementwise=False` for lossy (quantized) graphs: then KL,
top-1 and cosine decide alone.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compress.data import Windows
from compress.errors import UserError
from compress.models.hf import LoadedModel

FLOOR = 1e-6


@dataclass(frozen=True)
class Tolerance:
    """Pass thresholds of one validation (see the module docstring for the rule)."""

    rel_tol: float
    kl_max: float
    top1_min: float
    cos_min: float
    elementwise: bool = True


DEFAULT_TOLERANCE = {
    "fp32": Tolerance(rel_tol=1e-4, kl_max=1e-4, top1_min=0.99, cos_min=0.99999),
    "fp16": Tolerance(rel_tol=5e-2, kl_max=1e-3, top1_min=0.95, cos_min=0.999),
    # quantized graphs vs their own artifact: the same codes, only kernel rounding differs (ORT's n-bit kernels
    # dequantize per block and accumulate in a different order than torch)
    "int4": Tolerance(rel_tol=1e-2, kl_max=1e-3, top1_min=0.98, cos_min=0.9999),
    "qdq": Tolerance(rel_tol=1e-2, kl_max=1e-3, top1_min=0.98, cos_min=0.9999),
}


@dataclass
class Check:
    """One compared output (e.g. `prefill/logits`, `decode1/logits`, `embedding`) and whether it passed."""

    name: str
    max_abs: float
    mean_abs: float
    ref_max: float
    atol: float | None
    cosine: float
    kl_mean: float | None = None
    kl_p99: float | None = None
    top1: float | None = None
    failures: list[str] = field(default_factory=list)
    gated: bool = True  # False when no threshold applied: the numbers are reported, not judged

    @property
    def passed(self) -> bool:
        """True when no criterion failed."""
        return not self.failures

    @property
    def verdict(self) -> str:
        """'pass', 'FAIL: why', or 'reported' when no threshold applied."""
        if self.failures:
            return "FAIL: " + ", ".join(self.failures)
        return "pass" if self.gated else "reported"


@dataclass
class ValidationReport:
    """Every check of one graph against its reference, the thresholds used, and wall times."""

    onnx_path: str
    fmt: str
    graph: str  # decoder | encoder | module
    tolerance: Tolerance
    checks: list[Check]
    inputs: dict
    seconds: float
    torch_seconds: float
    onnx_seconds: float

    HEADERS = ("check", "max abs", "mean abs", "atol", "cosine", "KL mean", "KL p99", "top-1", "result")

    @property
    def passed(self) -> bool:
        """True when every check passed."""
        return all(c.passed for c in self.checks)

    def check(self, name: str) -> Check:
        """The check called `name`."""
        return next(c for c in self.checks if c.name == name)

    def to_dict(self) -> dict:
        """JSON-ready report."""
        d = asdict(self)
        d["passed"] = self.passed
        for c, cd in zip(self.checks, d["checks"], strict=True):
            cd["passed"] = c.passed
            cd["verdict"] = c.verdict
        return d

    def rows(self) -> list[list[str]]:
        """One table row per check, in HEADERS order."""
        def num(v: float | None, fmt: str = ".2e") -> str:
            return "-" if v is None else format(v, fmt)

        return [[c.name, num(c.max_abs), num(c.mean_abs), num(c.atol), num(c.cosine, ".6f"), num(c.kl_mean),
                 num(c.kl_p99), num(c.top1, ".4f"), c.verdict] for c in self.checks]


def validate(
    onnx_model: Path | str,
    reference: LoadedModel | nn.Module,
    inputs: Windows | torch.Tensor | tuple[torch.Tensor, ...] | dict[str, torch.Tensor],
    *,
    fmt: str | None = None,
    decode_steps: int = 2,
    elementwise: bool = True,
    rel_tol: float | None = None,
    kl_max: float | None = None,
    top1_min: float | None = None,
    cos_min: float | None = None,
) -> ValidationReport:
    """Run `reference` (torch) and the graph (onnxruntime CPU) on `inputs` and compare every output.

    `onnx_model` is a graph file or an export directory (its export.json gives `fmt`); decoder and encoder inputs
    are token windows (Windows or an ids tensor [n, seq]), module inputs a tensor or tuple with the batch on dim 0.
    """
    path, fmt = _resolve(Path(onnx_model), fmt)
    tol = _tolerance(fmt, elementwise, rel_tol, kl_max, top1_min, cos_min)
    module = reference.module if isinstance(reference, LoadedModel) else reference
    session = _session(path)
    names = [i.name for i in session.get_inputs()]
    graph = "decoder" if "past_key_values.0.key" in names else "encoder" if "input_ids" in names else "module"
    timer = _Timer()
    start = time.perf_counter()
    with torch.no_grad():
        if graph == "decoder":
            accs, described = _run_decoder(session, module, _token_windows(inputs, graph), decode_steps, timer)
        elif graph == "encoder":
            pooling = reference.pooling if isinstance(reference, LoadedModel) else "mean"
            accs, described = _run_encoder(session, module, inputs, pooling, timer)
        else:
            accs, described = _run_module(session, module, inputs, timer)
    checks = [acc.check(tol) for acc in accs.values()]
    return ValidationReport(str(path), fmt, graph, tol, checks, described, round(time.perf_counter() - start, 2),
                            round(timer.torch, 2), round(timer.onnx, 2))


def random_images(n: int = 4, seed: int = 0, shape: tuple[int, ...] = (3, 224, 224)) -> torch.Tensor:
    """Seeded random-normal images: enough to check that the graph computes the same function as the module
    (fp32 equivalence); they say nothing about accuracy, for which real images are needed."""
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- running both sides

class _Timer:
    """Wall time spent in torch and in onnxruntime."""

    def __init__(self) -> None:
        self.torch = 0.0
        self.onnx = 0.0

    def run_torch(self, fn, *args, **kwargs) -> Any:
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        self.torch += time.perf_counter() - t
        return out

    def run_onnx(self, session, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t = time.perf_counter()
        out = session.run(None, feeds)
        self.onnx += time.perf_counter() - t
        return dict(zip([o.name for o in session.get_outputs()], out, strict=True))


def _run_decoder(session, module: nn.Module, ids: torch.Tensor, steps: int, timer: _Timer) -> tuple[dict, dict]:
    """Per window: prefill all but the last `steps` tokens (empty past), then decode those tokens one at a time."""
    if steps < 0 or ids.shape[1] <= steps:
        raise UserError(f"decode_steps={steps}: windows of {ids.shape[1]} tokens need more tokens than decode steps")
    accs: dict[str, _Acc] = {}
    prefill = ids.shape[1] - steps
    for window in ids:
        w = window[None].long()
        ref = timer.run_torch(module, input_ids=w[:, :prefill], attention_mask=torch.ones_like(w[:, :prefill]),
                              position_ids=torch.arange(prefill)[None], use_cache=True, return_dict=True)
        out = timer.run_onnx(session, _decoder_feeds(session, w[:, :prefill], 0, None))
        _acc(accs, "prefill/logits", logits=True).add(ref.logits, out["logits"])
        presents = [k for k in out if k.startswith("present")]
        _acc(accs, "prefill/present_kv").add(_flat_kv(ref.past_key_values), np.concatenate(
            [out[k].reshape(-1) for k in presents]))
        cache, past = ref.past_key_values, {k: out[k] for k in presents}
        for s in range(steps):
            pos = prefill + s
            tok = w[:, pos:pos + 1]
            ref = timer.run_torch(module, input_ids=tok, attention_mask=torch.ones(1, pos + 1, dtype=torch.long),
                                  position_ids=torch.tensor([[pos]]), past_key_values=cache, use_cache=True,
                                  return_dict=True)
            out = timer.run_onnx(session, _decoder_feeds(session, tok, pos, past))
            _acc(accs, f"decode{s + 1}/logits", logits=True).add(ref.logits, out["logits"])
            cache, past = ref.past_key_values, {k: out[k] for k in presents}
    return accs, {"windows": int(ids.shape[0]), "seq_len": int(ids.shape[1]), "prefill_tokens": prefill,
                  "decode_steps": steps}


def _decoder_feeds(session, tokens: torch.Tensor, past_len: int, past: dict[str, np.ndarray] | None) -> dict:
    """input_ids, attention_mask, position_ids and past_key_values.* (empty when `past` is None) the graph declares."""
    n = tokens.shape[1]
    values: dict[str, np.ndarray] = {
        "input_ids": tokens.numpy().astype(np.int64),
        "attention_mask": np.ones((1, past_len + n), dtype=np.int64),
        "position_ids": np.arange(past_len, past_len + n, dtype=np.int64)[None],
    }
    feeds = {}
    for inp in session.get_inputs():
        if inp.name.startswith("past_key_values."):
            if past is None:
                feeds[inp.name] = _empty_past(inp)
            else:
                feeds[inp.name] = past[inp.name.replace("past_key_values.", "present.")]
        elif inp.name in values:
            feeds[inp.name] = values[inp.name]
        else:
            raise UserError(f"the graph wants input '{inp.name}', which a decoder validation cannot provide")
    return feeds


def _empty_past(inp) -> np.ndarray:
    """A zero-length past of the graph's declared KV shape [batch, heads, past, head_dim] and dtype."""
    dims = [d if isinstance(d, int) else 1 for d in inp.shape]
    dims[2] = 0
    return np.zeros(dims, dtype=np.float16 if "float16" in inp.type else np.float32)


def _flat_kv(cache) -> torch.Tensor:
    """Every layer's keys then values of a transformers cache, flattened in the graph's present.* order."""
    layers = cache.layers if hasattr(cache, "layers") else None
    pairs = [(lyr.keys, lyr.values) for lyr in layers] if layers is not None else cache
    return torch.cat([t.reshape(-1) for k, v in pairs for t in (k, v)])


def _run_encoder(session, module: nn.Module, inputs: Any, pooling: str, timer: _Timer) -> tuple[dict, dict]:
    """Per window: last hidden state, and the pooled sentence embedding (mean over the mask, or CLS)."""
    ids = _token_windows(inputs, "encoder")
    mask = inputs.attention_mask if isinstance(inputs, Windows) else (
        inputs.get("attention_mask") if isinstance(inputs, dict) else None)
    mask = torch.ones_like(ids) if mask is None else mask
    accs: dict[str, _Acc] = {}
    wanted = [i.name for i in session.get_inputs()]
    unknown = set(wanted) - {"input_ids", "attention_mask", "token_type_ids"}
    if unknown:
        raise UserError(f"the graph wants inputs {', '.join(sorted(unknown))}, which an encoder validation cannot "
                        "provide")
    for i in range(ids.shape[0]):
        values = {"input_ids": ids[i:i + 1].long(), "attention_mask": mask[i:i + 1].long(),
                  "token_type_ids": torch.zeros_like(ids[i:i + 1]).long()}
        feeds = {n: values[n].numpy() for n in wanted}
        ref = timer.run_torch(module, **{n: values[n] for n in wanted}, return_dict=True).last_hidden_state
        out = timer.run_onnx(session, feeds)["last_hidden_state"]
        _acc(accs, "last_hidden_state").add(ref, out)
        _acc(accs, "embedding").add(_pool(ref, values["attention_mask"], pooling),
                                    _pool(torch.from_numpy(out), values["attention_mask"], pooling))
    return accs, {"windows": int(ids.shape[0]), "seq_len": int(ids.shape[1]), "pooling": pooling}


def _pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    if pooling == "cls":
        return hidden[:, 0]
    m = mask[..., None].to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


def _run_module(session, module: nn.Module, inputs: Any, timer: _Timer) -> tuple[dict, dict]:
    """All inputs in one batch; outputs compared positionally; an output named `logits` also gets KL and top-1."""
    if isinstance(inputs, Windows | dict):
        raise UserError("this graph is a plain module (no input_ids): pass its input tensors, not token windows")
    args = tuple(inputs) if isinstance(inputs, tuple | list) else (inputs,)
    graph_inputs = session.get_inputs()
    if len(graph_inputs) != len(args):
        raise UserError(f"the graph takes {len(graph_inputs)} inputs ({', '.join(i.name for i in graph_inputs)}), "
                        f"{len(args)} were given")
    ref = timer.run_torch(module, *args)
    refs = list(ref) if isinstance(ref, tuple | list) else [ref]
    outs = timer.run_onnx(session, {i.name: a.numpy() for i, a in zip(graph_inputs, args, strict=True)})
    accs: dict[str, _Acc] = {}
    for name, r in zip(outs, refs, strict=True):
        _acc(accs, name, logits=name == "logits").add(r, outs[name])
    return accs, {"shapes": [list(a.shape) for a in args]}


def _token_windows(inputs: Any, graph: str) -> torch.Tensor:
    if isinstance(inputs, Windows):
        return inputs.input_ids
    if isinstance(inputs, dict) and "input_ids" in inputs:
        return inputs["input_ids"]
    if isinstance(inputs, torch.Tensor) and inputs.dim() == 2 and not inputs.is_floating_point():
        return inputs
    raise UserError(f"the graph is a {graph}: pass token windows (Windows or an int tensor [n, seq_len])")


# ---------------------------------------------------------------------------------------------- statistics

# Top-1 agreement over a handful of positions is not evidence (decode steps see one token per window: one flip of
# two near-tied logits reads 0.5); it is reported there and gated only from this many positions on.
MIN_TOP1_TOKENS = 32


def _acc(accs: dict[str, _Acc], name: str, logits: bool = False) -> _Acc:
    if name not in accs:
        accs[name] = _Acc(name, logits)
    return accs[name]


class _Acc:
    """Running comparison of one output over samples (dim 0): diffs, per-sample cosine, per-token KL and top-1."""

    def __init__(self, name: str, logits: bool):
        self.name, self.logits = name, logits
        self.max_abs = self.ref_max = self.abs_sum = 0.0
        self.count = 0
        self.cosine = 1.0
        self.kl: list[torch.Tensor] = []
        self.same_top1 = self.tokens = 0

    def add(self, ref: torch.Tensor, onnx_out: np.ndarray) -> None:
        ref = ref.detach().float()
        out = torch.from_numpy(np.asarray(onnx_out)).float().reshape(ref.shape)
        diff = (out - ref).abs()
        self.max_abs = max(self.max_abs, float(diff.max()))
        self.ref_max = max(self.ref_max, float(ref.abs().max()))
        self.abs_sum += float(diff.double().sum())
        self.count += diff.numel()
        n = ref.shape[0] if ref.dim() > 1 else 1
        cos = torch.nn.functional.cosine_similarity(ref.reshape(n, -1).double(), out.reshape(n, -1).double())
        self.cosine = min(self.cosine, float(cos.min()))
        if self.logits:
            r, o = ref.reshape(-1, ref.shape[-1]).double(), out.reshape(-1, ref.shape[-1]).double()
            lr, lo = r.log_softmax(-1), o.log_softmax(-1)
            self.kl.append((lr.exp() * (lr - lo)).sum(-1).clamp(min=0))
            self.same_top1 += int((r.argmax(-1) == o.argmax(-1)).sum())
            self.tokens += r.shape[0]

    def check(self, tol: Tolerance) -> Check:
        atol = tol.rel_tol * self.ref_max + FLOOR if tol.elementwise else None
        c = Check(self.name, self.max_abs, self.abs_sum / max(self.count, 1), self.ref_max, atol, self.cosine)
        if atol is not None and self.max_abs > atol:
            c.failures.append(f"max abs {self.max_abs:.2e} > {atol:.2e}")
        if self.logits:
            kl = torch.cat(self.kl)
            c.kl_mean, c.kl_p99 = float(kl.mean()), float(torch.quantile(kl, 0.99))
            c.top1 = self.same_top1 / max(self.tokens, 1)
            if c.kl_mean > tol.kl_max:
                c.failures.append(f"KL {c.kl_mean:.2e} > {tol.kl_max:.0e}")
            if c.top1 < tol.top1_min and self.tokens >= MIN_TOP1_TOKENS:
                c.failures.append(f"top-1 {c.top1:.4f} < {tol.top1_min}")
            judged = tol.kl_max != float("inf") or (tol.top1_min > 0 and self.tokens >= MIN_TOP1_TOKENS)
        else:
            if c.cosine < tol.cos_min:
                c.failures.append(f"cosine {c.cosine:.6f} < {tol.cos_min}")
            judged = tol.cos_min > -1
        c.gated = atol is not None or judged
        return c


# ---------------------------------------------------------------------------------------------- set-up

def _resolve(path: Path, fmt: str | None) -> tuple[Path, str]:
    """The graph file (an export directory's model.onnx) and its float format (argument, export.json, else fp32)."""
    from compress.integrity import check_before_use
    from exporters.onnx import MODEL_FILE, read_export

    if not path.exists():
        raise UserError(f"ONNX model not found: {path}")
    if path.is_dir():
        check_before_use(path)
    graph = path / MODEL_FILE if path.is_dir() else path
    if not graph.is_file():
        raise UserError(f"{path} has no {MODEL_FILE}: pass an export directory or an .onnx file")
    meta = read_export(path)
    fmt = fmt or (meta.fmt if meta else "fp32")
    if fmt not in DEFAULT_TOLERANCE:
        raise UserError(f"format '{fmt}': validation knows {', '.join(DEFAULT_TOLERANCE)}; pass explicit thresholds "
                        "with fmt='fp32' and elementwise=False for other graphs")
    return graph, fmt


def _tolerance(fmt: str, elementwise: bool, rel_tol: float | None, kl_max: float | None, top1_min: float | None,
               cos_min: float | None) -> Tolerance:
    given = {"rel_tol": rel_tol, "kl_max": kl_max, "top1_min": top1_min, "cos_min": cos_min}
    return replace(DEFAULT_TOLERANCE[fmt], elementwise=elementwise, **{k: v for k, v in given.items() if v is not None})


def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.log_severity_level = 3
    # ORT fuses DequantizeLinear→MatMul into MatMulNBits with int8 activations by default (~3e-3 relative on
    # logits); validation wants the graph's own arithmetic, so keep fp32 accumulation.
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own untyped errors for bad graphs
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(f"onnxruntime cannot load {path}: {first}") from exc
