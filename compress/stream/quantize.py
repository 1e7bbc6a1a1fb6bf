"""Quantize a model block by block without ever holding it whole: each block is read from the checkpoint, its
codes made (RTN, HQQ, or GPTQ on calibration hidden states that flow block to block), written to the output shard
and freed. The codes, and therefore the artifact's bytes, are those of the in-memory path
(compress.quantize.pipeline.quantize) for the same inputs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from compress.artifact import _dedupe
from compress.atomic import fault_point
from compress.data import Windows
from compress.errors import UserError
from compress.metrics import weight_footprint
from compress.quantize.apply import Record, apply_plan, weight_matrix
from compress.quantize.spec import QuantSpec
from compress.stream.lazy import Calls, LazyModel
from compress.stream.shards import ShardWriter, as_stored

CALIBRATION_BATCH = 4  # windows per calibration batch: BlockRunner's, so GPTQ's Hessians add up identically


NARROW_METHODS = ("rtn", "hqq")  # code makers that cast a weight to fp32 themselves: it is read in its stored dtype


@dataclass
class Footprint:
    """weight_footprint of a whole model, summed part by part (blocks, then the modules outside the stack)."""

    size_bytes: int = 0
    weight_bytes: int = 0
    weight_params: int = 0

    def add(self, foot: dict) -> None:
        """Add one part's weight_footprint (a block, or the modules outside the stack)."""
        self.size_bytes += int(foot["size_bytes"])
        self.weight_bytes += int(foot["weight_bytes"])
        self.weight_params += int(foot["weight_params"])

    @property
    def bpw(self) -> float:
        """Stored bits per weight of the weight matrices."""
        return self.weight_bytes * 8 / self.weight_params if self.weight_params else float("nan")


@dataclass
class StreamedRun:
    """What a streaming quantization did (module specs, notes) and the quantized model's footprint."""

    record: Record
    foot: Footprint


