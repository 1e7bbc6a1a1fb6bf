"""`compress quantize` as a function: validate the request, build the plan, quantize, evaluate, save — the whole model
in memory, or block by block from disk (--stream; compress.stream) with the same artifact bytes."""

from __future__ import annotations

import contextlib
import json
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from compress.errors import UserError
from compress.quantize.budget import Budget
from compress.quantize.choices import ALLOCATOR, BACKEND, EMBEDDINGS, GRANULARITY, MEASURE, METHOD
from compress.quantize.spec import BITS, QuantSpec
from flows.options import DataOptions, ModelOptions, OutputOptions, StreamOptions


@dataclass(kw_only=True)
class QuantizeRequest(StreamOptions, OutputOptions, DataOptions, ModelOptions):
    """Everything `compress quantize` was asked to do."""

    bits: int | None = None
    layerwise: bool = False
    avg_bits: float | None = None
    max_size: int | None = None
    candidates: str | None = None  # None: the target's default menu
    target: str = "torch"
    group_size: int = 32
    symmetric: bool = True
    method: str = "rtn"
    allocator: str = "dp"
    measure: str | None = None  # None: full in memory, fisher when streamed
    backend: str = "packed"
    granularity: str = "block"
    scores: Path | None = None
    rank_by: str = "lim"
    embeddings: str | None = None
    plan_file: Path | None = None
    show_plan: bool = False
    tokens: int = 1024
    eval_tokens: int = 2048
    evaluate: bool = True
    resume: bool = False
    imatrix: Path | None = None  # an importance matrix to reuse (llama.cpp imatrix GGUF)
    imatrix_out: Path | None = None  # where to write the one collected or used
    use_imatrix: bool = True  # False: plain min/max RTN even with calibration data (--no-imatrix)
    awq: bool = False  # AWQ scales folded in before planning; `method="awq"` / "awq+gptq" set it

    def __post_init__(self):
        """--method awq (RTN codes) and awq+gptq (GPTQ codes): AWQ is a transform before either, not a code maker."""
        if self.method in AWQ_METHODS:
            self.awq, self.method = True, AWQ_METHODS[self.method]


AWQ_METHODS = {"awq": "rtn", "awq+rtn": "rtn", "awq+gptq": "gptq"}
CANDIDATE = re.compile(r"^(\d+)(?:g(\d+))?([asp])?$")
K_CANDIDATE = re.compile(r"^(\d+)k$")  # llama.cpp's Q{bits}_K


def parse_candidates(text: str, group_size: int = 32, symmetric: bool = True, method: str = "rtn") -> list[QuantSpec]:
    """'8g128,6,4a,4k' -> specs: bits, optional g<group> (else --group-size), optional a|s|p (else --symmetric);
    p = symmetric with positive scales (TensorRT's rule); <bits>k = llama.cpp's Q<bits>_K."""
    specs = []
    for token in [t.strip() for t in text.split(",") if t.strip()]:
        k = K_CANDIDATE.match(token)
        if k:
            if method != "rtn":
                raise UserError(f"--candidates {text}: '{token}' is a K-quant, made by RTN only, not {method}; use "
                                "group candidates (e.g. 8,5,4) with --method " + method)
            specs.append(QuantSpec.k(int(k.group(1))))
            continue
        m = CANDIDATE.match(token)
        if not m:
            raise UserError(f"--candidates {text}: cannot read '{token}'; write bits with optional group and "
                            "symmetry, e.g. 8g128,6,5a,4g32s")
        bits = int(m.group(1))
        if bits not in BITS:
            allowed = ", ".join(map(str, BITS))
            raise UserError(f"--candidates {text}: unknown bit width {bits}; use {allowed}")
        group = int(m.group(2)) if m.group(2) else group_size
        sym = symmetric if not m.group(3) else m.group(3) in "sp"
        specs.append(QuantSpec(bits, group, sym, method, positive_scale=m.group(3) == "p"))
    if not specs:
        raise UserError("--candidates is empty: give bit widths, e.g. 8,6,5,4,3")
    return list(dict.fromkeys(specs))


