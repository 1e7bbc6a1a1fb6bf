"""`compress run RECIPE.yaml` as a function: a list of steps run in order, each cached under a content key.

    model: smollm2-135m
    data: ../shared/data/text/austen        # default `data` of every step that reads data
    workdir: out/recipe                     # default: <recipe stem>.out beside the recipe
    defaults: {seq_len: 256, seed: 0}       # applied to every step that has the option
    steps:
      - prune: {blocks: 10%, method: bi}
      - quantize: {layerwise: true, avg_bits: 4.5, target: ort}
      - export: {format: int4}
      - eval: {protocol: anchors}
      - gate: {max_kl: 0.5, min_top1: 0.5}

Chaining is implicit: a step's input model is the output of the last model-producing step before it (prune,
quantize), or the recipe's `model`. `eval` compares the current model with the recipe's model (and that model with
itself on the same windows: the baseline); `gate` checks the last eval against thresholds; `validate` runs the last
export's graph again; `score` writes scores that a later `quantize --allocator rank` on the same model uses.

Every step gets key = sha256(step name, resolved options, key of the step before, tool version, contents of the
files it reads) and writes into WORKDIR/<NN>-<step>-<key[:12]>/, `done.json` last. A re-run skips steps whose
done.json carries their key; a changed option changes that step's key and every later one. WORKDIR/compress.json
collects every step's record, wall time and status (ran / cached / skipped).

Relative paths (model, data, workdir, files in options) are relative to the recipe's directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from compress.errors import UserError
from compress.outputs import MARKER
from compress.version import __version__
from evals.gate import GateOptions
from flows.cache import (
    content_key,
    data_fingerprint,
    file_fingerprint,
    jsonable,
    model_fingerprint,
    read_done,
    write_done,
)
from flows.evaluation import EvalRequest
from flows.score import ScoreRequest

FORMAT = "compress-recipe-v1"
SUMMARY = "compress.json"
TOP_LEVEL = ("model", "data", "workdir", "defaults", "arch", "trust_pickle", "steps")
ORIGINAL = "original"  # the input reference of the recipe's own model


class StepFailed(RuntimeError):
    """A step ran but its own check failed (an export or validate whose graph does not match)."""


# ---------------------------------------------------------------------------------------------------------------
# Options of the steps that have no request dataclass of their own


@dataclass
class ValidateOptions:
    """`validate`: the last export's graph against `reference` (default: the model it was exported from; 'original':
    the recipe's model). `quantized` judges by KL / top-1 only (default: when the reference is not the source of a
    quantized graph)."""

    reference: str | None = None
    quantized: bool | None = None
    max_kl: float | None = None
    min_top1: float | None = None
    data: str | None = None
    tokens: int = 512
    seq_len: int | None = 256
    seed: int = 0


# ---------------------------------------------------------------------------------------------------------------
# Plan: what the parser produces, what the runner executes


@dataclass
class PreparedStep:
    """One step of a recipe after parsing: options resolved, inputs known, key and output directory fixed."""

    index: int  # 1-based, as the user counts
    name: str
    line: int | None
    step: Step
    options: dict[str, Any]
    inputs: dict[str, Any] = field(default_factory=dict)  # role -> ORIGINAL or the index of an earlier step
    key: str = ""
    dir: Path = Path()
    facts: dict[str, Any] = field(default_factory=dict)  # what later steps may ask about this one while preparing

    @property
    def where(self) -> str:
        return f"step {self.index} ({self.name}{f', line {self.line}' if self.line else ''})"


@dataclass
class _State:
    """What the steps prepared so far produce (while preparing only)."""

    model: Any = ORIGINAL  # ORIGINAL or the index of the step whose output is the current model
    onnx: int | None = None
    scores: list[tuple[int, Any]] = field(default_factory=list)  # (score step, the model it scored)
    eval: int | None = None
    prepared: list[PreparedStep] = field(default_factory=list)


@dataclass
class Recipe:
    """A parsed recipe: where it is, the original model, the workdir and the prepared steps."""

    path: Path
    model: str
    workdir: Path
    arch: str | None
    trust_pickle: bool
    steps: list[PreparedStep]
    original_key: str
    sha256: str


@dataclass
class RunContext:
    """What a running step may ask: paths of earlier outputs, the original model, the progress display."""

    recipe: Recipe
    progress: Any = None

    def step(self, index: int) -> PreparedStep:
        return self.recipe.steps[index - 1]

    def model(self, ref: Any) -> str:
        """The model spec of an input reference: the recipe's model, or an earlier step's output directory."""
        return self.recipe.model if ref == ORIGINAL else str(self.step(ref).dir / "model")

    def load(self, spec: str):
        from compress.models import load_model

        return load_model(spec, arch=self.recipe.arch, trust_pickle=self.recipe.trust_pickle)


# ---------------------------------------------------------------------------------------------------------------
# Steps: one class per verb, registered by name


class Step:
    """A recipe step. Subclasses set `name`, `options` (a dataclass whose fields are the accepted keys) and
    implement `prepare` (check against earlier steps, set inputs, update the state) and `run` (do the work into
    `p.dir`, return the record). Register with `register_step`. A model-producing step, e.g. reparam:

        @register_step
        class ReparamStep(Step):
            name, options, outputs = "reparam", ReparamRequest, ("model",)
            def prepare(self, p, state, recipe_dir):
                p.inputs["model"], state.model = state.model, p.index   # later steps read its output
            def run(self, p, ctx):
                return run_reparam(ReparamRequest(model=ctx.model(p.inputs["model"]), out=p.dir / "model",
                                                  **p.options), progress=ctx.progress)

    Option keys, types (from the dataclass annotations), defaults, unknown-key errors and the cache key come
    for free; fields in `reserved` are the runner's; Path fields and `data` are content-hashed into the key."""

    name: ClassVar[str]
    options: ClassVar[type]
    aliases: ClassVar[dict[str, str]] = {}  # recipe key -> field name, e.g. format -> fmt
    reserved: ClassVar[tuple[str, ...]] = ("model", "out", "arch", "trust_pickle")  # set by the runner
    model_fields: ClassVar[tuple[str, ...]] = ()  # options naming a model: fingerprinted into the key
    gates: ClassVar[bool] = False  # its record's `passed` decides the run's verdict
    outputs: ClassVar[tuple[str, ...]] = ()  # files/dirs that must exist in p.dir for a cache hit

    def keys(self) -> dict[str, str]:
        """Accepted recipe keys -> dataclass field names."""
        names = [f.name for f in dataclasses.fields(self.options) if f.name not in self.reserved]
        shown = {v: k for k, v in self.aliases.items()}
        return {shown.get(n, n): n for n in names} | {n: n for n in names}

    def prepare(self, p: PreparedStep, state: _State, recipe_dir: Path) -> None:
        p.inputs["model"] = state.model

    def run(self, p: PreparedStep, ctx: RunContext) -> dict:
        raise NotImplementedError


