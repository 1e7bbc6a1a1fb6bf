"""Turn any model spec (zoo name, HF model directory, .gguf file, weights file + config) into a LoadedModel."""

from __future__ import annotations

from pathlib import Path

import torch

from compress.errors import UserError
from compress.inputs import check_model
from compress.models import zoo
from compress.models.hf import (
    ENCODER_TYPES,
    LoadedModel,
    check_remote_code,
    damaged,
    first_line,
    load_gguf,
    load_tokenizer,
    model_class,
    quiet_transformers,
    wrap,
)

__all__ = ["ENCODER_TYPES", "LoadedModel", "check_remote_code", "load_gguf", "load_model"]


def load_model(spec: str, arch: str | None = None, trust_pickle: bool = False) -> LoadedModel:
    """Load `spec` in fp32 on CPU, offline; raise UserError with the fix when the spec is not usable."""
    quiet_transformers()
    if spec in zoo.ZOO:
        if zoo.ZOO[spec].kind == "cnn":
            return _load_cnn(zoo.pull(spec), spec)
        return _load_dir(zoo.pull(spec), spec)
    check_model(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _load_dir(path, spec)
    if path.suffix == ".gguf":
        from compress.models.gguf_check import check_gguf

        check_gguf(path)
        model, tokenizer = load_gguf(path)
        return wrap(model, tokenizer, spec, path.parent)
    return _load_weights_file(path, spec, arch, trust_pickle)


def _load_dir(path: Path, spec: str) -> LoadedModel:
    from transformers import AutoConfig

    from compress.artifact import is_artifact
    from compress.artifact_formats import load_artifact
    from compress.integrity import check_before_use
    from compress.stream.checkpoint import has_checkpoint

    check_before_use(path)
    if is_artifact(path):
        loaded = load_artifact(path)
        loaded.spec = spec
        loaded.extra["weights_dir"] = path
        return loaded

    remote = check_remote_code(path, spec)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=remote)
    except (ValueError, KeyError, OSError) as exc:
        raise UserError(f"{spec}: unreadable config.json ({first_line(exc)})") from exc
    model_cls = model_class(config, spec)
    try:
        model = model_cls.from_pretrained(path, dtype=torch.float32, trust_remote_code=remote).eval()
    except Exception as exc:
        if not damaged(exc):
            raise
        raise UserError(f"{spec}: weights unreadable ({first_line(exc)}); the files are truncated or damaged, "
                        "re-create or re-download them") from exc
    loaded = wrap(model, load_tokenizer(path), spec, path)
    if has_checkpoint(path):
        loaded.extra["weights_dir"] = path  # the dtypes its safetensors store, kept when weights are unchanged
    return loaded


def _load_cnn(path: Path, spec: str) -> LoadedModel:
    """A zoo image classifier: a torch state dict loaded into the architecture the project defines."""
    from compress.models.mobilenet_v2 import WEIGHTS_FILE, load_mobilenet_v2

    return LoadedModel(load_mobilenet_v2(path / WEIGHTS_FILE), None, "cnn", "mobilenet_v2", spec, path)


def _load_weights_file(path: Path, spec: str, arch: str | None, trust_pickle: bool) -> LoadedModel:
    """A bare weights file has no architecture: take the config from beside it or from `--arch`."""
    from transformers import AutoConfig

    config_dir = path.parent if (path.parent / "config.json").is_file() else None
    if arch is not None:
        config_dir = zoo.pull(arch) if arch in zoo.ZOO else Path(arch)
        if not (config_dir / "config.json").is_file():
            raise UserError(f"--arch {arch}: no config.json there; pass a zoo name or an HF model directory")
    if config_dir is None:
        raise UserError(f"{spec} has no architecture: put its config.json beside it or pass --arch "
                        "(a zoo name or an HF model directory)")
    remote = check_remote_code(config_dir, spec)
    config = AutoConfig.from_pretrained(config_dir, trust_remote_code=remote)
    model = model_class(config, spec).from_config(config, trust_remote_code=remote).eval()
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as exc:
            raise UserError(f"{spec}: unreadable safetensors file ({first_line(exc)}); it is truncated or damaged"
                            ) from exc
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
        except Exception as exc:
            raise UserError(f"cannot load {spec} with weights_only=True ({first_line(exc)}); "
                            "pass --trust-pickle only if you trust the file") from exc
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if not m.endswith("lm_head.weight")]:
        raise UserError(f"{spec} does not match the architecture from {config_dir}: "
                        f"{len(missing)} missing and {len(unexpected)} unexpected tensors")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return wrap(model, load_tokenizer(config_dir), spec, config_dir)
