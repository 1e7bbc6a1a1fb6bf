"""Every choice list of `compress prune`: the block-selection method, the width importance and the sparsity
granularity. The CLI's help, the request check and the pruning modules read these."""

from __future__ import annotations

import re

from compress.choices import Choices
from compress.errors import UserError

BLOCK_METHOD = Choices("--method", {"bi": "one-shot Block Influence", "ablation": "one-shot skip KL",
                                    "greedy": "re-measured after each removal; default"})
WIDTH_IMPORTANCE = Choices("--importance", {"activation": "|contribution| to the output", "taylor": "|a·∂L/∂a|"})
SPARSITY_GRANULARITY = Choices("--granularity", {"block": "one ratio per block", "linear": "one ratio per Linear"})


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """None for "unstructured", (N, M) for an "N:M" pattern (keep N of every M); UserError for anything else."""
    if pattern == "unstructured":
        return None
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern))
    if m is None or not 0 < int(m.group(1)) < int(m.group(2)):
        raise UserError(f"--pattern {pattern!r} is unknown: use unstructured or 2:4 (or another N:M with "
                        "0 < N < M, e.g. 4:8)")
    return int(m.group(1)), int(m.group(2))