def candidates_for(req: QuantizeRequest) -> list[QuantSpec]:
    """The candidate menu: --candidates, or the --target's default; each checked against the target."""
    from compress.quantize.targets import (
        DEFAULT_CANDIDATES,
        GGUF_GROUP_CANDIDATES,
        adapt,
        check_candidates,
        check_target,
    )

    text = req.candidates or DEFAULT_CANDIDATES[check_target(req.target)]
    if req.candidates is None and req.target == "gguf" and req.method != "rtn":
        text = GGUF_GROUP_CANDIDATES  # K-quants are RTN codes
    cands = list(dict.fromkeys(adapt(c, req.target) for c in parse_candidates(text, req.group_size, req.symmetric,
                                                                            req.method)))
    check_candidates(cands, req.target)
    return cands


def fitting_defaults(cands: list[QuantSpec], model, names: list[str]) -> tuple[list[QuantSpec], list[str]]:
    """A default menu without the candidates whose group does not divide some module's input width (e.g. group 64
    on a model 32 wide), and their labels; a menu the user wrote is checked strictly instead (exit 2)."""
    from compress.quantize.apply import weight_matrix

    widths = {weight_matrix(model.get_submodule(n)).shape[1] for n in names}
    kept = [c for c in cands if all(c.fits(w) for w in widths)]
    return kept, [c.label() for c in cands if c not in kept]


def layerwise_menu(req: QuantizeRequest, model, names: list[str], budget: Budget) -> tuple[list[QuantSpec], list[str]]:
    """The layer-wise candidates: --candidates as written, or the target's default menu without the candidates this
    model or budget cannot use; with a note for each dropped kind."""
    cands, notes = candidates_for(req), []
    if req.candidates is None:
        cands, dropped = fitting_defaults(cands, model, names)
        if dropped:
            notes.append(f"default menu without {', '.join(dropped)}: their group does not divide every input width "
                         "of this model")
        cands, unneeded = drop_unneeded_2bit(cands, budget, req.target)
        if unneeded:
            notes.append(f"default menu without {', '.join(unneeded)}: the budget does not need 2-bit layers (pass "
                         "--candidates to allow them)")
    return cands, notes


def drop_unneeded_2bit(cands: list[QuantSpec], budget: Budget, target: str) -> tuple[list[QuantSpec], list[str]]:
    """A default menu without its 2-bit candidates when every other one fits the budget's average: measured at one
    anchor and scaled by error energy (`--measure fast`), 2-bit damage is underestimated (the float decoder's GenAI
    plan put two blocks at 2 bits and lost 2x to the builder); a budget that needs them keeps them."""
    from compress.quantize.targets import bits_per_weight

    rest = [c for c in cands if c.bits != 2]
    if not rest or len(rest) == len(cands) or min(bits_per_weight(c, 4096, target) for c in rest) > budget.avg_bits:
        return cands, []
    return rest, [c.label() for c in cands if c.bits == 2]


def uniform_spec(req: QuantizeRequest) -> QuantSpec:
    """The one spec of `--bits` mode, as the target needs it."""
    from compress.quantize.targets import adapt

    return adapt(QuantSpec(req.bits, req.group_size, req.symmetric, req.method), req.target)


