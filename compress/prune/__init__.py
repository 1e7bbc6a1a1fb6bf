"""Pruning driven by layer importance: whole blocks (Block Influence, skip ΔKL, greedy ΔKL) and FinerCut sublayers.

Names are imported on first use (PEP 562), so `compress.prune.choices` stays free of torch for argument checks."""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"METHODS": "blocks", "remove_blocks": "blocks", "select_blocks": "blocks", "Selection": "selection",
         "Removed": "sublayers", "finercut": "sublayers", "remove_sublayers": "sublayers"}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"compress.prune.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'compress.prune' has no attribute {name!r}")
