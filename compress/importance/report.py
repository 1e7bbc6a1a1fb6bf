"""ImportanceReport: per block, sublayer and Linear scores of every method, as one JSON-round-trippable value."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from compress.errors import UserError


@dataclass
class Scores:
    """What one scorer measured, keyed by block index, (block, sublayer name) and Linear path."""

    blocks: dict[int, float] = field(default_factory=dict)
    sublayers: dict[tuple[int, str], float] = field(default_factory=dict)
    linears: dict[str, float] = field(default_factory=dict)


@dataclass
class ImportanceReport:
    """Per-layer importance of one model on one data set, for every method run."""

    model: str
    family: str
    kind: str
    divergence: str
    data: dict[str, Any]
    methods: list[str]
    direction: dict[str, str]
    blocks: list[dict[str, Any]]
    sublayers: list[dict[str, Any]]
    linears: list[dict[str, Any]]
    timings_s: dict[str, float] = field(default_factory=dict)
    checks: dict[str, Any] = field(default_factory=dict)
    tool_version: str = ""

    @property
    def num_blocks(self) -> int:
        """Blocks scored."""
        return len(self.blocks)

    def block_scores(self, method: str) -> list[float | None]:
        """One method's score for each block, in block order."""
        return [b["scores"].get(method) for b in self.blocks]

    def ranking(self, method: str) -> list[int]:
        """Block indices from most to least important according to `method` and its direction."""
        values = self.block_scores(method)
        sign = -1.0 if self.direction.get(method, "").startswith("higher") else 1.0
        return sorted(range(len(values)), key=lambda i: sign * (values[i] if values[i] is not None else 0.0))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (adds `num_blocks`)."""
        return {**asdict(self), "num_blocks": self.num_blocks}

    def save(self, path: Path, sign: bool = False) -> None:
        """Write the report as JSON atomically (`sign`: marked as this tool's, for a path the user named)."""
        from compress.atomic import write_json

        write_json(Path(path), self.to_dict(), sign=sign)

    @classmethod
    def load(cls, path: Path) -> ImportanceReport:
        """Read a report written by `save`."""
        try:
            d = json.loads(Path(path).read_text())
            d.pop("num_blocks", None)
            d.pop("written_by", None)  # the mark `save(sign=True)` adds
            return cls(**d)
        except (OSError, ValueError, TypeError) as exc:
            raise UserError(f"{path}: not an importance report written by `compress score` ({exc})") from exc
