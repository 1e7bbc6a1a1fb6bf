"""Loading models from any spec, the offline zoo, and the LayerMap.

Names are imported on first use (PEP 562), so `compress.models.zoo` and the argument checks stay free of torch:
a bad path is answered before the heavy imports."""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"Block": "layers", "LayerMap": "layers", "Sublayer": "layers", "layer_map": "layers",
         "LoadedModel": "load", "load_model": "load"}
__all__ = ["Block", "LayerMap", "LoadedModel", "Sublayer", "layer_map", "load_model"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"compress.models.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'compress.models' has no attribute {name!r}")
