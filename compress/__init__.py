"""compress: layer-importance driven compression of neural networks."""

import os

# Every command is offline: no model hub is reached, models load from files.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

__version__ = "0.1.0"