STEPS: dict[str, Step] = {}


def register_step(cls: type[Step]) -> type[Step]:
    """Class decorator: add a step to the registry under `cls.name`."""
    STEPS[cls.name] = cls()
    return cls


@register_step
class ScoreStep(Step):
    name = "score"
    options = ScoreRequest
    reserved = (*Step.reserved, "plot", "sign")
    outputs = ("scores.json",)

    def prepare(self, p, state, recipe_dir):
        from compress.importance import parse_methods

        p.facts["methods"] = parse_methods(p.options["methods"])
        p.inputs["model"] = state.model
        state.scores.append((p.index, state.model))

    def run(self, p, ctx):
        from flows.score import ScoreRequest, run_score

        req = ScoreRequest(model=ctx.model(p.inputs["model"]), out=p.dir / "scores.json", sign=False, **p.options)
        return run_score(req, progress=ctx.progress, load=ctx.load).to_dict()


@register_step
class PruneStep(Step):
    name = "prune"
    outputs = ("model",)

    @property
    def options(self):
        from flows.prune import PruneRequest

        return PruneRequest

    def prepare(self, p, state, recipe_dir):
        import flows.prune as prune_run

        prune_run.check_request(prune_run.PruneRequest(model="-", **p.options))
        p.inputs["model"] = state.model
        state.model = p.index

    def run(self, p, ctx):
        import flows.prune as prune_run

        req = prune_run.PruneRequest(model=ctx.model(p.inputs["model"]), out=p.dir / "model", arch=ctx.recipe.arch,
                                     trust_pickle=ctx.recipe.trust_pickle, **p.options)
        return prune_run.run_prune(req, progress=ctx.progress)