def check_request(req: QuantizeRequest) -> None:
    """Everything about the request that needs no model (UserError on bad input); callers may check early."""
    from compress.quantize.targets import EMBEDDING, LINEAR, check_target, problem

    check_target(req.target)
    METHOD.check(req.method)
    modes = sum([req.bits is not None, req.layerwise, req.plan_file is not None])
    if modes != 1:
        raise UserError("choose one mode: --bits N (uniform), --layerwise with --avg-bits/--max-size, or --plan FILE")
    if req.bits is not None:
        spec = uniform_spec(req)
        roles = [LINEAR] + ([EMBEDDING] if req.embeddings == "quantize" else [])
        for why in filter(None, (problem(spec, req.target, r) for r in roles)):
            raise UserError(f"--bits {req.bits} --group-size {req.group_size} ({spec.label()}) cannot run on "
                            f"--target {req.target}: {why}")
    if req.method == "hqq" and req.symmetric:
        raise UserError("--method hqq optimises a zero point: add --asymmetric")
    if req.layerwise:
        candidates_for(req)
        if (req.avg_bits is None) == (req.max_size is None):
            raise UserError("--layerwise needs one budget: --avg-bits B (e.g. 4.5) or --max-size BYTES")
        Budget.parse(req.avg_bits, req.max_size)
    ALLOCATOR.check(req.allocator)
    if req.layerwise and req.allocator == "rank" and req.scores is None:
        raise UserError("--allocator rank orders blocks by a score: pass --scores scores.json from `compress score`")
    BACKEND.check(req.backend)
    if req.backend == "bnb" and req.target != "torch":
        raise UserError(f"--backend bnb runs in PyTorch only: drop --target {req.target}")
    MEASURE.check(req.measure, allow_none=True)
    GRANULARITY.check(req.granularity)
    EMBEDDINGS.check(req.embeddings, allow_none=True)
    req.check_data()
    req.check_stream()
    if req.resume and req.out is None:
        raise UserError("--resume continues an interrupted run of --out DIR: pass the same --out")
    if req.resume and req.stream == "off":
        raise UserError("--resume continues a streamed run (block by block): drop --stream off")
    if req.out is not None and Path(req.out).exists() and not Path(req.out).is_dir():
        raise UserError(f"--out {req.out}: exists and is not a directory")
    _check_imatrix_options(req)
    if req.awq and req.backend == "bnb":
        raise UserError("--method awq folds scales before our own codes; --backend bnb quantizes by itself: use "
                        "--backend packed")
    if req.awq and req.data is None and not req.layerwise:
        raise UserError("--method awq searches its scales on calibration text: pass --data FILE (or --data self)")


def _check_imatrix_options(req: QuantizeRequest) -> None:
    """UserError for --imatrix / --imatrix-out / --no-imatrix combinations that cannot be honoured."""
    if not req.use_imatrix and (req.imatrix is not None or req.imatrix_out is not None):
        raise UserError("--no-imatrix turns the importance matrix off: drop --imatrix / --imatrix-out")
    if req.awq and req.imatrix is not None:
        raise UserError("--method awq rescales the Linears' inputs, so an importance matrix collected before does not "
                        "fit them: drop --imatrix (the matrix is collected after the scales)")
    if req.imatrix is not None:
        if req.method != "rtn":
            raise UserError(f"--imatrix weights RTN's rounding; --method {req.method} does not use it: pass "
                            "--method rtn or drop --imatrix")
        if not Path(req.imatrix).expanduser().is_file():
            raise UserError(f"--imatrix {req.imatrix}: no such file; pass an imatrix GGUF written by --imatrix-out "
                            "or llama-imatrix")
    if req.imatrix_out is not None and not wants_imatrix(req):
        raise UserError("--imatrix-out writes the importance matrix RTN uses: it needs --method rtn and calibration "
                        "data (--data FILE, --layerwise or --imatrix)")


def wants_imatrix(req: QuantizeRequest) -> bool:
    """True when RTN's rounding is weighted by an importance matrix: --method rtn with calibration data (--data,
    --layerwise) or a given --imatrix, unless --no-imatrix."""
    return req.use_imatrix and req.method == "rtn" and (req.imatrix is not None or req.data is not None
                                                        or req.layerwise)


