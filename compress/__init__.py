"""compress: layer-importance driven compression of neural networks.

The transforms are importable from here (`compress.quantize_`, `compress.prune_`, `compress.reparam_`); they load
torch on first use, so `import compress` stays light."""

import os

# Every command is offline: no model hub is reached, models load from files.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from compress.version import __version__  # noqa: E402,F401

_TRANSFORMS = ("quantize_", "prune_", "reparam_")


def __getattr__(name: str):
    if name in _TRANSFORMS:
        from compress import transforms

        return getattr(transforms, name)
    raise AttributeError(f"module 'compress' has no attribute {name!r}")
