"""The importance matrix: per Linear input channel, the mean squared activation over the calibration tokens
(llama.cpp's imatrix). It weights every rounding decision of RTN (compress.quantize.rtn's weighted scale search)
and the distortion table, and is saved in llama.cpp's imatrix GGUF so llama.cpp's own tools read it.

Collected block by block on a LazyModel (whole in memory or streamed from disk, the same numbers either way): the
calibration hidden states flow through one block at a time while forward pre-hooks add up x² per input channel.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from compress.errors import UserError

FILE = "imatrix.gguf"  # its name inside an artifact directory (and a streamed output's root)
BATCH = 4  # calibration windows per forward


@dataclass
class ImportanceMatrix:
    """Σx² (float64) and the token count per module name; `mean(name)` is the importance of its input channels."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_size: int = 0
    chunks: int = 0

    def add(self, name: str, x: torch.Tensor) -> None:
        """Add the rows of `x` [..., in_features] (one row per token) to module `name`'s statistics."""
        rows = x.detach().reshape(-1, x.shape[-1])
        self.add_sums(name, square_sums(rows), rows.shape[0])

    def add_sums(self, name: str, s: torch.Tensor, count: int) -> None:
        """Add per-channel sums of squares `s` (float64) over `count` rows to module `name`'s statistics."""
        if name in self.sums:
            self.sums[name] += s
            self.counts[name] += count
        else:
            self.sums[name], self.counts[name] = s.clone(), count

    def mean(self, name: str) -> torch.Tensor | None:
        """Mean squared activation per input channel (float32), or None if `name` was never seen."""
        if name not in self.sums or not self.counts.get(name):
            return None
        return (self.sums[name] / self.counts[name]).float()

    def check(self, widths: dict[str, int], source: str) -> None:
        """Refuse a matrix made for another model: every name in `widths` must be present with that width."""
        for name, width in widths.items():
            if name not in self.sums:
                raise UserError(f"--imatrix {source}: has no entry for {name} (it was made for another model); "
                                "collect one for this model with --data, or pass --no-imatrix")
            if self.sums[name].numel() != width:
                raise UserError(f"--imatrix {source}: {name} has {self.sums[name].numel()} input channels, the "
                                f"model {width}; it was made for another model — collect one with --data")

    def digest(self) -> str:
        """sha256 of the statistics (names, sums, counts): what a resume or a cache key compares."""
        h = hashlib.sha256()
        for name in sorted(self.sums):
            h.update(name.encode())
            h.update(self.sums[name].double().numpy().tobytes())
            h.update(str(self.counts[name]).encode())
        return h.hexdigest()


def capture_batches(lazy, windows) -> tuple[list, list[torch.Tensor]]:
    """Every block's call arguments for the calibration `windows` in batches of BATCH (block 0's input in each
    `.hidden`), and each batch's attention mask as bool; the trunk is loaded only for this."""
    batches, masks = [], []
    lazy.load_trunk()
    try:
        for s in range(0, len(windows.input_ids), BATCH):
            ids, mask = windows.input_ids[s:s + BATCH], windows.attention_mask[s:s + BATCH]
            batches.append(lazy.capture(ids, mask))
            masks.append(mask.bool())
    finally:
        lazy.drop_trunk()
    return batches, masks


def collect(lazy, windows, names: list[str], progress=None) -> ImportanceMatrix:
    """The importance matrix of the modules in `names` (weight_matrix orientation: the input axis is the last one)
    on the calibration `windows`: block by block over batches of BATCH windows, padding excluded. The LM head's
    input is the final normed hidden state; a tied embedding gets the head's statistics."""
    from compress.quantize.apply import is_tied

    lmap, model = lazy.lmap, lazy.model
    imat = ImportanceMatrix(datasets=[windows.describe().get("spec", "") or str(windows.describe())],
                            chunk_size=int(windows.input_ids.shape[1]), chunks=int(windows.input_ids.shape[0]))
    wanted = set(names)
    batches, masks = capture_batches(lazy, windows)
    hidden = [c.hidden for c in batches]
    task = progress.add_task("importance matrix", total=len(lmap.blocks) + 1) if progress is not None else None
    with torch.inference_mode():
        for blk in lmap.blocks:
            lazy.load_block_narrow(blk.index)  # only run: its Linears cast where used
            current: list[torch.Tensor] = []
            hooks = [_hook(model.get_submodule(n), n, imat, current) for n in blk.linears if n in wanted]
            try:
                out = []
                for b, calls in enumerate(batches):
                    current[:] = [None if bool(masks[b].all()) else masks[b].to(calls.hidden.device)]
                    out.append(lazy.run_block(blk.index, calls, hidden[b]))
                hidden = out
            finally:
                for h in hooks:
                    h.remove()
            lazy.drop_block(blk.index)
            if progress is not None:
                progress.advance(task)
        head = lmap.head if lmap.head in wanted else (lmap.embeddings if lmap.embeddings in wanted
                                                       and is_tied(model, lmap) else None)
        if head is not None:
            lazy.load_trunk()
            try:
                for b, h in enumerate(hidden):
                    imat.add(head, lazy.final_hidden(h)[masks[b]])
            finally:
                lazy.drop_trunk()
        if progress is not None:
            progress.advance(task)
    return imat