class _Importance:
    """The run's importance matrix, made on first use: read from --imatrix (checked against the model) or
    collected block by block on the calibration windows; None when the request does not use one."""

    def __init__(self, req: QuantizeRequest, lazy, names: list[str], data: _Data, progress=None):
        self.req, self.lazy, self.names, self.data, self.progress = req, lazy, names, data, progress
        self._value = None

    @property
    def wanted(self) -> bool:
        return wants_imatrix(self.req)

    def get(self):
        """The ImportanceMatrix, or None."""
        if not self.wanted:
            return None
        if self._value is None:
            from compress.quantize.apply import weight_matrix
            from compress.quantize.imatrix import collect, load_gguf

            model, lmap = self.lazy.model, self.lazy.lmap
            if self.req.imatrix is not None:
                src = Path(self.req.imatrix).expanduser()
                imat = load_gguf(src, self.names, len(lmap.blocks))
                widths = {n: weight_matrix(model.get_submodule(n)).shape[1] for n in self.names
                          if n != lmap.embeddings or n in imat.sums}
                imat.check(widths, str(self.req.imatrix))
            else:
                imat = collect(self.lazy, self.data.calibration(), self.names, self.progress)
            self._value = imat
        return self._value

    def digest(self) -> str:
        """What the matrix depends on, for the resume digest: the file's bytes, or the calibration windows."""
        if not self.wanted:
            return ""
        if self.req.imatrix is not None:
            from compress.integrity import sha256

            return "imatrix:" + sha256(Path(self.req.imatrix).expanduser())
        return "imatrix-calibration:" + self.data.calibration().data_hash

    def write(self, root: Path) -> None:
        """imatrix.gguf into the artifact directory `root` (when one was used)."""
        from compress.quantize.imatrix import FILE, save_gguf

        if self._value is not None:
            save_gguf(self._value, Path(root) / FILE, len(self.lazy.lmap.blocks))

    def write_out(self, result: dict) -> None:
        """--imatrix-out: the matrix written through a temporary sibling (a file this tool did not write is
        refused, as for every output)."""
        from compress.atomic import atomic_file
        from compress.quantize.imatrix import save_gguf

        if self.req.imatrix_out is None or self.get() is None:
            return
        with atomic_file(Path(self.req.imatrix_out)) as tmp:
            save_gguf(self._value, tmp, len(self.lazy.lmap.blocks))
        result["imatrix_out"] = str(self.req.imatrix_out)

    def describe(self) -> dict | None:
        """The matrix's provenance for the result and the manifest."""
        if self._value is None:
            return None
        return {"source": str(self.req.imatrix) if self.req.imatrix is not None else "collected",
                "modules": len(self._value.sums), "tokens": max(self._value.counts.values(), default=0),
                "sha256": self._value.digest()}


def run_quantize(req: QuantizeRequest, progress=None) -> dict:
    """Load, plan, quantize, evaluate against the original on held-out windows, save the artifact: each a step
    below, the transform itself the library's (compress.quantize.pipeline.quantize)."""
    check_request(req)
    from compress.models import layer_map, load_model
    from compress.plan import Plan
    from compress.quantize.apply import quantizable
    from compress.quantize.pipeline import needs_data, quantize

    plan_from_file = Plan.load(req.plan_file) if req.plan_file else None
    t0 = time.perf_counter()
    choice = req.stream_choice(req.model)
    if choice.stream:
        return run_quantize_streaming(req, choice, plan_from_file, progress)
    if req.resume:
        raise UserError(f"--resume continues a streamed run, and {req.model} is quantized in memory ({choice.why}): "
                        "add --stream on")
    req.compute_device(streamed=False)
    loaded = load_model(req.model, arch=req.arch, trust_pickle=req.trust_pickle)
    lmap = layer_map(loaded.module)
    names = quantizable(loaded.module, lmap)
    result: dict = {"model": req.model, "notes": []}
    data = _Data(req, loaded)
    from compress.stream.lazy import LazyModel

    importance = _Importance(req, LazyModel.resident(loaded, lmap), names, data, progress)
    if req.awq:
        _awq(req, loaded, lmap, names, plan_from_file, data, result, progress)
    plan, table = _plan(req, loaded, lmap, names, plan_from_file, data, result, progress, importance=importance)
    if req.show_plan:
        result["specs"] = {n: s.label() for n, s in plan.resolve(names).items()}
        return result
    if req.backend == "bnb":
        return _finish_bnb(req, loaded, plan, names, result, t0, progress, data)
    calib = data.calibration() if needs_data(plan.resolve(names)) or table is not None else None
    imat = importance.get()
    specs, record = quantize(loaded, lmap, plan, calib, progress, imatrix=imat)
    _note_imatrix(importance, result)
    importance.write_out(result)
    result["specs"] = record.specs
    result["notes"] += record.notes
    _measure(req, loaded, result, data, progress)
    result["seconds"] = round(time.perf_counter() - t0, 2)
    if req.out is not None:
        _save(req, loaded, plan, table, specs, record, result, importance)
    return result


