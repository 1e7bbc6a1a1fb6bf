"""Mixture-of-experts tooling: where routers and experts live (layout), routing capture and load statistics,
selection-bias rebalancing (BIP dual or greedy), balanced artifacts and an export-friendly dense-routed block.

Submodules are imported directly (e.g. `from compress.moe.stats import moe_stats`); this package imports nothing so
compress.models.layers can use the layout without an import cycle.
"""
