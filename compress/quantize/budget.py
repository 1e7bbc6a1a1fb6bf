"""The weight-size budget of layer-wise quantization, one type from the request (checked before any model is loaded)
to the plan's meta."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from compress.errors import UserError

if TYPE_CHECKING:
    from compress.models.layers import LayerMap
    from compress.quantize.distortion import Unit


@dataclass(frozen=True)
class Budget:
    """A weight-size budget, one type from the request to the plan's meta: as the user gave it (`--avg-bits` or
    `--max-size`), then counted against a model (`resolve`: total bytes of all weight matrices, embeddings included,
    tied once), then against the allocation units (`for_units`: what is left for them, `room`)."""

    avg_bits_given: float | None = None
    max_size_given: int | None = None
    weight_params: int = 0  # set by resolve()
    fixed_bytes: int = 0  # weight matrices no unit covers; set by for_units()

    @classmethod
    def parse(cls, avg_bits: float | None, max_size: int | None) -> Budget:
        """Exactly one of --avg-bits B / --max-size BYTES, positive; needs no model (checked before loading)."""
        if (avg_bits is None) == (max_size is None):
            raise UserError("give exactly one budget: --avg-bits B (e.g. 4.5) or --max-size BYTES")
        if avg_bits is not None and not avg_bits > 0:
            raise UserError(f"--avg-bits {avg_bits}: must be positive")
        if max_size is not None and not max_size > 0:
            raise UserError(f"--max-size {max_size}: must be a positive number of bytes")
        return cls(avg_bits, None if max_size is None else int(max_size))

    @classmethod
    def from_args(cls, model, avg_bits: float | None, max_size: int | None) -> Budget:
        """parse + resolve in one call."""
        return cls.parse(avg_bits, max_size).resolve(model)

    def resolve(self, model) -> Budget:
        """The budget counted against `model`'s weight matrices."""
        from compress.metrics import weight_footprint

        return replace(self, weight_params=int(weight_footprint(model)["weight_params"]))

    def for_units(self, model, lmap: LayerMap, units: list[Unit]) -> Budget:
        """The budget with the bytes of the matrices no unit covers set aside (they stay as they are)."""
        return replace(self, fixed_bytes=fixed_bytes(model, lmap, units))

    @property
    def bytes(self) -> int:
        """Total stored bytes allowed for all weight matrices."""
        if self.max_size_given is not None:
            return self.max_size_given
        if not self.weight_params:
            raise ValueError("Budget.bytes before resolve(model): --avg-bits needs the model's weight count")
        return int(self.avg_bits_given * self.weight_params / 8)

    @property
    def avg_bits(self) -> float:
        """The same budget in effective bits per weight."""
        return self.bytes * 8 / self.weight_params

    @property
    def room(self) -> int:
        """Bytes the allocator may spend on its units."""
        return self.bytes - self.fixed_bytes

    def meta(self, planned_unit_bytes: int) -> dict:
        """The budget and what a plan spending `planned_unit_bytes` on the units uses, for Plan.meta."""
        used = planned_unit_bytes + self.fixed_bytes
        return {"budget_bytes": self.bytes, "budget_avg_bits": round(self.avg_bits, 4), "planned_bytes": used,
                "planned_avg_bits": round(used * 8 / self.weight_params, 4)}


def fixed_bytes(model, lmap: LayerMap, units: list[Unit]) -> int:
    """Stored bytes of weight matrices that no unit covers (left as they are), as bpw counts them: every
    ≥2-D weight, e.g. BERT's position embeddings, not only the quantizable modules."""
    from compress.metrics import weight_footprint
    from compress.quantize.apply import weight_matrix

    covered = 0
    for name in {m for u in units for m in u.modules}:
        w = weight_matrix(model.get_submodule(name))
        covered += w.numel() * w.element_size()
    return int(weight_footprint(model)["weight_bytes"]) - covered