def _awq(req: QuantizeRequest, loaded, lmap, names: list[str], plan_from_file, data: _Data, result: dict,
         progress) -> None:
    """Fold AWQ scales into the model in place, searched against the specs the run will use (layer-wise: the
    candidate nearest below the budget, where the plan's decisions are made); recorded in `result`."""
    from compress.quantize.awq import awq_scale
    from compress.quantize.pipeline import anchor_candidate
    from compress.quantize.targets import bits_per_weight
    from compress.stream.lazy import LazyModel

    if plan_from_file is not None:
        specs = plan_from_file.resolve(names)
    elif req.bits is not None:
        spec = uniform_spec(req)
        specs = {n: spec for b in lmap.blocks for n in b.linears}
    else:
        budget = Budget.parse(req.avg_bits, req.max_size).resolve(loaded.module)
        cands = sorted(layerwise_menu(req, loaded.module, names, budget)[0],
                       key=lambda c: -bits_per_weight(c, 4096, req.target))
        spec = cands[anchor_candidate(cands, budget, req.target)]
        specs = {n: spec for b in lmap.blocks for n in b.linears}
    rec = awq_scale(LazyModel.resident(loaded, lmap), data.calibration(), specs.get, progress)
    result["awq"] = rec.summary()
    result["notes"] += rec.notes + [f"AWQ: {result['awq']['scaled']} of {result['awq']['groups']} groups scaled "
                                    f"(mean output error {result['awq']['mean_error_ratio']}× unscaled), "
                                    f"{rec.seconds} s"]


def _note_imatrix(importance: _Importance, result: dict) -> None:
    info = importance.describe()
    if info is not None:
        result["imatrix"] = info
        result["notes"].append(f"RTN weighted by an importance matrix ({info['source']}, {info['tokens']} tokens per "
                               "module; --no-imatrix for plain min/max RTN)")


def _plan(req: QuantizeRequest, loaded, lmap, names: list[str], plan_from_file, data: _Data, result: dict,
          progress, lazy=None, importance: _Importance | None = None) -> tuple:
    """The plan of the request's mode (--plan FILE, --bits N, or --layerwise under a budget) and, layer-wise, the
    distortion table it was chosen on; checked against the target; recorded in `result`. `lazy`: the streamed
    model (compress.stream.LazyModel) the Fisher is computed on block by block."""
    from compress.importance.report import ImportanceReport
    from compress.plan import Plan
    from compress.quantize.pipeline import layerwise_plan, plan_inputs
    from compress.quantize.targets import check_specs

    table = None
    if plan_from_file is not None:
        plan = plan_from_file
        plan.resolve(names)
    elif req.bits is not None:
        block_linears = [p for b in lmap.blocks for p in b.linears]
        extra = [n for n in names if n not in block_linears] if req.embeddings == "quantize" else []
        plan = Plan.uniform(uniform_spec(req), block_linears + extra, mode="uniform")
    else:
        ranking = ImportanceReport.load(req.scores) if req.scores else None
        budget = Budget.parse(req.avg_bits, req.max_size).resolve(loaded.module)
        cands, notes = layerwise_menu(req, loaded.module, names, budget)
        result["notes"] += notes
        embeddings = req.embeddings != "keep"
        inputs = plan_inputs(loaded.module, lmap, cands, budget, req.granularity, embeddings, req.target)
        calib = data.calibration()
        imat = importance.get() if importance is not None and req.allocator == "dp" else None
        plan, table = layerwise_plan(loaded, lmap, calib, cands, budget, req.allocator, req.granularity,
                                     embeddings=embeddings, ranking=ranking, rank_by=req.rank_by,
                                     progress=progress, inputs=inputs, target=req.target,
                                     measure=req.measure or ("fisher" if lazy is not None else "full"),
                                     lazy=lazy, offload_dir=req.offload_dir, imatrix=imat)
        plan.meta["calibration"] = calib.describe()
    check_specs(plan.resolve(names), req.target, {lmap.embeddings} if lmap.embeddings else set())
    _check_shapes(loaded.module, plan.resolve(names))
    plan.meta["target"] = req.target
    result["plan"] = plan.to_dict()
    if table is not None:
        result["distortion"] = {u.name: {c.label(): d for c, d in zip(table.candidates, row, strict=True)}
                                for u, row in zip(table.units, table.distortion, strict=True)}
        result["distortion_measure"] = table.measure
    return plan, table


def _check_shapes(model, specs: dict) -> None:
    """UserError for a group that does not divide a module's width, before any data pass (the importance matrix,
    GPTQ) is spent on a plan that cannot be applied."""
    from compress.quantize.apply import weight_matrix

    for name, spec in specs.items():
        if not spec.is_float:
            spec.check_shape(name, weight_matrix(model.get_submodule(name)).shape[1])