@register_step
class QuantizeStep(Step):
    name = "quantize"
    aliases = {"plan": "plan_file"}
    reserved = (*Step.reserved, "show_plan")
    outputs = ("model",)

    @property
    def options(self):
        from flows.quantize import QuantizeRequest

        return QuantizeRequest

    def prepare(self, p, state, recipe_dir):
        import flows.quantize as quantize_run

        o = p.options
        needs_scores = o["layerwise"] and o["allocator"] == "rank" and o["scores"] is None
        if needs_scores:
            same = [i for i, m in state.scores if m == state.model]
            if not same:
                hint = ("the score steps before it scored another model (a prune ran in between): move a score step "
                        "after the last prune" if state.scores else "add a `score` step before it")
                raise UserError(f"{p.where}: allocator rank orders blocks by importance scores: {hint}, or pass "
                                "scores: FILE")
            p.inputs["scores"] = same[-1]
            methods = state.prepared[same[-1] - 1].facts["methods"]
            if o["rank_by"] not in methods:
                raise UserError(f"{p.where}: rank_by {o['rank_by']}: step {same[-1]} (score) computes "
                                f"{', '.join(methods)}; add it to its methods")
        placeholder = Path("scores.json") if needs_scores else o["scores"]
        quantize_run.check_request(quantize_run.QuantizeRequest(model="-", **{**o, "scores": placeholder}))
        p.inputs["model"] = state.model
        state.model = p.index

    def run(self, p, ctx):
        import flows.quantize as quantize_run

        opts = dict(p.options)
        if "scores" in p.inputs:
            opts["scores"] = ctx.step(p.inputs["scores"]).dir / "scores.json"
        req = quantize_run.QuantizeRequest(model=ctx.model(p.inputs["model"]), out=p.dir / "model",
                                           arch=ctx.recipe.arch, trust_pickle=ctx.recipe.trust_pickle, **opts)
        return quantize_run.run_quantize(req, progress=ctx.progress)


@register_step
class ExportStep(Step):
    name = "export"
    aliases = {"format": "fmt"}
    outputs = ("onnx",)

    @property
    def options(self):
        from flows.export import ExportRequest

        return ExportRequest

    def prepare(self, p, state, recipe_dir):
        from exporters.formats import check_export_options

        o = p.options
        fmt = check_export_options(o["fmt"], o["opset"], o["accuracy_level"], o["fuse_attention"])
        quantized_input = state.model != ORIGINAL and state.prepared[state.model - 1].name == "quantize"
        if fmt.quantized and not quantized_input:
            raise UserError(f"{p.where}: format {o['fmt']} exports a quantized artifact's own codes: put a "
                            f"`quantize: {{target: {fmt.target}, ...}}` step before it")
        p.inputs["model"] = state.model
        p.facts["fmt"] = o["fmt"]
        state.onnx = p.index

    def run(self, p, ctx):
        import flows.export as export_run

        req = export_run.ExportRequest(model=ctx.model(p.inputs["model"]), out=p.dir / "onnx", arch=ctx.recipe.arch,
                                       trust_pickle=ctx.recipe.trust_pickle, **p.options)
        result = export_run.run_export(req, progress=ctx.progress)
        if result["passed"] is False:
            failed = [f"{ref}: {c['name']}" for ref, rep in result["validation"].items() for c in rep["checks"]
                      if not c.get("passed")]
            raise StepFailed(f"{p.where}: the exported graph failed validation ({'; '.join(failed)}); see "
                             f"{p.dir / 'onnx' / 'README.md'}")
        return result


