"""Turn any model spec (zoo name, HF model directory, .gguf file, weights file + config) into a LoadedModel."""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.errors import UserError
from compress.inputs import check_model
from compress.models import zoo

# Families whose encoders we evaluate by mean-pooled embeddings (sentence-transformers style).
ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "electra", "camembert"}


@dataclass
class LoadedModel:
    """A model ready to run: the module, its tokenizer, what kind it is and where it came from."""

    module: nn.Module
    tokenizer: Any
    kind: str  # "decoder" | "encoder" | "cnn"
    family: str  # config.model_type, e.g. "llama", "bert"
    spec: str
    path: Path | None = None
    pooling: str = "mean"
    extra: dict = field(default_factory=dict)

    @property
    def can_generate(self) -> bool:
        """Decoders can sample text (used by `--data self`)."""
        return self.kind == "decoder"


def load_model(spec: str, arch: str | None = None, trust_pickle: bool = False) -> LoadedModel:
    """Load `spec` in fp32 on CPU, offline; raise UserError with the fix when the spec is not usable."""
    _quiet_transformers()
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
        return _wrap(model, tokenizer, spec, path.parent)
    return _load_weights_file(path, spec, arch, trust_pickle)


def load_gguf(path: Path) -> tuple[nn.Module, Any]:
    """Load a GGUF file with transformers, dequantized to fp32 (needs `accelerate`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except (ValueError, KeyError, OSError) as exc:
        raise UserError(f"cannot load GGUF {path}: {_first_line(exc)}") from exc
    return model.eval(), tokenizer


def _load_dir(path: Path, spec: str) -> LoadedModel:
    from transformers import AutoConfig

    from compress.artifact import is_artifact, load_artifact
    from compress.integrity import check_before_use

    check_before_use(path)
    if is_artifact(path):
        loaded = load_artifact(path)
        loaded.spec = spec
        return loaded

    remote = check_remote_code(path, spec)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=remote)
    except (ValueError, KeyError, OSError) as exc:
        raise UserError(f"{spec}: unreadable config.json ({_first_line(exc)})") from exc
    model_cls = _model_class(config, spec)
    try:
        model = model_cls.from_pretrained(path, dtype=torch.float32, trust_remote_code=remote).eval()
    except Exception as exc:
        if not _damaged(exc):
            raise
        raise UserError(f"{spec}: weights unreadable ({_first_line(exc)}); the files are truncated or damaged, "
                        "re-create or re-download them") from exc
    return _wrap(model, _load_tokenizer(path), spec, path)


def check_remote_code(path: Path, spec: str) -> bool:
    """True when DIR/config.json names code of its own (auto_map) and the user allowed it; UserError when it names
    code the user did not allow. Nothing from the directory runs before this check."""
    from compress.trust import remote_code_allowed

    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{spec}: unreadable config.json ({_first_line(exc)})") from exc
    wants = isinstance(config, dict) and bool(config.get("auto_map"))
    if wants and not remote_code_allowed():
        raise UserError(f"{spec}: config.json asks to run the model directory's own Python code (auto_map); pass "
                        "--trust-remote-code only if you trust that code")
    return wants


def _damaged(exc: BaseException) -> bool:
    """True for the errors safetensors/torch raise on truncated or corrupted weight files."""
    text = f"{type(exc).__name__} {exc}"
    return any(k in text for k in ("SafetensorError", "HeaderTooLarge", "incomplete metadata", "MetadataIncomplete",
                                   "InvalidHeader", "buffer length", "unexpected EOF", "PytorchStreamReader"))


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
    model = _model_class(config, spec).from_config(config, trust_remote_code=remote).eval()
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as exc:
            raise UserError(f"{spec}: unreadable safetensors file ({_first_line(exc)}); it is truncated or damaged"
                            ) from exc
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
        except Exception as exc:
            raise UserError(f"cannot load {spec} with weights_only=True ({_first_line(exc)}); "
                            "pass --trust-pickle only if you trust the file") from exc
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if not m.endswith("lm_head.weight")]:
        raise UserError(f"{spec} does not match the architecture from {config_dir}: "
                        f"{len(missing)} missing and {len(unexpected)} unexpected tensors")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return _wrap(model, _load_tokenizer(config_dir), spec, config_dir)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json")


def _load_tokenizer(path: Path) -> Any:
    """The tokenizer saved beside the weights, or None when there is none (weights-only directories)."""
    from transformers import AutoTokenizer

    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(path)
    except (ValueError, OSError, AttributeError, KeyError):
        return None


def _model_class(config: Any, spec: str):
    from transformers import AutoModel, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    archs = config.architectures or []
    if config.model_type in ENCODER_TYPES:
        return AutoModel
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or any(a.endswith("ForCausalLM") for a in archs):
        return AutoModelForCausalLM
    raise UserError(f"{spec}: unsupported architecture '{config.model_type}'; supported are causal decoders "
                    f"(llama, qwen2/3, mistral, gemma, gpt2, ...) and encoders ({', '.join(sorted(ENCODER_TYPES))})")


def _wrap(model: nn.Module, tokenizer: Any, spec: str, path: Path | None) -> LoadedModel:
    config = model.config
    kind = "encoder" if config.model_type in ENCODER_TYPES else "decoder"
    pooling = "mean"
    pool_cfg = path / "1_Pooling" / "config.json" if path else None
    if pool_cfg and pool_cfg.is_file():
        modes = json.loads(pool_cfg.read_text())
        if modes.get("pooling_mode_cls_token"):
            pooling = "cls"
    return LoadedModel(model, tokenizer, kind, config.model_type, spec, path, pooling)


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*legacy.*")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]