def _save(req: QuantizeRequest, loaded, plan, table, specs: dict, record, result: dict,
          importance: _Importance | None = None) -> None:
    """The artifact: packed weights and a manifest with the plan, metrics, per-layer specs and the distortion
    table; structure inherited from a source artifact (MoE experts cut, router bias) is kept."""
    from compress.artifact import save_artifact
    from compress.stream.checkpoint import weight_files

    save_artifact(loaded, specs, Path(req.out), artifact_manifest(loaded, plan, table, specs, record, result),
                  storage=source_dtypes(loaded), extra=importance.write if importance is not None else None)
    result["out"] = str(req.out)
    result["file_bytes"] = sum(f.stat().st_size for f in weight_files(Path(req.out)))


def artifact_manifest(loaded, plan, table, specs: dict, record, result: dict) -> dict:
    """compress.json's run fields: the plan, metrics, notes, size, per-layer specs and bpw, the distortion table;
    structure inherited from a source artifact (MoE experts cut, router bias) is kept."""
    from compress.artifact_formats import STRUCTURE

    manifest = {"plan": plan.to_dict(), "metrics": result.get("metrics"), "notes": record.notes,
                "bpw": result["bpw"], "size_bytes": result["size_bytes"],
                "layers": {n: {"spec": s.label(), "bpw": round(s.bits_per_weight(_cols(loaded, n)), 4)}
                           for n, s in specs.items()}}
    if table is not None:  # a DistortionTable, or its JSON form kept by an interrupted run
        manifest["distortion"] = table if isinstance(table, dict) else table.to_dict()
    if result.get("imatrix") is not None:
        manifest["imatrix"] = result["imatrix"]
    if result.get("awq") is not None:
        manifest["awq"] = result["awq"]
    source = loaded.extra.get("manifest") or {}
    manifest.update({k: source[k] for k in STRUCTURE if k in source})
    return manifest


def source_dtypes(loaded) -> dict:
    """The dtype of every tensor in the safetensors files the model was loaded from ({} when it was not loaded
    from a directory's own weights): unchanged floats are stored back in it."""
    from compress.stream.checkpoint import Checkpoint

    weights_dir = loaded.extra.get("weights_dir")
    return Checkpoint(weights_dir).dtypes if weights_dir is not None else {}


def _measure(req: QuantizeRequest, loaded, result: dict, data: _Data, progress) -> None:
    """Size and bpw of the quantized model; with evaluation, its metrics against a fresh copy of the original."""
    from compress.evaluate import evaluate
    from compress.metrics import weight_footprint
    from compress.models import load_model

    foot = weight_footprint(loaded.module)
    result.update(size_bytes=int(foot["size_bytes"]), bpw=round(float(foot["bpw"]), 4))
    if req.evaluate:
        reference = load_model(req.model, arch=req.arch, trust_pickle=req.trust_pickle)
        result["metrics"] = evaluate(loaded, reference, data.evaluation(reference), progress).to_dict()


class _Data:
    """Calibration and evaluation windows, made on first use; with self-sampling and evaluation both are drawn
    in one batched generation from the model before it is quantized (the reference has the same weights)."""

    def __init__(self, req: QuantizeRequest, loaded):
        self.req, self.loaded, self.windows = req, loaded, {}

    def calibration(self):
        from compress.data import load_split, load_windows

        r = self.req
        if "calibration" not in self.windows:
            if r.evaluate and r.data in (None, "self") and self.loaded.can_generate:
                self.windows["calibration"], self.windows["evaluation"] = load_split(
                    r.data, self.loaded, r.tokens, r.eval_tokens, r.seq_len, r.seed)
            else:
                self.windows["calibration"] = load_windows(r.data, self.loaded, split="calibration", tokens=r.tokens,
                                                           seq_len=r.seq_len, seed=r.seed)
        return self.windows["calibration"]

    def evaluation(self, reference):
        from compress.data import load_windows

        r = self.req
        if "evaluation" not in self.windows:
            self.windows["evaluation"] = load_windows(r.data, reference, split="evaluation", tokens=r.eval_tokens,
                                                      seq_len=r.seq_len, seed=r.seed)
        return self.windows["evaluation"]