@register_step
class ValidateStep(Step):
    name = "validate"
    options = ValidateOptions
    model_fields = ("reference",)
    outputs = ("validation.json",)

    def prepare(self, p, state, recipe_dir):
        if state.onnx is None:
            raise UserError(f"{p.where}: validate checks an exported graph: put an `export` step before it")
        p.inputs["onnx"] = state.onnx
        ref = p.options["reference"]
        if ref in (None, "source"):
            p.options["reference"] = None
            p.inputs["reference"] = state.prepared[state.onnx - 1].inputs["model"]
        elif ref == ORIGINAL:
            reshaped = [i for i in _chain(state, state.prepared[state.onnx - 1].inputs["model"])
                        if state.prepared[i - 1].name == "prune" and state.prepared[i - 1].options["sparsity"] is None]
            if reshaped:
                raise UserError(f"{p.where}: reference original: step {reshaped[0]} (prune) changed the model's "
                                "shape and validate compares the KV cache layer by layer; validate against the "
                                "source (the default) and compare with the original in an `eval` step")
            p.options["reference"] = None
            p.inputs["reference"] = ORIGINAL
        else:
            p.options["reference"] = _resolve_spec(ref, recipe_dir)

    def run(self, p, ctx):
        from exporters.formats import QUANTIZED_FORMATS
        from exporters.validate import validate
        from flows.export import validation_inputs

        o = p.options
        export = ctx.step(p.inputs["onnx"])
        fmt = export.facts["fmt"]
        source = "reference" in p.inputs and p.inputs["reference"] == export.inputs["model"]
        spec = o["reference"] or ctx.model(p.inputs["reference"])
        ref = ctx.load(spec)
        loose = o["quantized"] if o["quantized"] is not None else (fmt in QUANTIZED_FORMATS and not source)
        kwargs = {"fmt": "fp32", "elementwise": False} if loose else {}
        inputs = validation_inputs(ref, o["data"], o["tokens"], o["seq_len"], o["seed"])
        report = validate(export.dir / "onnx", ref, inputs, kl_max=o["max_kl"], top1_min=o["min_top1"], **kwargs)
        record = {"reference": spec, "quantized": loose, "passed": report.passed, "report": report.to_dict()}
        from compress.atomic import write_json

        write_json(p.dir / "validation.json", jsonable(record))
        if not report.passed:
            failed = [c.name for c in report.checks if not c.passed]
            raise StepFailed(f"{p.where}: the graph of step {export.index} does not match {spec}: "
                             f"{', '.join(failed)}")
        return record


@register_step
class EvalStep(Step):
    name = "eval"
    options = EvalRequest
    reserved = (*Step.reserved, "baseline", "sign")
    model_fields = ("reference",)
    outputs = ("eval.json", "baseline.json")

    def prepare(self, p, state, recipe_dir):
        from flows.evaluation import check_request

        o = p.options
        check_request(EvalRequest(model="-", **o))
        p.inputs["model"] = state.model
        if o["reference"] in (None, ORIGINAL):
            o["reference"] = None
            p.inputs["reference"] = ORIGINAL
        else:
            o["reference"] = _resolve_spec(o["reference"], recipe_dir)
        state.eval = p.index

    def run(self, p, ctx):
        from compress.atomic import write_json
        from flows.evaluation import run_eval

        o = {**p.options, "reference": p.options["reference"] or ctx.model(p.inputs["reference"])}
        # one set of windows (from the reference) for the candidate and the baseline: gate checks they match
        result = run_eval(EvalRequest(model=ctx.model(p.inputs["model"]), baseline=True, **o), ctx.progress,
                          load=ctx.load)
        write_json(p.dir / "eval.json", jsonable(result["candidate"]))
        write_json(p.dir / "baseline.json", jsonable(result["baseline"]))
        return result


@register_step
class GateStep(Step):
    name = "gate"
    options = GateOptions
    gates = True
    outputs = ("gate.json",)

    def prepare(self, p, state, recipe_dir):
        if state.eval is None:
            raise UserError(f"{p.where}: gate checks an eval report: put an `eval` step before it")
        p.inputs["eval"] = state.eval
        p.facts["limits"] = self.limits(p)

    def limits(self, p: PreparedStep) -> dict[str, float]:
        from evals import gate as g

        o = p.options
        try:
            limits = g.load_thresholds(o["thresholds"]) if o["thresholds"] is not None else {}
        except UserError as exc:
            raise UserError(f"{p.where}: {exc}") from exc
        for k in g.THRESHOLDS:
            if o.get(k) is not None:
                limits[k] = g.parse_limit(o[k], f"{p.where}: {k}")
        if not limits:
            raise UserError(f"{p.where}: no thresholds: give e.g. max_kl: 0.05, min_top1: 0.9 (keys: "
                            f"{', '.join(g.THRESHOLDS)}) or thresholds: FILE")
        return limits

    def run(self, p, ctx):
        from compress.atomic import write_json, write_text
        from evals import gate as g

        ev = ctx.step(p.inputs["eval"]).dir
        result = g.run_gate(g.load_report(ev / "baseline.json", "baseline"),
                            g.load_report(ev / "eval.json", "candidate"), self.limits(p))
        write_text(p.dir / "junit.xml", g.junit_xml(result))
        write_text(p.dir / "gate.md", g.markdown(result))
        record = result.to_dict()
        write_json(p.dir / "gate.json", jsonable(record))
        return record


