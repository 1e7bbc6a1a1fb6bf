"""Float ONNX export of a loaded model: decoders with a KV cache and encoders through optimum-onnx, any other
nn.Module (CNNs) through `torch.onnx.export(dynamo=True)` with a dynamic batch dimension.

The output directory is written atomically (complete or absent) and holds the graph, `export.json` (what was
exported, how, how long) and, for transformers models, their config and tokenizer.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from compress.atomic import atomic_dir
from compress.errors import UserError
from compress.models.hf import LoadedModel
from exporters.formats import FLOAT_FORMATS, OPSETS

EXPORT_JSON = "export.json"
MODEL_FILE = "model.onnx"
TASKS = {"decoder": "text-generation-with-past", "encoder": "feature-extraction"}
IMAGE_SHAPE = (3, 224, 224)


@dataclass
class ExportResult:
    """What `export_float` wrote: the graph file(s) under `out_dir`, the task, opset, format and wall time."""

    out_dir: Path
    files: list[str]  # graph files, relative to out_dir; the first is the model
    task: str
    fmt: str
    opset: int
    seconds: float
    input_names: list[str]
    output_names: list[str]
    exporter: str
    source: str
    extra: dict = field(default_factory=dict)

    @property
    def onnx_path(self) -> Path:
        """The main ONNX graph file."""
        return self.out_dir / self.files[0]

    @property
    def onnx_paths(self) -> list[Path]:
        """Every graph file written."""
        return [self.out_dir / f for f in self.files]

    def to_dict(self) -> dict:
        """JSON-ready; paths relative to `out_dir` (the content of export.json)."""
        d = asdict(self)
        d.pop("out_dir")
        return d


def export_float(
    loaded: LoadedModel | nn.Module,
    out_dir: Path,
    fmt: str = "fp32",
    opset: int | None = None,
    example_inputs: tuple[torch.Tensor, ...] | None = None,
) -> ExportResult:
    """Export `loaded` to a float ONNX graph in `out_dir` (atomic); fp16 converts the fp32 graph, fp32 I/O kept.

    Decoders get `text-generation-with-past` (one graph; an empty past does the prefill), encoders
    `feature-extraction`; other modules need `example_inputs` unless they are CNNs (kind "cnn": 3x224x224 images).
    """
    if fmt not in FLOAT_FORMATS:
        raise UserError(f"export format '{fmt}' is not a float format: use one of {', '.join(FLOAT_FORMATS)}")
    if opset is not None and opset not in OPSETS:
        raise UserError(f"--opset {opset}: use an opset from {OPSETS.start} to {OPSETS.stop - 1}")
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        result = write_float(loaded, tmp, fmt, opset, example_inputs)
        result.out_dir = out_dir
    return result


def write_float(loaded: LoadedModel | nn.Module, directory: Path, fmt: str = "fp32", opset: int | None = None,
                example_inputs: tuple[torch.Tensor, ...] | None = None) -> ExportResult:
    """export_float's work, written straight into `directory` (a caller's own temporary directory: no second
    atomic swap inside the first)."""
    kind = loaded.kind if isinstance(loaded, LoadedModel) else "module"
    module = loaded.module if isinstance(loaded, LoadedModel) else loaded
    source = loaded.spec if isinstance(loaded, LoadedModel) else type(module).__name__
    tmp = Path(directory)
    tmp.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if kind in TASKS:
        task, exporter = TASKS[kind], "optimum-onnx"
        _export_transformers(loaded, tmp, TASKS[kind], opset)
    else:
        task, exporter = "module", "torch.onnx.export(dynamo=True)"
        _export_module(module, tmp / MODEL_FILE, _example_inputs(module, kind, example_inputs), opset)
    if fmt == "fp16":
        _convert_fp16(tmp / MODEL_FILE)
    files = sorted(p.name for p in tmp.glob("*.onnx"))
    files.remove(MODEL_FILE)
    files.insert(0, MODEL_FILE)
    graph_opset, inputs, outputs = _graph_info(tmp / MODEL_FILE)
    result = ExportResult(tmp, files, task, fmt, graph_opset, round(time.perf_counter() - start, 2),
                          inputs, outputs, exporter, source, _versions())
    (tmp / EXPORT_JSON).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return result


def read_export(path: Path) -> ExportResult | None:
    """The ExportResult recorded in an export directory (or beside a graph file), None when there is no export.json."""
    path = Path(path)
    out_dir = path if path.is_dir() else path.parent
    meta = out_dir / EXPORT_JSON
    if not meta.is_file():
        return None
    return ExportResult(out_dir=out_dir, **json.loads(meta.read_text()))


def _export_transformers(loaded: LoadedModel, tmp: Path, task: str, opset: int | None) -> None:
    """optimum-onnx straight from the loaded module (no re-load from disk); its own validation is off: we validate."""
    from optimum.exporters.onnx import onnx_export_from_model

    module = loaded.module
    if not hasattr(module, "config"):
        raise UserError(f"{loaded.spec}: a {loaded.kind} without a transformers config cannot go through optimum; "
                        "export the module with example inputs instead")
    custom = None
    if _is_moe(module):
        module, custom = _moe_ready(module)
    patched = "forward" in module.__dict__
    try:
        with _quiet(), _export_errors(module):
            onnx_export_from_model(module, tmp, opset=opset, task=task, do_validation=False,
                                   custom_onnx_configs=custom)
    finally:
        if not patched:  # optimum restores forward as an instance attribute; drop it, the class method is the same
            module.__dict__.pop("forward", None)
    if loaded.tokenizer is not None and hasattr(loaded.tokenizer, "save_pretrained"):
        loaded.tokenizer.save_pretrained(tmp)


def _is_moe(module: nn.Module) -> bool:
    from compress.moe.layout import MOE_FAMILIES

    return getattr(getattr(module, "config", None), "model_type", None) in MOE_FAMILIES


def _moe_ready(module: nn.Module) -> tuple[nn.Module, dict | None]:
    """A copy whose sparse MoE blocks run every expert under a dense routing matrix (tracing keeps all of the
    routing, not the experts the dummy input happened to hit), and an ONNX config for families optimum lacks."""
    import copy

    from compress.moe.export_ready import export_friendly

    twin = export_friendly(copy.deepcopy(module))
    if module.config.model_type != "mixtral":
        return twin, None
    from optimum.exporters.onnx.model_configs import MistralOnnxConfig  # Mixtral's attention is Mistral's

    return twin, {"model": MistralOnnxConfig(module.config, task="text-generation", use_past=True,
                                             use_past_in_inputs=True)}


def _export_module(module: nn.Module, path: Path, example: tuple[torch.Tensor, ...], opset: int | None) -> None:
    """The dynamo exporter with dim 0 of every input dynamic (batch); names `pixel_values`/`logits` for images."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    one_image = len(example) == 1 and example[0].dim() == 4
    names = (["pixel_values"], ["logits"]) if one_image else (None, None)
    was_training = module.training
    module.eval()
    try:
        with _quiet(), _export_errors(module), torch.no_grad():
            torch.onnx.export(module, example, str(path), dynamo=True, opset_version=opset, input_names=names[0],
                              output_names=names[1], dynamic_shapes=tuple({0: batch} for _ in example),
                              external_data=False)
    finally:
        module.train(was_training)