def _finish_bnb(req: QuantizeRequest, loaded, plan, names: list[str], result: dict, t0: float, progress,
                data: _Data) -> dict:
    """--backend bnb: the plan's 8-bit Linears become Linear8bitLt, 4-bit ones Linear4bit nf4 (bitsandbytes
    quantizes the float weights itself); evaluated like packed plans; saved with transformers' bnb config."""
    from compress.atomic import atomic_dir
    from compress.quantize.bnb import hf_quantization_config, to_bitsandbytes

    specs = plan.resolve(names)
    if req.out is not None:
        widths = {s.bits for s in specs.values() if not s.is_float}
        if len(widths) > 1:
            raise UserError(f"--backend bnb --out: transformers' BitsAndBytesConfig holds one width, the plan mixes "
                            f"{sorted(widths)}; drop --out (evaluate only) or use the packed backend")
    record = to_bitsandbytes(loaded.module, specs)
    result["backend"] = "bnb"
    result["bnb"] = record.to_dict()
    result["specs"] = {n: s.label() for n, s in specs.items()}
    result["notes"] += record.notes
    _measure(req, loaded, result, data, progress)
    if req.out is not None:
        loaded.module.config.quantization_config = hf_quantization_config(loaded.module, record)
        with atomic_dir(Path(req.out)) as tmp:
            loaded.module.save_pretrained(tmp)
            if loaded.tokenizer is not None:
                loaded.tokenizer.save_pretrained(tmp)
        result["out"] = str(req.out)
        result["file_bytes"] = sum(f.stat().st_size for f in Path(req.out).glob("*.safetensors"))
        result["notes"].append("saved as a transformers bitsandbytes checkpoint: load it with "
                               "AutoModelForCausalLM.from_pretrained(DIR, device_map='cpu', dtype=torch.float32)")
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return result


def _cols(loaded, name: str) -> int:
    from compress.quantize.apply import weight_matrix

    m = loaded.module.get_submodule(name)
    packed = getattr(m, "packed", None)
    return packed.cols if packed is not None else weight_matrix(m).shape[1]


# ---- --stream: the model is not loaded whole (compress.stream); same artifact bytes as above

def check_streamable(req: QuantizeRequest) -> None:
    """UserError for the modes that still need the whole model in memory."""
    if req.layerwise and req.allocator == "dp" and req.measure not in (None, "fisher"):
        raise UserError(f"--measure {req.measure} replays the whole model for every unit and does not stream: use "
                        "--measure fisher (the default when streaming), or --stream off if the model fits")
    if req.backend == "bnb":
        raise UserError("--backend bnb quantizes a whole loaded model: pass --stream off")
    if req.awq:
        raise UserError("--method awq runs on a model in memory: pass --stream off (or use --method rtn)")
    if req.data in (None, "self") and (req.evaluate or req.method == "gptq" or req.layerwise):
        raise UserError("--stream: --data self samples text from the whole model; pass --data FILE (text to "
                        "calibrate and evaluate on)")


