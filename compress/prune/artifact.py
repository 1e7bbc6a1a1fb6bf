"""Artifact dirs of sublayer-pruned models: the remaining weights (safetensors), config, tokenizer and compress.json
listing the removed sublayers; `compress load` rebuilds the skeleton, puts Removed modules in place and loads.

The safetensors metadata format is ours, so transformers' from_pretrained refuses the file instead of silently
re-initialising the removed weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compress.artifact import MANIFEST, rebuild, save_dir
from compress.errors import UserError

FORMAT = "compress-pruned-v1"


def save_pruned(loaded, removed_modules: dict[str, dict], out: Path, manifest: dict[str, Any]) -> Path:
    """Write the pruned model in `loaded` (Removed modules in place) to `out`, atomically."""
    return save_dir(loaded, out, FORMAT, {"removed_modules": removed_modules, **manifest})


def load_pruned(path: Path, manifest: dict[str, Any]):
    """Rebuild a model saved by `save_pruned`: skeleton from config, Removed modules swapped in, weights loaded."""
    from compress.prune.sublayers import Removed, swap

    path = Path(path)

    def put_removed(model) -> None:
        try:
            swap(model, {p: Removed(**spec) for p, spec in manifest["removed_modules"].items()})
        except (AttributeError, KeyError, TypeError) as exc:
            raise UserError(f"{path}/{MANIFEST}: removed_modules do not fit the model in config.json ({exc})") from exc

    return rebuild(path, manifest, put_removed)
