"""Loading models from any spec, the offline zoo, and the LayerMap."""

from compress.models.layers import Block, LayerMap, Sublayer, layer_map
from compress.models.load import LoadedModel, load_model

__all__ = ["Block", "LayerMap", "LoadedModel", "Sublayer", "layer_map", "load_model"]