def run_quantize_streaming(req: QuantizeRequest, choice, plan_from_file, progress=None) -> dict:
    """Plan, quantize block by block into the output (or a scratch directory without --out), evaluate from disk.
    With --out the work sits in a partial directory that `--resume` continues after a kill (same inputs only)."""
    from compress.artifact import FORMAT, manifest_fields, write_beside
    from compress.plan import Plan
    from compress.quantize.apply import quantizable
    from compress.quantize.pipeline import needs_data
    from compress.stream.checkpoint import weight_files
    from compress.stream.lazy import open_lazy
    from compress.stream.quantize import quantize_streaming
    from compress.stream.resume import ResumeRecord, check_resumable

    check_streamable(req)
    t0 = time.perf_counter()
    lazy = open_lazy(choice.path, req.model, device=req.compute_device(streamed=True))
    if lazy.specs:
        raise UserError(f"{req.model} is already quantized: quantize its source model instead")
    loaded, lmap = lazy.loaded, lazy.lmap
    names = quantizable(loaded.module, lmap)
    result: dict = {"model": req.model, "notes": [choice.why], "stream": True}
    data = _Data(req, loaded)
    importance = _Importance(req, lazy, names, data, progress)
    if req.show_plan:
        plan, _ = _plan(req, loaded, lmap, names, plan_from_file, data, result, progress, lazy)
        result["specs"] = {n: s.label() for n, s in plan.resolve(names).items()}
        return result
    digest = _inputs_digest(req, choice.path, plan_from_file, data, importance) if req.out is not None else ""
    if req.resume:
        check_resumable(req.out, digest)
    with _destination(req.out, req.resume) as root:
        record = ResumeRecord(root, digest, req.resume) if req.out is not None else None
        if record is not None and record.get("plan") is not None:  # resumed: the interrupted run's plan
            plan, table = Plan.from_dict(record.get("plan")), record.get("table")
            result.update(record.get("result"))
            result["notes"].append("resumed an interrupted run")
        else:
            plan, table = _plan(req, loaded, lmap, names, plan_from_file, data, result, progress, lazy,
                                importance)
            if record is not None:
                record.put(plan=plan.to_dict(), table=None if table is None else table.to_dict(),
                           result={k: result[k] for k in ("plan", "distortion", "distortion_measure", "notes")
                                   if k in result})
        specs = plan.resolve(names)
        calib = data.calibration() if needs_data(specs) else None
        imat = importance.get()
        run = quantize_streaming(lazy, specs, root, calib, progress, metadata={"format": FORMAT}, imatrix=imat)
        _note_imatrix(importance, result)
        importance.write(root)
        importance.write_out(result)
        result.update(specs=run.record.specs, size_bytes=run.foot.size_bytes, bpw=round(run.foot.bpw, 4))
        result["notes"] += run.record.notes

        def manifest() -> dict:
            return manifest_fields(specs, artifact_manifest(loaded, plan, table, specs, run.record, result))

        write_beside(loaded, root, FORMAT, manifest())
        if req.evaluate:
            result["metrics"] = _evaluate(req, root, choice.path, data, progress)
            write_beside(loaded, root, FORMAT, manifest())
        result["seconds"] = round(time.perf_counter() - t0, 2)
        if req.out is not None:
            result["out"] = str(req.out)
            result["file_bytes"] = sum(f.stat().st_size for f in weight_files(root))
    return result


def _inputs_digest(req: QuantizeRequest, source: Path, plan_from_file, data: _Data,
                   importance: _Importance | None = None) -> str:
    """What decides the artifact's bytes: the options, the plan file, the calibration tokens, the weights."""
    from dataclasses import asdict

    from compress.stream.checkpoint import weight_files
    from compress.stream.resume import inputs_digest

    options = {k: v for k, v in asdict(req).items() if k not in ("out", "resume", "offload_dir", "stream", "evaluate",
                                                                 "imatrix_out",
                                                                 "eval_tokens", "show_plan")}
    options["device"] = str(req.compute_device(streamed=True))  # auto resolves by machine: what the bytes follow
    extra = [json.dumps(plan_from_file.to_dict(), sort_keys=True) if plan_from_file is not None else "",
             data.calibration().data_hash if req.layerwise or req.method == "gptq" else "",
             importance.digest() if importance is not None else ""]
    return inputs_digest(options, weight_files(source), extra)


def _evaluate(req: QuantizeRequest, artifact: Path, source: Path, data: _Data, progress) -> dict:
    """The written artifact against its source on the evaluation windows, both read block by block."""
    from compress.stream.evaluate import evaluate_streaming
    from compress.stream.lazy import open_lazy

    device = req.compute_device(streamed=True)
    candidate = open_lazy(artifact, req.model, device=device)
    reference = open_lazy(source, req.model, device=device)
    return evaluate_streaming(candidate, reference, data.evaluation(reference.loaded), progress).to_dict()


@contextlib.contextmanager
def _destination(out: Path | None, resume: bool = False) -> Iterator[Path]:
    """The artifact directory to write: --out through a resumable partial directory (installed only when complete,
    kept after a kill for --resume), or a scratch directory removed afterwards when there is no --out."""
    from compress.atomic import resumable_dir

    if out is not None:
        with resumable_dir(Path(out), resume) as root:
            yield root
    else:
        with tempfile.TemporaryDirectory(prefix="compress-stream-") as root:
            yield Path(root)