def quantize_streaming(lazy: LazyModel, specs: dict[str, QuantSpec], root: Path, windows: Windows | None = None,
                       progress=None, metadata: dict[str, str] | None = None, imatrix=None) -> StreamedRun:
    """Quantize `lazy` per `specs` block by block, writing safetensors shards into `root`; `windows` feed GPTQ.
    Blocks an interrupted run already wrote into `root` are not redone (their specs, notes and footprint are read
    back from beside them; GPTQ's hidden states from the file kept with them). RTN weights its rounding by
    `imatrix` (an ImportanceMatrix) when given."""
    from compress.quantize.hqq import hqq_quantize
    from compress.quantize.pipeline import _gptq_head_target, gptq_block, gptq_head, needs_data, weighted_rtn

    model, lmap = lazy.model, lazy.lmap
    if needs_data(specs) and windows is None:
        raise UserError("gptq needs calibration data: pass --data")
    run = StreamedRun(Record(), Footprint())
    writer = ShardWriter(root, metadata=metadata)
    for k in range(writer.done):  # an interrupted run's blocks
        _restore(run, writer.notes(k))
    stored = lazy.checkpoint.dtypes
    batches = _capture(lazy, windows) if needs_data(specs) and writer.done <= len(lmap.blocks) else []
    hidden = [c.hidden for c in batches]
    if batches and writer.done:
        hidden = [h.to(lazy.device) for h in torch.load(_hidden_file(root, writer.done), weights_only=True)]
    task = progress.add_task("quantize blocks", total=len(lmap.blocks) + 1, completed=writer.done) \
        if progress is not None else None
    with torch.inference_mode():
        for blk in lmap.blocks[writer.done:]:
            mine = {n: specs[n] for n in blk.linears if n in specs}
            lazy.load_block(blk.index, () if batches else _narrow(mine))

            def feed(i=blk.index, hidden=hidden):
                for b, calls in enumerate(batches):
                    lazy.run_block(i, calls, hidden[b])

            codes = gptq_block(model, blk.linears, mine, feed) if batches else {}
            codes.update({n: hqq_quantize(weight_matrix(model.get_submodule(n)), s) for n, s in mine.items()
                          if s.method == "hqq" and not s.is_float})
            if imatrix is not None:
                codes.update(weighted_rtn(model, mine, imatrix))
            hidden = [lazy.run_block(blk.index, calls, hidden[b]) for b, calls in enumerate(batches)]
            if batches:  # the next block's input, kept until that block is written too
                torch.save([h.cpu() for h in hidden], _hidden_file(root, blk.index + 1))
            part = apply_plan(model, lmap, mine, codes)
            _merge(run.record, part)
            block = lazy.blocks[blk.index]
            foot = weight_footprint(block)
            run.foot.add(foot)
            prefix = f"{lmap.blocks_path}.{blk.index}."
            writer.add(as_stored({prefix + k: v for k, v in block.state_dict().items()}, stored, lazy.dtype),
                       _notes(part, foot))
            _hidden_file(root, blk.index).unlink(missing_ok=True)
            lazy.drop_block(blk.index)
            fault_point(f"after-block-{blk.index}")
            if progress is not None:
                progress.update(task, advance=1, description=f"quantize blocks ({_gb(lazy)} read)")
        if writer.done == len(lmap.blocks):
            trunk = {n: s for n, s in specs.items() if not n.startswith(lmap.blocks_path + ".")}
            # the tables stay in their storage dtype unless a code maker needs the fp32 copy held (GPTQ's head):
            # a 3 B model's quantized embedding held in fp32 was 600 MB
            narrow = all(s.is_float or s.method in NARROW_METHODS for s in trunk.values())
            lazy.load_trunk(keep_storage=narrow)
            widened = lazy.big_tables() if narrow else ()
            codes = {}
            if batches and _gptq_head_target(model, lmap, trunk) is not None:
                codes.update(gptq_head(model, lmap, trunk, [lazy.final_hidden(h) for h in hidden]))
            codes.update({n: hqq_quantize(weight_matrix(model.get_submodule(n)), s) for n, s in trunk.items()
                          if s.method == "hqq" and not s.is_float})
            if imatrix is not None:
                codes.update(weighted_rtn(model, trunk, imatrix))
            part = apply_plan(model, lmap, trunk, codes)
            _merge(run.record, part)
            state = {n: t for n, t in model.state_dict().items() if not n.startswith(lmap.blocks_path + ".")}
            foot = trunk_footprint(lazy, widened)
            run.foot.add(foot)
            writer.add(as_stored(_dedupe(state), stored, lazy.dtype), _notes(part, foot))
            _hidden_file(root, len(lmap.blocks)).unlink(missing_ok=True)
            lazy.drop_trunk()
            if progress is not None:
                progress.advance(task)
    writer.finish()
    return run


def _narrow(specs: dict[str, QuantSpec]) -> tuple[str, ...]:
    """The weights of the Linears that RTN or HQQ will replace with codes: read in the checkpoint's dtype (each
    code maker casts a slice of rows to fp32 at a time, so the codes are the same), which halves a bf16 block's
    bytes while it is quantized. Float-kept Linears are read in the compute dtype as before."""
    return tuple(f"{n}.weight" for n, s in specs.items() if not s.is_float and s.method in NARROW_METHODS)


def _hidden_file(root: Path, block: int) -> Path:
    return Path(root) / f".hidden-{block:05d}.pt"


def _notes(part: Record, foot: dict) -> dict[str, str]:
    """What a resumed run needs of a written group: its module specs, notes and footprint."""
    import json

    return {"record": json.dumps({"specs": part.specs, "notes": part.notes}),
            "foot": json.dumps({k: int(foot[k]) for k in ("size_bytes", "weight_bytes", "weight_params")})}


def _restore(run: StreamedRun, notes: dict[str, str]) -> None:
    import json

    record = json.loads(notes["record"])
    _merge(run.record, Record(record["specs"], record["notes"]))
    run.foot.add(json.loads(notes["foot"]))


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


def trunk_footprint(lazy: LazyModel, widened: tuple[str, ...]) -> dict:
    """weight_footprint of the modules outside the stack, the tables kept in their storage dtype (`widened`)
    counted at the compute dtype's width, as the in-memory model holds them."""
    wide = torch.empty((), dtype=lazy.dtype).element_size()
    return weight_footprint(lazy.model, skip=lazy.lmap.blocks_path, widths=dict.fromkeys(widened, wide))