def _chain(state: _State, ref: Any) -> list[int]:
    """The model-producing steps behind `ref`, latest first."""
    out = []
    while ref != ORIGINAL:
        out.append(ref)
        ref = state.prepared[ref - 1].inputs["model"]
    return out


# ---------------------------------------------------------------------------------------------------------------
# Parsing


class _Map(dict):
    """A YAML mapping that remembers the line of each key."""

    def __init__(self, line: int | None = None):
        super().__init__()
        self.line = line
        self.lines: dict[Any, int] = {}


class _Seq(list):
    """A YAML sequence that remembers the line of each item."""

    def __init__(self, items, lines: list[int], line: int | None = None):
        super().__init__(items)
        self.line = line
        self.lines = lines


def _load_yaml(path: Path) -> Any:
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def mapping(loader, node):
        loader.flatten_mapping(node)
        out = _Map(node.start_mark.line + 1)
        for k, v in node.value:
            key = loader.construct_object(k, deep=True)
            line, col = k.start_mark.line + 1, k.start_mark.column + 1
            try:
                seen = key in out
            except TypeError:
                raise UserError(f"recipe {path}: line {line}, column {col}: a key must be a plain name") from None
            if seen:
                raise UserError(f"recipe {path}: line {line}, column {col}: duplicate key '{key}'")
            out[key] = loader.construct_object(v, deep=True)
            out.lines[key] = line
        return out

    def sequence(loader, node):
        return _Seq([loader.construct_object(c, deep=True) for c in node.value],
                    [c.start_mark.line + 1 for c in node.value], node.start_mark.line + 1)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, sequence)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"recipe {path}: cannot read it ({exc.strerror or exc})") from exc
    try:
        return yaml.load(text, Loader=Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "unknown position"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"recipe {path}: malformed YAML at {where}: {problem}") from exc


def _kind(value: Any) -> str:
    return "a list" if isinstance(value, list) else "a mapping" if isinstance(value, dict) else type(value).__name__


def _norm(key: Any) -> str:
    return str(key).strip().replace("-", "_")


def _resolve_path(value: str | Path, base: Path) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p


def _resolve_spec(spec: str, base: Path) -> str:
    """A model spec: a path relative to the recipe when it exists there, else as written (zoo name)."""
    from compress.models.zoo import ZOO

    if spec in ZOO:
        return spec
    p = _resolve_path(spec, base)
    return str(p) if p.exists() else spec


def _resolve_data(spec: str | None, base: Path) -> str | None:
    """Data spec parts (files, directories, globs; comma-separated) made relative to the recipe."""
    if spec in (None, "self"):
        return spec
    return ",".join(str(_resolve_path(part.strip(), base)) for part in str(spec).split(",") if part.strip())


def _coerce(value: Any, annotation: str, what: str) -> Any:
    """A YAML value as the dataclass field's type (annotations are strings under `from __future__`)."""
    kinds = {t.strip() for t in str(annotation).split("|")}
    if value is None:
        if "None" in kinds:
            return None
        raise UserError(f"{what}: needs a value ({annotation})")
    if isinstance(value, bool):
        if "bool" in kinds:
            return value
        raise UserError(f"{what}: expected {annotation}, got {value!r}")
    if "bool" in kinds:
        raise UserError(f"{what}: expected true or false, got {value!r}")
    if "int" in kinds and isinstance(value, int):
        return value
    if "float" in kinds and isinstance(value, int | float):
        return float(value)
    if kinds & {"int", "float"} and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            number = float(value)
        except ValueError:
            pass
        else:
            if "float" in kinds:
                return number
            if number.is_integer():
                return int(number)
    if "Path" in kinds and isinstance(value, str):
        return Path(value)
    if "str" in kinds:
        if isinstance(value, list) and all(isinstance(v, str | int | float) and not isinstance(v, bool)
                                           for v in value):
            return ",".join(str(v) for v in value)  # methods: [lim, zd] -> "lim,zd"
        if isinstance(value, str | int | float):
            return str(value)
    if "int" in kinds and isinstance(value, float) and value.is_integer():
        return int(value)
    raise UserError(f"{what}: expected {annotation.replace('Path', 'a file path')}, got {value!r}")


