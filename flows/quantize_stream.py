"""`compress quantize` for a model that is not loaded whole (--stream on, or auto when it does not fit): the plan
as the in-memory flow makes it, the codes block by block (compress.stream.quantize), then the written artifact
evaluated against its source block by block (compress.stream.evaluate). Same artifact bytes as the in-memory
flow for the same request."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from compress.errors import UserError
from flows.quantize import QuantizeRequest, _Data, _plan, artifact_manifest


def check_streamable(req: QuantizeRequest) -> None:
    """UserError for the modes that still need the whole model in memory."""
    if req.layerwise:
        raise UserError("--layerwise measures every unit against the whole model, which does not stream yet: pass "
                        "--stream off (the model must fit in memory), or use --bits N / --plan FILE")
    if req.backend == "bnb":
        raise UserError("--backend bnb quantizes a whole loaded model: pass --stream off")
    if req.data in (None, "self") and (req.evaluate or req.method == "gptq"):
        raise UserError("--stream: --data self samples text from the whole model; pass --data FILE (text to "
                        "calibrate and evaluate on)")


def run_quantize_streaming(req: QuantizeRequest, choice, plan_from_file, progress=None) -> dict:
    """Plan, quantize block by block into the output (or a scratch directory without --out), evaluate from disk."""
    from compress.artifact import FORMAT, manifest_fields, write_beside
    from compress.quantize.apply import quantizable
    from compress.quantize.pipeline import needs_data
    from compress.stream.checkpoint import weight_files
    from compress.stream.lazy import open_lazy
    from compress.stream.quantize import quantize_streaming

    check_streamable(req)
    t0 = time.perf_counter()
    lazy = open_lazy(choice.path, req.model)
    if lazy.specs:
        raise UserError(f"{req.model} is already quantized: quantize its source model instead")
    loaded, lmap = lazy.loaded, lazy.lmap
    names = quantizable(loaded.module, lmap)
    result: dict = {"model": req.model, "notes": [choice.why], "stream": True}
    data = _Data(req, loaded)
    plan, _ = _plan(req, loaded, lmap, names, plan_from_file, data, result, progress)
    specs = plan.resolve(names)
    if req.show_plan:
        result["specs"] = {n: s.label() for n, s in specs.items()}
        return result
    calib = data.calibration() if needs_data(specs) else None
    with _destination(req.out) as (root, keep):
        run = quantize_streaming(lazy, specs, root, calib, progress, metadata={"format": FORMAT})
        result.update(specs=run.record.specs, size_bytes=int(run.size_bytes), bpw=round(run.bpw, 4))
        result["notes"] += run.record.notes

        def manifest() -> dict:
            return manifest_fields(specs, artifact_manifest(loaded, plan, None, specs, run.record, result))

        write_beside(loaded, root, FORMAT, manifest())
        if req.evaluate:
            result["metrics"] = _evaluate(req, root, choice.path, data, progress)
            write_beside(loaded, root, FORMAT, manifest())
        result["seconds"] = round(time.perf_counter() - t0, 2)
        if keep:
            result["out"] = str(req.out)
            result["file_bytes"] = sum(f.stat().st_size for f in weight_files(root))
    return result


def _evaluate(req: QuantizeRequest, artifact: Path, source: Path, data: _Data, progress) -> dict:
    """The written artifact against its source on the evaluation windows, both read block by block."""
    from compress.stream.evaluate import evaluate_streaming
    from compress.stream.lazy import open_lazy

    candidate = open_lazy(artifact, req.model)
    reference = open_lazy(source, req.model)
    return evaluate_streaming(candidate, reference, data.evaluation(reference.loaded), progress).to_dict()


class _destination:
    """The artifact directory to write: --out through atomic_dir (installed only when complete), or a scratch
    directory removed afterwards when there is no --out."""

    def __init__(self, out: Path | None):
        self.out = out

    def __enter__(self) -> tuple[Path, bool]:
        from compress.atomic import atomic_dir

        self._ctx = atomic_dir(Path(self.out)) if self.out is not None else tempfile.TemporaryDirectory(
            prefix="compress-stream-")
        root = self._ctx.__enter__()
        return Path(root), self.out is not None

    def __exit__(self, *exc) -> bool | None:
        return self._ctx.__exit__(*exc)
