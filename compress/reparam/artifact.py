"""Saving and loading reparameterized models (format compress-reparam-v1, manifest compress.json).

transformers models: `save_pretrained` (config, safetensors, tokenizer) + compress.json with the pass records; when
the passes changed no module structure (fold-norm), transformers' from_pretrained reads the directory as it is.
Plain nn.Modules (CNNs): model.safetensors (the state dict), a small config.json (load_model looks for one) and
compress.json with the records and the structural edits (BN -> Identity, new conv biases, merged RepVGG convs) that
turn a freshly built architecture into the reparameterized skeleton before the weights load strictly.

`load_reparam(path, manifest)` is the loader of its format (compress.artifact_formats.FORMATS); `restore(model, path)`
rebuilds a user's own architecture (build it as before the passes, then call restore).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.atomic import atomic_dir
from compress.errors import UserError

FORMAT = "compress-reparam-v1"
MANIFEST = "compress.json"
WEIGHTS = "model.safetensors"
ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json", "1_Pooling")
STRUCTURAL = ("fold_bn", "merge_branches", "merge_linear", "add_bias")


def _archs() -> dict[str, type]:
    from compress.models.mobilenet_v2 import MobileNetV2
    from compress.reparam.repvgg import TinyRepVGG

    return {"mobilenet_v2": MobileNetV2, "tiny_repvgg": TinyRepVGG}


def arch_of(module: nn.Module) -> dict[str, Any] | None:
    """How to rebuild `module` before the passes, for the architectures this project defines; None otherwise."""
    from compress.models.mobilenet_v2 import MobileNetV2
    from compress.reparam.repvgg import TinyRepVGG

    if isinstance(module, MobileNetV2):
        return {"name": "mobilenet_v2", "kwargs": {"num_classes": module.classifier[-1].out_features}}
    if isinstance(module, TinyRepVGG):
        return {"name": "tiny_repvgg", "kwargs": dict(module.arch_config)}
    return None


def _is_hf(module: nn.Module) -> bool:
    return hasattr(module, "save_pretrained") and hasattr(module, "config")


def save_reparam(loaded, records: list[dict], out: Path, result: dict[str, Any], arch: dict | None = None) -> Path:
    """Write the reparameterized model in `loaded` to `out` atomically (see the module docstring)."""
    from compress.version import __version__

    out = Path(out)
    module = loaded.module
    edits = [e for r in records for e in r.get("edits", [])]
    body: dict[str, Any] = {"format": FORMAT, "tool_version": __version__, "base": loaded.spec,
                            "family": loaded.family, "kind": loaded.kind, "pooling": loaded.pooling,
                            "edits": edits, "reparam": result}
    with atomic_dir(out) as tmp:
        if _is_hf(module):
            body["loader"] = "hf"
            module.save_pretrained(tmp, safe_serialization=True)
            if loaded.tokenizer is not None:
                loaded.tokenizer.save_pretrained(tmp)
            for name in ST_FILES if loaded.path is not None else ():
                p = Path(loaded.path) / name
                if p.is_dir():
                    shutil.copytree(p, tmp / name)
                elif p.is_file():
                    shutil.copy(p, tmp / name)
        else:
            from safetensors.torch import save_file

            from compress.artifact import _dedupe

            body["loader"] = "state_dict"
            body["arch"] = arch if arch is not None else arch_of(module)
            body["class"] = f"{type(module).__module__}.{type(module).__qualname__}"
            state = _dedupe({k: v.detach().contiguous() for k, v in module.state_dict().items()})
            save_file(state, str(tmp / WEIGHTS), metadata={"format": FORMAT})
            # compress.models.load_model wants a config.json in a model directory; transformers cannot use this one.
            (tmp / "config.json").write_text(json.dumps({"model_type": loaded.family, "compress_format": FORMAT,
                                                         "arch": body["arch"]}, indent=2) + "\n")
        (tmp / MANIFEST).write_text(json.dumps(body, indent=2) + "\n")
    return out


def replay(model: nn.Module, edits: list[dict]) -> None:
    """Apply the structural edits of the passes (no weight values) to a freshly built model."""
    from compress.reparam import bn_fold, merge_linear, repvgg

    for e in edits:
        op = e.get("op")
        if op == "fold_bn":
            bn_fold.replay(model, e)
        elif op == "merge_branches":
            repvgg.replay(model, e)
        elif op == "merge_linear":
            merge_linear.replay(model, e)
        elif op == "add_bias":
            layer = model.get_submodule(e["module"])
            if layer.bias is None:
                layer.bias = nn.Parameter(torch.zeros(e["shape"], dtype=layer.weight.dtype))
        elif op == "untie":
            head = model.get_submodule(e["head"])
            head.weight = nn.Parameter(head.weight.detach().clone())
        else:
            raise UserError(f"unknown reparam edit {op!r} in {MANIFEST}: written by a newer compress?")


def _manifest(path: Path) -> dict:
    try:
        return json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}/{MANIFEST}: unreadable ({exc})") from exc


def restore(model: nn.Module, path: Path, manifest: dict | None = None) -> nn.Module:
    """Turn `model` (built as before the passes) into the saved reparameterized model: edits, then weights."""
    from safetensors.torch import load_file

    path = Path(path)
    manifest = manifest or _manifest(path)
    try:
        replay(model, manifest.get("edits", []))
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{path}/{MANIFEST}: its edits do not fit {type(model).__name__} ({exc})") from exc
    state = load_file(str(path / WEIGHTS))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = (str(exc).strip().splitlines() or ["mismatch"])[0][:200]
        raise UserError(f"{path}: weights do not fit {type(model).__name__} after the edits ({first})") from exc
    return model.eval()


def load_reparam(path: Path, manifest: dict[str, Any]):
    """Loader for compress.artifact_formats.FORMATS: rebuild a model saved by `save_reparam` as a LoadedModel."""
    from compress.models.hf import LoadedModel

    path = Path(path)
    if manifest.get("loader") == "hf":
        model, tokenizer = _load_hf(path, manifest)
        loaded = LoadedModel(model, tokenizer, manifest.get("kind", "decoder"), model.config.model_type, str(path),
                             path, manifest.get("pooling", "mean"))
    else:
        arch = manifest.get("arch") or {}
        cls = _archs().get(arch.get("name"))
        if cls is None:
            raise UserError(f"{path}: a reparameterized {manifest.get('class', 'model')} this tool cannot rebuild by "
                            "itself; build the original architecture and call compress.reparam.artifact.restore("
                            "model, path)")
        model = restore(cls(**arch.get("kwargs", {})), path, manifest)
        loaded = LoadedModel(model, None, manifest.get("kind", "cnn"), manifest.get("family", arch["name"]),
                             str(path), path)
    loaded.extra["manifest"] = manifest
    return loaded


def _load_hf(path: Path, manifest: dict):
    from transformers import AutoConfig

    from compress.models.hf import load_tokenizer, model_class

    config = AutoConfig.from_pretrained(path)
    cls = model_class(config, str(path))
    structural = [e for e in manifest.get("edits", []) if e.get("op") in STRUCTURAL]
    if not structural:
        model = cls.from_pretrained(path, dtype=torch.float32).eval()
        return model, load_tokenizer(path)
    from safetensors.torch import load_file
    from transformers.modeling_utils import no_init_weights

    with no_init_weights():
        model = cls.from_config(config, dtype=torch.float32)
    replay(model, structural)
    state: dict = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith("inv_freq")]
    if getattr(config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
        missing = [m for m in missing if not m.endswith("lm_head.weight")]
    if missing or unexpected:
        raise UserError(f"{path}: weights do not match the reparameterized skeleton ({len(missing)} missing, "
                        f"{len(unexpected)} unexpected tensors, e.g. {(missing + unexpected)[0]})")
    return model.eval(), load_tokenizer(path)
