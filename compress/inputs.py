"""Check what the user named (model spec, text files) before anything heavy is imported: a wrong path is answered
in well under two seconds, with the same one line the loaders give."""

from __future__ import annotations

import glob
from pathlib import Path

from compress.errors import UserError

SPLITS = ("calibration", "evaluation", "all")  # what --split accepts

WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth"}


def check_model(spec: str, arch: str | None = None) -> None:
    """UserError when `spec` is neither a zoo name, an HF model directory, a .gguf file nor a weights file."""
    from compress.models import zoo

    if spec in zoo.ZOO:
        return
    path = Path(spec).expanduser()
    if not path.exists():
        if "/" not in spec and "." not in spec:
            raise UserError(f"unknown model '{spec}': not a zoo name ({', '.join(zoo.ZOO)}) and no such file or "
                            "directory; see `compress models list`")
        raise UserError(f"model not found: {spec} does not exist; pass a zoo name, an HF model directory or a .gguf")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{spec} is not a model directory (no config.json); pass an HF model directory "
                            "saved with save_pretrained, a .gguf file or a zoo name")
        return
    if path.suffix == ".gguf":
        return
    if path.suffix in WEIGHT_SUFFIXES:
        if arch is not None and arch not in zoo.ZOO and not (Path(arch).expanduser() / "config.json").is_file():
            raise UserError(f"--arch {arch}: no config.json there; pass a zoo name or an HF model directory")
        return
    raise UserError(f"cannot load {spec}: expected a zoo name, an HF model directory, a .gguf file or a "
                    f"weights file ({', '.join(sorted(WEIGHT_SUFFIXES))}) with a config")


def split_sources(spec: str) -> list[str]:
    """The comma-separated sources of a --data spec (a file, directory, glob or 'self' each), in order."""
    return [part.strip() for part in spec.split(",") if part.strip()] or [spec]


def check_data(spec: str | None, flag: str = "--data") -> None:
    """UserError when a --data spec names no text: each comma-separated source other than 'self' must."""
    for source in split_sources(spec) if spec else ():
        if source != "self":
            resolve_text_files(source, flag)


def resolve_text_files(spec: str, flag: str = "--data") -> list[Path]:
    """A text file, every *.txt under a directory, the files matching a glob, or a comma-separated list of those."""
    if "," in spec:
        return [f for part in spec.split(",") if part.strip() for f in resolve_text_files(part.strip(), flag)]
    if any(ch in spec for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise UserError(f"{flag} {spec}: no such file or directory; pass a text file, a directory, a glob "
                            "or 'self'")
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*.txt") if p.is_file())
    if not files:
        raise UserError(f"{flag} {spec}: no text files found (directories are searched for *.txt)")
    if sum(f.stat().st_size for f in files) == 0:
        raise UserError(f"{flag} {spec}: the text is empty")
    return files
