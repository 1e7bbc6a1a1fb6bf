"""Quantize a model block by block without ever holding it whole: each block is read from the checkpoint, its
codes made (RTN, HQQ, or GPTQ on calibration hidden states that flow block to block), written to the output shard
and freed. The codes, and therefore the artifact's bytes, are those of the in-memory path
(compress.quantize.pipeline.quantize) for the same inputs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from compress.data import Windows
from compress.errors import UserError
from compress.quantize.apply import Record, apply_plan, weight_matrix
from compress.quantize.spec import QuantSpec
from compress.stream.lazy import Calls, LazyModel
from compress.stream.shards import ShardWriter, as_stored

CALIBRATION_BATCH = 4  # windows per calibration batch: BlockRunner's, so GPTQ's Hessians add up identically


@dataclass
class StreamedRun:
    """What a streaming quantization wrote and counted: the module specs, notes, and the footprint figures
    weight_footprint would give for the whole quantized model."""

    record: Record
    size_bytes: int = 0
    weight_bytes: int = 0
    weight_params: int = 0
    shards: list[Path] = field(default_factory=list)

    @property
    def bpw(self) -> float:
        """Stored bits per weight of the weight matrices."""
        return self.weight_bytes * 8 / self.weight_params if self.weight_params else float("nan")


def quantize_streaming(lazy: LazyModel, specs: dict[str, QuantSpec], root: Path, windows: Windows | None = None,
                       progress=None, metadata: dict[str, str] | None = None) -> StreamedRun:
    """Quantize `lazy` per `specs` block by block, writing safetensors shards into `root`; `windows` feed GPTQ."""
    from compress.quantize.hqq import hqq_quantize
    from compress.quantize.pipeline import _gptq_head_target, gptq_block, gptq_head, needs_data

    model, lmap = lazy.model, lazy.lmap
    if needs_data(specs) and windows is None:
        raise UserError("gptq needs calibration data: pass --data")
    run = StreamedRun(Record())
    writer = ShardWriter(root, metadata=metadata)
    stored = lazy.checkpoint.dtypes
    batches = _capture(lazy, windows) if needs_data(specs) else []
    hidden = [c.hidden for c in batches]
    task = progress.add_task("quantize blocks", total=len(lmap.blocks) + 1) if progress is not None else None
    with torch.inference_mode():
        for blk in lmap.blocks:
            lazy.load_block(blk.index)
            mine = {n: specs[n] for n in blk.linears if n in specs}

            def feed(i=blk.index, hidden=hidden):
                for b, calls in enumerate(batches):
                    lazy.run_block(i, calls, hidden[b])

            codes = gptq_block(model, blk.linears, mine, feed) if batches else {}
            codes.update({n: hqq_quantize(weight_matrix(model.get_submodule(n)), s) for n, s in mine.items()
                          if s.method == "hqq" and not s.is_float})
            hidden = [lazy.run_block(blk.index, calls, hidden[b]) for b, calls in enumerate(batches)]
            _merge(run.record, apply_plan(model, lmap, mine, codes))
            block = lazy.blocks[blk.index]
            _count(run, lazy, block)
            prefix = f"{lmap.blocks_path}.{blk.index}."
            writer.add(as_stored({prefix + k: v for k, v in block.state_dict().items()}, stored, lazy.dtype))
            lazy.drop_block(blk.index)
            if progress is not None:
                progress.update(task, advance=1, description=f"quantize blocks ({_gb(lazy)} read)")
        trunk = {n: s for n, s in specs.items() if not n.startswith(lmap.blocks_path + ".")}
        lazy.load_trunk(keep_storage=not trunk)
        widened = () if trunk else lazy.big_tables()
        codes = {}
        if batches and _gptq_head_target(model, lmap, trunk) is not None:
            codes.update(gptq_head(model, lmap, trunk, [lazy.final_hidden(h) for h in hidden]))
        codes.update({n: hqq_quantize(weight_matrix(model.get_submodule(n)), s) for n, s in trunk.items()
                      if s.method == "hqq" and not s.is_float})
        _merge(run.record, apply_plan(model, lmap, trunk, codes))
        state = {n: t for n, t in model.state_dict().items() if not n.startswith(lmap.blocks_path + ".")}
        _count_trunk(run, lazy, widened)
        writer.add(as_stored(_dedupe(state), stored, lazy.dtype))
        lazy.drop_trunk()
        if progress is not None:
            progress.advance(task)
    run.shards = writer.finish()
    return run


def _gb(lazy: LazyModel) -> str:
    return f"{lazy.checkpoint.bytes_read / 1e9:.1f} GB"


def _capture(lazy: LazyModel, windows: Windows) -> list[Calls]:
    """Block 0's input and every block's arguments for each calibration batch (the trunk loaded meanwhile)."""
    lazy.load_trunk()
    try:
        return [lazy.capture(windows.input_ids[s:s + CALIBRATION_BATCH],
                             windows.attention_mask[s:s + CALIBRATION_BATCH])
                for s in range(0, len(windows.input_ids), CALIBRATION_BATCH)]
    finally:
        lazy.drop_trunk()


def _merge(into: Record, part: Record) -> None:
    into.specs.update(part.specs)
    into.notes += part.notes


def _count(run: StreamedRun, lazy: LazyModel, module: torch.nn.Module) -> None:
    f = lazy.footprint(module)
    run.size_bytes += f["size_bytes"]
    run.weight_bytes += f["weight_bytes"]
    run.weight_params += f["weight_params"]


def _count_trunk(run: StreamedRun, lazy: LazyModel, widened: tuple[str, ...]) -> None:
    """weight_footprint's rule over the modules outside the stack; the tables kept in their storage dtype
    (`widened`) counted at the compute dtype's width, as the in-memory model holds them."""
    wide = torch.empty((), dtype=lazy.dtype).element_size()
    stack = lazy.lmap.blocks_path
    seen: set[int] = set()
    for mname, m in lazy.model.named_modules():
        if mname == stack or mname.startswith(stack + "."):
            continue
        packed = hasattr(m, "stored_weight_bytes") and hasattr(m, "weight_numel")
        if packed:
            run.weight_bytes += int(m.stored_weight_bytes())
            run.weight_params += int(m.weight_numel())
        for name, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
            if name in getattr(m, "_non_persistent_buffers_set", set()) or id(t) in seen:
                continue
            seen.add(id(t))
            full = f"{mname}.{name}" if mname else name
            nbytes = t.numel() * (wide if full in widened else t.element_size())
            run.size_bytes += nbytes
            if isinstance(t, torch.nn.Parameter) and t.ndim >= 2 and not packed:
                run.weight_bytes += nbytes
                run.weight_params += t.numel()


def _dedupe(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from compress.artifact import _dedupe as dedupe

    return dedupe(state)
