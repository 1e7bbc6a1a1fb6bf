"""What a pruning selection chose, in removal order, with the scores it chose by (JSON-ready)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Unit = int | tuple[int, str]  # a block index, or (block index, sublayer name)


def unit_name(unit: Unit) -> str:
    """'7' for block 7, '7.attn' for the attention sublayer of block 7."""
    return str(unit) if isinstance(unit, int) else f"{unit[0]}.{unit[1]}"


@dataclass
class Selection:
    """Units to remove in order; per step the score of every candidate; the calibration divergence after each step."""

    method: str
    removed: list[Unit]
    scores: list[dict[Unit, float]] = field(default_factory=list)  # one dict per step (one-shot methods: one)
    divergence: list[float | None] = field(default_factory=list)  # after step k (None where not measured)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: units as '7' or '7.attn'."""
        return {"method": self.method, "removed": [unit_name(u) for u in self.removed],
                "scores": [{unit_name(u): v for u, v in s.items()} for s in self.scores],
                "divergence": self.divergence, "seconds": round(self.seconds, 2)}