def square_sums(rows: torch.Tensor) -> torch.Tensor:
    """Σ x² per channel of `rows` [n, channels] as float64 on the CPU (squared in the rows' own float type, summed in
    float64)."""
    return rows.float().square().sum(0, dtype=torch.float64).cpu()


def _hook(module: torch.nn.Module, name: str, imat: ImportanceMatrix, current: list):
    """A pre-hook adding the module's input rows of real tokens (current[0] is the batch's attention mask, None
    when every token is real). Modules fed the same tensor object (Q/K/V, gate/up) share one sum, held in
    current[1]."""
    def pre(mod, args, kwargs=None):
        x = args[0]
        if len(current) > 1 and current[1][0] is x:
            imat.add_sums(name, *current[1][1:])
            return
        mask = current[0] if current else None
        if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
            x = x[mask]
        rows = x.detach().reshape(-1, x.shape[-1])
        entry = (args[0], square_sums(rows), rows.shape[0])  # holds the tensor, so its identity stays its own
        current[1:] = [entry]
        imat.add_sums(name, *entry[1:])

    return module.register_forward_pre_hook(pre)


# ---- llama.cpp's imatrix GGUF (tools/imatrix): `<tensor>.in_sum2` = Σx² per channel, `<tensor>.counts` = tokens

def gguf_names(hf_names: list[str], num_blocks: int) -> dict[str, str]:
    """HF module name -> llama.cpp tensor name (e.g. model.layers.3.mlp.down_proj -> blk.3.ffn_down.weight) for
    the Llama family; names without a mapping keep their HF name."""
    import gguf

    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, num_blocks)
    out = {}
    for n in hf_names:
        mapped = tmap.get_name(n + ".weight", try_suffixes=(".weight",))
        out[n] = mapped if mapped else n + ".weight"
    if "lm_head" in hf_names and out["lm_head"] == "lm_head.weight":
        out["lm_head"] = "output.weight"
    return out


def save_gguf(imat: ImportanceMatrix, path: Path, num_blocks: int) -> None:
    """Write `imat` as a llama.cpp imatrix GGUF at `path` (the caller makes it atomic)."""
    import logging

    import gguf
    import numpy as np

    logging.getLogger("gguf.gguf_writer").setLevel(logging.WARNING)  # it logs every file it writes at INFO
    names = gguf_names(sorted(imat.sums), num_blocks)
    w = gguf.GGUFWriter(str(path), arch="imatrix")
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", imat.datasets or [""])
    w.add_uint32("imatrix.chunk_count", imat.chunks)
    w.add_uint32("imatrix.chunk_size", imat.chunk_size)
    for hf in sorted(imat.sums):
        w.add_tensor(f"{names[hf]}.in_sum2", imat.sums[hf].float().numpy().reshape(1, -1))
        w.add_tensor(f"{names[hf]}.counts", np.array([[float(imat.counts[hf])]], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def load_gguf(path: Path, hf_names: list[str], num_blocks: int) -> ImportanceMatrix:
    """Read a llama.cpp imatrix GGUF (ours or llama-imatrix's) for a model whose modules are `hf_names`."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except (OSError, ValueError) as e:
        raise UserError(f"--imatrix {path}: not a readable GGUF imatrix ({e}); pass a file written by "
                        "--imatrix-out or llama-imatrix") from None
    tensors = {t.name: torch.from_numpy(t.data.copy()).double().reshape(-1) for t in reader.tensors}
    if not any(n.endswith(".in_sum2") for n in tensors):
        raise UserError(f"--imatrix {path}: no .in_sum2 tensors; pass a file written by --imatrix-out or "
                        "llama-imatrix")
    imat = ImportanceMatrix()
    for hf, g in gguf_names(hf_names, num_blocks).items():
        s, c = tensors.get(f"{g}.in_sum2"), tensors.get(f"{g}.counts")
        if s is None:
            s, c = tensors.get(f"{hf}.weight.in_sum2"), tensors.get(f"{hf}.weight.counts")
        if s is not None and c is not None and float(c.sum()) > 0:
            imat.sums[hf], imat.counts[hf] = s, int(round(float(c.sum())))
    field_ = reader.fields.get("imatrix.datasets")
    if field_ is not None:
        imat.datasets = [bytes(field_.parts[i]).decode(errors="replace") for i in field_.data]
    field_ = reader.fields.get("imatrix.chunk_size")
    imat.chunk_size = int(field_.parts[-1][0]) if field_ is not None else 0
    field_ = reader.fields.get("imatrix.chunk_count")
    imat.chunks = int(field_.parts[-1][0]) if field_ is not None else 0
    return imat