def _example_inputs(module: nn.Module, kind: str, given: tuple[torch.Tensor, ...] | None) -> tuple[torch.Tensor, ...]:
    """Inputs to trace with: those given, or two seeded random images for a CNN (batch 2 so it stays dynamic)."""
    if given is not None:
        return tuple(given) if isinstance(given, (tuple, list)) else (given,)
    if kind == "cnn":
        return (torch.randn(2, *IMAGE_SHAPE, generator=torch.Generator().manual_seed(0)),)
    raise UserError(f"{type(module).__name__}: not a transformers decoder/encoder; pass example_inputs "
                    "(a tuple of tensors with the batch on dim 0) to export it")


def _convert_fp16(path: Path) -> None:
    """fp32 graph -> fp16 weights and compute, inputs and outputs kept fp32 (casts at the edges)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(path))
    with _quiet():
        model = convert_float_to_float16(model, keep_io_types=True)
    onnx.save(model, str(path))


def _graph_info(path: Path) -> tuple[int, list[str], list[str]]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    inits = {i.name for i in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in inits]
    return opset, inputs, [o.name for o in model.graph.output]


@contextlib.contextmanager
def _export_errors(module: nn.Module) -> Iterator[None]:
    """Any exporter failure becomes one UserError line naming the module and the op (or the summary) that failed."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - exporters raise many types; all mean "this module does not export"
        raise UserError(f"cannot export {type(module).__name__} to ONNX: {_summary(exc)}") from exc


def _summary(exc: BaseException) -> str:
    """The useful line of an exporter error: the unsupported op if named, else the exception summary."""
    text = str(exc)
    op = re.search(r"op='([\w.:]+)'", text) or re.search(r"\b(aten::\w+|aten\.\w+(?:\.\w+)?)", text)
    if "## Exception summary" in text:
        text = text.split("## Exception summary", 1)[1]
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    first = re.sub(r"^<class '[\w.]+'>:\s*", "", lines[0]) if lines else type(exc).__name__
    first = first[:200]
    return f"unsupported op {op.group(1)} ({first})" if op else first


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence exporter chatter (tracer warnings, printed graphs, registration logs) for the duration."""
    names = ["torch.onnx", "torch.export", "torch.fx", "torch._dynamo", "optimum", "onnxscript", "root"]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _versions() -> dict:
    import onnx

    import compress

    out = {"torch": torch.__version__, "onnx": onnx.__version__, "compress": getattr(compress, "__version__", "")}
    with contextlib.suppress(ImportError):
        import transformers

        out["transformers"] = transformers.__version__
    return {"versions": out}
