"""Pruning driven by layer importance: whole blocks (Block Influence, skip ΔKL, greedy ΔKL) and FinerCut sublayers."""

from compress.prune.blocks import METHODS, remove_blocks, select_blocks
from compress.prune.selection import Selection
from compress.prune.sublayers import Removed, finercut, remove_sublayers

__all__ = ["METHODS", "Removed", "Selection", "finercut", "remove_blocks", "remove_sublayers", "select_blocks"]