def _step_options(step: Step, p: PreparedStep, raw: Any, defaults: dict, recipe_dir: Path) -> dict:
    """The step's options as its dataclass's fields (with defaults), from recipe keys; unknown keys refused."""
    where = p.where
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{where}: options must be a mapping (e.g. `- {step.name}: {{key: value}}`), got "
                        f"{_kind(raw)}")
    accepted = step.keys()
    shown = sorted({k for k, v in accepted.items() if k == v and k not in step.aliases.values()} |
                   set(step.aliases))
    given: dict[str, Any] = {}
    for key, value in raw.items():
        k = _norm(key)
        line = getattr(raw, "lines", {}).get(key) or p.line
        at = f"step {p.index} ({p.name}{f', line {line}' if line else ''})"
        if k in step.reserved:
            raise UserError(f"{at}: '{key}' is set by the runner (the previous step's output / the step directory)"
                            f"; valid keys: {', '.join(shown)}")
        if k not in accepted:
            raise UserError(f"{at}: unknown key '{key}'; valid keys: {', '.join(shown)}")
        name = accepted[k]
        if name in given:
            raise UserError(f"{at}: '{key}' given twice")
        given[name] = (value, at)
    fields = {f.name: f for f in dataclasses.fields(step.options) if f.name not in step.reserved}
    defaults = {accepted[k]: v for k, v in defaults.items() if k in accepted}
    out: dict[str, Any] = {}
    for name, f in fields.items():
        if name in given:
            value, at = given[name]
            out[name] = _coerce(value, f.type, f"{at}: {name}")
        elif name in defaults:
            value, at = defaults[name]
            out[name] = _coerce(value, f.type, f"{at}: {name} (for {where})")
        elif f.default is not dataclasses.MISSING:
            out[name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[name] = f.default_factory()
        else:
            raise UserError(f"{where}: '{name}' is required")
        if name == "data":
            out[name] = _resolve_data(out[name], recipe_dir)
        elif isinstance(out[name], Path):
            out[name] = _resolve_path(out[name], recipe_dir)
    return out


def _fingerprint_options(step: Step, p: PreparedStep) -> dict:
    """Options for the key: files (paths, data specs, named models) replaced by their content fingerprints."""
    out = {}
    for name, value in p.options.items():
        try:
            if name == "data":
                out[name] = data_fingerprint(value)
            elif isinstance(value, Path):
                shown = {v: k for k, v in step.aliases.items()}.get(name, name)
                out[name] = file_fingerprint(value, f"{p.where}: {shown}")
            elif name in step.model_fields and value is not None:
                out[name] = model_fingerprint(value)
            else:
                out[name] = value
        except UserError as exc:
            msg = str(exc)
            raise UserError(msg if msg.startswith("step ") else f"{p.where}: {msg}") from exc
    return out


def load_recipe(path: Path) -> Recipe:
    """Parse and prepare a recipe: every option checked and every key computed before anything runs."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe {path}: no such file")
    doc = _load_yaml(path)
    if doc is None:
        raise UserError(f"recipe {path}: empty; write `model:` and `steps:`")
    if not isinstance(doc, dict):
        raise UserError(f"recipe {path}: expected a mapping with `model:` and `steps:`, got {_kind(doc)}")
    lines = getattr(doc, "lines", {})
    for key in doc:
        if _norm(key) not in TOP_LEVEL:
            raise UserError(f"recipe {path}: line {lines.get(key, '?')}: unknown key '{key}'; valid keys: "
                            f"{', '.join(TOP_LEVEL)}")
    doc = {_norm(k): v for k, v in doc.items()}
    lines = {_norm(k): v for k, v in lines.items()}
    base = path.resolve().parent
    model = doc.get("model")
    if model in (None, "") or not isinstance(model, str | int):
        raise UserError(f"recipe {path}: missing `model:` (a zoo name, an HF model directory or a weights file)")
    model = _resolve_spec(str(model), base)
    arch = doc.get("arch")
    arch = _resolve_spec(str(arch), base) if arch is not None else None
    trust = doc.get("trust_pickle", False)
    if not isinstance(trust, bool):
        raise UserError(f"recipe {path}: line {lines.get('trust_pickle')}: trust_pickle must be true or false")
    workdir = doc.get("workdir")
    workdir = _resolve_path(str(workdir), base) if workdir else base / f"{path.stem}.out"
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"recipe {path}: workdir {workdir} exists and is not a directory")

    defaults: dict[str, tuple[Any, str]] = {}
    raw_defaults = doc.get("defaults") or {}
    if not isinstance(raw_defaults, dict):
        raise UserError(f"recipe {path}: line {lines.get('defaults')}: defaults must be a mapping of options")
    known = {k for s in STEPS.values() for k in s.keys()}  # noqa: SIM118 - Step.keys()
    for key, value in raw_defaults.items():
        line = getattr(raw_defaults, "lines", {}).get(key)
        k = _norm(key)
        if k not in known:
            raise UserError(f"recipe {path}: line {line}: defaults: unknown key '{key}'; no step takes it")
        defaults[k] = (value, f"defaults (line {line})")
    if "data" in doc:
        defaults.setdefault("data", (doc["data"], f"data (line {lines.get('data')})"))

    steps = doc.get("steps")
    if steps is None or (isinstance(steps, list) and not steps):
        raise UserError(f"recipe {path}: no steps; add e.g. `steps: [{{quantize: {{bits: 4}}}}]` (known steps: "
                        f"{', '.join(STEPS)})")
    if not isinstance(steps, list):
        raise UserError(f"recipe {path}: line {lines.get('steps')}: steps must be a list (`- prune: {{...}}`)")

    try:
        original = {"model": model_fingerprint(model), "arch": model_fingerprint(arch) if arch else None,
                    "trust_pickle": trust}
    except UserError as exc:
        raise UserError(f"recipe {path}: {exc}") from exc
    original_key = content_key(original)
    state = _State()
    prepared = state.prepared
    prev_key = original_key
    for i, item in enumerate(steps, start=1):
        line = steps.lines[i - 1] if isinstance(steps, _Seq) else None
        at = f"step {i}{f' (line {line})' if line else ''}"
        if isinstance(item, str):
            name, raw = item, None
        elif isinstance(item, dict) and len(item) == 1:
            name, raw = next(iter(item.items()))
        else:
            raise UserError(f"recipe {path}: {at}: write one step per item, e.g. `- prune: {{blocks: 10%}}` "
                            f"(known steps: {', '.join(STEPS)})")
        name = _norm(name)
        if name not in STEPS:
            raise UserError(f"recipe {path}: {at}: unknown step '{name}'; known steps: {', '.join(STEPS)}")
        step = STEPS[name]
        p = PreparedStep(i, name, line, step, {})
        p.options = _step_options(step, p, raw, defaults, base)
        try:
            step.prepare(p, state, base)
        except UserError as exc:
            msg = str(exc)
            raise UserError(msg if msg.startswith("step ") else f"{p.where}: {msg}") from exc
        payload = {"step": name, "options": _fingerprint_options(step, p), "input": prev_key,
                   "inputs": {role: original_key if ref == ORIGINAL else prepared[ref - 1].key
                              for role, ref in p.inputs.items()},
                   "tool_version": __version__}
        p.key = content_key(payload)
        p.dir = workdir / f"{i:02d}-{name}-{p.key[:12]}"
        prepared.append(p)
        prev_key = p.key
    return Recipe(path.resolve(), model, workdir, arch, trust, prepared, original_key,
                  hashlib.sha256(path.read_bytes()).hexdigest())


# ---------------------------------------------------------------------------------------------------------------
# Running


def run_recipe(path: Path, progress=None, resume: bool = True,
               on_event: Callable[[dict], None] | None = None, force: bool = False) -> dict:
    """Run every step of the recipe at `path` in order, skipping those already done under the same key (unless
    `resume` is False); write WORKDIR/compress.json and return it. `passed` is False when a gate step failed (the
    steps after it are skipped); any other failure raises (UserError for bad input, StepFailed for a failed
    export/validate check), after writing compress.json with the steps so far and the error.

    `on_event` receives {index, step, status: start|ran|cached|skipped|failed, dir, seconds} per step. The workdir
    must be new, empty or an earlier run's (`force` replaces whatever is there)."""
    from compress.atomic import ensure_workdir
    from compress.outputs import claim

    recipe = load_recipe(path)
    claim(recipe.workdir, force, "dir", f"recipe {recipe.path}: workdir")
    if force and recipe.workdir.is_dir() and not (recipe.workdir / MARKER).is_file():
        shutil.rmtree(recipe.workdir)
    ensure_workdir(recipe.workdir)
    ctx = RunContext(recipe, progress)
    entries: list[dict] = []
    passed = True
    t0 = time.perf_counter()
    emit = on_event or (lambda event: None)
    current: PreparedStep | None = None
    step_t0 = t0
    try:
        for p in recipe.steps:
            current = p
            if not passed:
                entries.append(_entry(p, recipe, "skipped", 0.0, None, None))
                emit({"index": p.index, "step": p.name, "status": "skipped", "dir": str(p.dir), "seconds": 0.0})
                continue
            step_t0 = time.perf_counter()
            entry = _run_step(p, ctx, resume, emit)
            entries.append(entry)
            if p.step.gates and (entry["record"] or {}).get("passed") is False:
                passed = False
    except BaseException as exc:
        if current is not None and len(entries) < current.index:
            entries.append(_entry(current, recipe, "failed", time.perf_counter() - step_t0, None, None))
        summary = _summary(recipe, entries, None, time.perf_counter() - t0)
        summary["error"] = {"step": current.index if current else None, "type": type(exc).__name__,
                            "message": str(exc)}
        _write_summary(recipe, summary)
        raise
    summary = _summary(recipe, entries, passed, time.perf_counter() - t0)
    _write_summary(recipe, summary)
    return summary


def _run_step(p: PreparedStep, ctx: RunContext, resume: bool, emit) -> dict:
    t0 = time.perf_counter()
    if resume:
        done = read_done(p.dir, p.key)
        if done is not None and all((p.dir / o).exists() for o in p.step.outputs):
            seconds = time.perf_counter() - t0
            emit({"index": p.index, "step": p.name, "status": "cached", "dir": str(p.dir), "seconds": seconds})
            return _entry(p, ctx.recipe, "cached", seconds, done.get("seconds"), done.get("record"))
    if p.dir.exists():  # an interrupted or stale attempt under this key: start clean
        shutil.rmtree(p.dir)
    p.dir.mkdir(parents=True)
    emit({"index": p.index, "step": p.name, "status": "start", "dir": str(p.dir), "seconds": 0.0})
    try:
        record = jsonable(p.step.run(p, ctx))
    except UserError as exc:
        emit({"index": p.index, "step": p.name, "status": "failed", "dir": str(p.dir),
              "seconds": time.perf_counter() - t0})
        msg = str(exc)
        raise UserError(msg if msg.startswith("step ") else f"{p.where}: {msg}") from exc
    except BaseException:
        emit({"index": p.index, "step": p.name, "status": "failed", "dir": str(p.dir),
              "seconds": time.perf_counter() - t0})
        raise
    seconds = round(time.perf_counter() - t0, 3)
    write_done(p.dir, {"key": p.key, "index": p.index, "step": p.name, "tool_version": __version__,
                       "options": p.options, "inputs": _inputs(p, ctx.recipe), "seconds": seconds,
                       "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "record": record})
    emit({"index": p.index, "step": p.name, "status": "ran", "dir": str(p.dir), "seconds": seconds})
    return _entry(p, ctx.recipe, "ran", seconds, seconds, record)


def _inputs(p: PreparedStep, recipe: Recipe) -> dict:
    return {role: {"step": ref, "key": recipe.steps[ref - 1].key} if ref != ORIGINAL
            else {"model": recipe.model, "key": recipe.original_key} for role, ref in p.inputs.items()}


def _entry(p: PreparedStep, recipe: Recipe, status: str, seconds: float, ran_seconds: float | None,
           record: dict | None) -> dict:
    return {"index": p.index, "step": p.name, "status": status, "key": p.key,
            "dir": str(p.dir.relative_to(recipe.workdir)), "seconds": round(seconds, 3),
            "ran_seconds": ran_seconds, "options": jsonable(p.options), "inputs": _inputs(p, recipe),
            "record": record}


def _summary(recipe: Recipe, entries: list[dict], passed: bool | None, seconds: float) -> dict:
    outputs: dict[str, str] = {}
    for e in entries:
        if e["status"] not in ("ran", "cached"):
            continue
        p = recipe.steps[e["index"] - 1]
        for o in p.step.outputs:
            outputs[o] = str(p.dir / o)
    return {"format": FORMAT, "tool_version": __version__, "recipe": str(recipe.path),
            "recipe_sha256": recipe.sha256, "model": recipe.model, "workdir": str(recipe.workdir),
            "passed": passed, "seconds": round(seconds, 3),
            "ran": sum(e["status"] == "ran" for e in entries), "cached": sum(e["status"] == "cached" for e in entries),
            "outputs": outputs, "steps": entries}


def _write_summary(recipe: Recipe, summary: dict) -> None:
    from compress.atomic import write_json

    write_json(recipe.workdir / SUMMARY, jsonable(summary))
