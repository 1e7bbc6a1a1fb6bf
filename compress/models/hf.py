"""The transformers-level pieces every loader shares: LoadedModel, the model class for a config, the tokenizer beside
the weights, the remote-code check, GGUF through transformers. Imports nothing else of compress.models, so the
zoo, the artifact loaders and `load_model` can all build on it without a loop."""

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


def load_gguf(path: Path) -> tuple[nn.Module, Any]:
    """Load a GGUF file with transformers, dequantized to fp32 (needs `accelerate`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except (ValueError, KeyError, OSError) as exc:
        raise UserError(f"cannot load GGUF {path}: {first_line(exc)}") from exc
    return model.eval(), tokenizer


def check_remote_code(path: Path, spec: str) -> bool:
    """True when DIR/config.json names code of its own (auto_map) and the user allowed it; UserError when it names
    code the user did not allow. Nothing from the directory runs before this check."""
    from compress.trust import remote_code_allowed

    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{spec}: unreadable config.json ({first_line(exc)})") from exc
    wants = isinstance(config, dict) and bool(config.get("auto_map"))
    if wants and not remote_code_allowed():
        raise UserError(f"{spec}: config.json asks to run the model directory's own Python code (auto_map); pass "
                        "--trust-remote-code only if you trust that code")
    return wants


def damaged(exc: BaseException) -> bool:
    """True for the errors safetensors/torch raise on truncated or corrupted weight files."""
    text = f"{type(exc).__name__} {exc}"
    return any(k in text for k in ("SafetensorError", "HeaderTooLarge", "incomplete metadata", "MetadataIncomplete",
                                   "InvalidHeader", "buffer length", "unexpected EOF", "PytorchStreamReader"))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json")


def load_tokenizer(path: Path) -> Any:
    """The tokenizer saved beside the weights, or None when there is none (weights-only directories)."""
    from transformers import AutoTokenizer

    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(path)
    except (ValueError, OSError, AttributeError, KeyError):
        return None


def model_class(config: Any, spec: str):
    from transformers import AutoModel, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    archs = config.architectures or []
    if config.model_type in ENCODER_TYPES:
        return AutoModel
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or any(a.endswith("ForCausalLM") for a in archs):
        return AutoModelForCausalLM
    raise UserError(f"{spec}: unsupported architecture '{config.model_type}'; supported are causal decoders "
                    f"(llama, qwen2/3, mistral, gemma, gpt2, ...) and encoders ({', '.join(sorted(ENCODER_TYPES))})")


def wrap(model: nn.Module, tokenizer: Any, spec: str, path: Path | None) -> LoadedModel:
    config = model.config
    kind = "encoder" if config.model_type in ENCODER_TYPES else "decoder"
    pooling = "mean"
    pool_cfg = path / "1_Pooling" / "config.json" if path else None
    if pool_cfg and pool_cfg.is_file():
        modes = json.loads(pool_cfg.read_text())
        if modes.get("pooling_mode_cls_token"):
            pooling = "cls"
    return LoadedModel(model, tokenizer, kind, config.model_type, spec, path, pooling)


def quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*legacy.*")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]
