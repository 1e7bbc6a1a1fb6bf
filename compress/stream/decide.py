"""`--stream auto|on|off`: whether a model is worked on block by block from disk or loaded whole, decided from its
size in the compute dtype against the memory this machine has free."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from compress.choices import Choices
from compress.errors import UserError

STREAM = Choices("--stream", {
    "auto": "block by block when the whole model would not fit in free memory, else in memory",
    "on": "block by block from the safetensors files: memory holds about one block",
    "off": "load the whole model (fp32), as before",
})
DEVICE = Choices("--device", {
    "auto": "CUDA when torch sees a GPU and the run is streamed, else the CPU",
    "cpu": "compute on the CPU",
    "cuda": "compute each streamed block on the GPU (untested here: these machines have none)",
})
WHOLE_MODEL_COPIES = 2.5  # in memory: the candidate, a reference copy for evaluation, activations and logits


@dataclass(frozen=True)
class StreamChoice:
    """The decision and its reason (printed in the result notes)."""

    stream: bool
    path: Path | None
    why: str


def model_dir(spec: str) -> Path | None:
    """The HF or artifact directory a model spec names (zoo names resolved), or None for GGUF / weights files."""
    from compress.models import zoo

    if spec in zoo.ZOO:
        return None if zoo.ZOO[spec].kind == "cnn" else zoo.pull(spec)
    path = Path(spec).expanduser()
    return path if path.is_dir() else None


def in_memory_bytes(path: Path) -> int:
    """Bytes the whole-model path needs: every tensor in fp32, times WHOLE_MODEL_COPIES."""
    from compress.stream.checkpoint import Checkpoint

    ck = Checkpoint(path)
    numel = sum(math.prod(s) for s in ck.shapes.values())
    return int(numel * 4 * WHOLE_MODEL_COPIES)


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo (the kernel's estimate of what can be allocated without swapping)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def resolve_device(spec: str, streamed: bool):
    """The torch.device of `--device spec` for a run that is `streamed` or not; UserError for cuda without a GPU,
    or for a run that loads the whole model (only the block-by-block path moves work to a device)."""
    import torch

    DEVICE.check(spec)
    have_cuda = torch.cuda.is_available()
    if spec == "cuda" and not have_cuda:
        raise UserError("--device cuda: torch sees no CUDA device on this machine (a CPU build, or no GPU); use "
                        "--device cpu or auto")
    if spec == "cuda" and not streamed:
        raise UserError("--device cuda: only streamed runs compute on the GPU; add --stream on, or use --device cpu")
    return torch.device("cuda" if spec == "cuda" or (spec == "auto" and have_cuda and streamed) else "cpu")


def decide(spec: str, mode: str) -> StreamChoice:
    """Stream or not for `spec` under `mode`; UserError when `on` cannot stream this input, or when `off` asks
    for more memory than the machine has."""
    from compress.stream.checkpoint import has_checkpoint

    STREAM.check(mode)
    gguf = Path(spec).expanduser()
    if gguf.suffix == ".gguf" and gguf.is_file():
        return _decide_gguf(spec, gguf, mode)
    path = model_dir(spec)
    streamable = path is not None and has_checkpoint(path)
    if mode == "on":
        if not streamable:
            raise UserError(f"--stream on: {spec} is not a directory of safetensors weights; stream an HF model "
                            "directory, a .gguf file or a quantized artifact (save a .pt model with save_pretrained "
                            "first)")
        return StreamChoice(True, path, "--stream on")
    if not streamable:
        return StreamChoice(False, path, "in memory: not a safetensors directory")
    need, free = in_memory_bytes(path), available_bytes()
    if mode == "off":
        if need > free:
            raise UserError(f"--stream off: {spec} needs about {need / 2**30:.1f} GiB in memory, {free / 2**30:.1f} "
                            "GiB are free; use --stream on (block by block from disk)")
        return StreamChoice(False, path, "--stream off")
    if need > free:
        return StreamChoice(True, path, f"streamed: the whole model needs about {need / 2**30:.1f} GiB, "
                                        f"{free / 2**30:.1f} GiB are free")
    return StreamChoice(False, path, "in memory: it fits")


def _decide_gguf(spec: str, gguf: Path, mode: str) -> StreamChoice:
    """A .gguf file streams from its conversion to safetensors shards (made once, tensor by tensor, cached)."""
    from compress.stream.gguf_shards import cached_conversion, gguf_params

    need, free = int(gguf_params(gguf) * 4 * WHOLE_MODEL_COPIES), available_bytes()
    if mode == "on" or (mode == "auto" and need > free):
        why = "--stream on" if mode == "on" else (f"streamed: the whole model needs about {need / 2**30:.1f} GiB, "
                                                  f"{free / 2**30:.1f} GiB are free")
        return StreamChoice(True, cached_conversion(gguf), f"{why}; the GGUF was converted tensor by tensor to "
                                                           "safetensors shards in the cache")
    if mode == "off" and need > free:
        raise UserError(f"--stream off: {spec} needs about {need / 2**30:.1f} GiB in memory, {free / 2**30:.1f} "
                        "GiB are free; use --stream on (block by block from disk)")
    return StreamChoice(False, None, "in memory: it fits")
