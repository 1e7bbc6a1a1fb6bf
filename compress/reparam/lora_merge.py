"""merge-lora: a LoRA adapter directory (PEFT's layout: adapter_config.json + adapter_model.safetensors) merged into
the base weights, W ← W + s · B A with s = lora_alpha / r (lora_alpha / √r with use_rslora), per target Linear.

The equivalence reference is the base model *with the adapter applied* (forward hooks adding s · x Aᵀ Bᵀ, as PEFT
computes it unmerged), so the check proves the merge, not the base model. PEFT itself is not needed. Supported:
plain LoRA on nn.Linear (and transformers' Conv1D with fan_in_fan_out); DoRA, bias training, rank patterns per
module and modules_to_save are refused with the reason.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.errors import UserError
from compress.reparam.record import PassSession, Record

NAME = "merge-lora"
KEY = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


def read_adapter(adapter_dir: Path) -> tuple[dict[str, Any], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The adapter's config and {module path: (A [r, in], B [out, r])}; UserError for what cannot be merged."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    cfg_path, weights = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    if not cfg_path.is_file() or not weights.is_file():
        raise UserError(f"--merge-lora {adapter_dir}: expected adapter_config.json and adapter_model.safetensors "
                        "(a PEFT LoRA adapter directory)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except ValueError as exc:
        raise UserError(f"--merge-lora {cfg_path}: not valid JSON ({exc})") from exc
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise UserError(f"--merge-lora {adapter_dir}: peft_type {cfg.get('peft_type')} is not LORA")
    for key, why in (("use_dora", "DoRA's magnitude vectors"), ("rank_pattern", "per-module ranks"),
                     ("alpha_pattern", "per-module alphas"), ("modules_to_save", "fully trained extra modules")):
        if cfg.get(key):
            raise UserError(f"--merge-lora {adapter_dir}: {key} is set ({why}); only plain LoRA merges here")
    if cfg.get("bias", "none") != "none":
        raise UserError(f"--merge-lora {adapter_dir}: bias={cfg['bias']!r} trains biases; only bias='none' merges")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in load_file(str(weights)).items():
        m = KEY.match(k)
        if not m:
            raise UserError(f"--merge-lora {weights}: tensor {k} is not a lora_A/lora_B weight")
        pairs.setdefault(m.group("path"), {})[m.group("ab")] = v
    broken = [p for p, ab in pairs.items() if set(ab) != {"A", "B"}]
    if broken or not pairs:
        raise UserError(f"--merge-lora {weights}: {'no LoRA tensors' if not pairs else f'{broken[0]} lacks A or B'}")
    return cfg, {p: (ab["A"], ab["B"]) for p, ab in pairs.items()}


def scale_of(cfg: dict[str, Any], r: int) -> float:
    """lora_alpha / r, or lora_alpha / √r with use_rslora."""
    alpha = float(cfg.get("lora_alpha", r))
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def apply(model: nn.Module, adapter_dir: Path, sample_inputs: Any = None, tol: float | None = None) -> Record:
    """Merge the adapter in `adapter_dir` into `model` in place; the check compares with the adapter unmerged."""
    cfg, pairs = read_adapter(adapter_dir)
    fan_in_fan_out = bool(cfg.get("fan_in_fan_out"))
    modules = dict(model.named_modules())
    targets = {}
    for path, (a, b) in pairs.items():
        mod = modules.get(path)
        if mod is None:
            raise UserError(f"--merge-lora {adapter_dir}: the adapter targets {path}, which the model does not have "
                            f"(is it for {cfg.get('base_model_name_or_path')}?)")
        shape = (b.shape[0], a.shape[1]) if not fan_in_fan_out else (a.shape[1], b.shape[0])
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.Tensor) or tuple(w.shape) != shape or a.shape[0] != b.shape[1]:
            raise UserError(f"--merge-lora {adapter_dir}: {path} is a {type(mod).__name__} with weight "
                            f"{None if w is None else tuple(w.shape)}; the adapter's B·A is {shape}")
        targets[path] = (mod, a.float(), b.float(), scale_of(cfg, a.shape[0]))
    session = PassSession(NAME, model, sample_inputs)
    handles = [mod.register_forward_hook(_lora_hook(a, b, s)) for mod, a, b, s in targets.values()]
    try:
        session.run_reference()  # the base model with the adapter applied unmerged
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        for path, (mod, a, b, s) in targets.items():
            delta = s * (b @ a)
            mod.weight.add_((delta.T if fan_in_fan_out else delta).to(mod.weight.dtype))
            session.record.changes.append(path)
    session.record.notes.append(f"adapter {adapter_dir}: r={next(iter(targets.values()))[1].shape[0]}, "
                                f"lora_alpha={cfg.get('lora_alpha')}, {len(targets)} modules"
                                + (", rsLoRA scaling" if cfg.get("use_rslora") else ""))
    return session.finish(tol)


def _lora_hook(a: torch.Tensor, b: torch.Tensor, s: float):
    def hook(_module, args, output):
        return output + s * (args[0].to(a.dtype) @ a.T @ b.T).to(output.dtype)
    return hook
