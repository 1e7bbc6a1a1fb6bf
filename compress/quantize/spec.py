"""QuantSpec: how one weight matrix is quantized, and what it costs in stored bits."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from compress.errors import UserError
from compress.quantize.choices import METHOD

BITS = (2, 3, 4, 5, 6, 8)
FLOAT_BITS = (16, 32)  # "keep in float": fp16 or fp32 storage
METHODS = tuple(METHOD)
SCALE_BITS = 16  # scales (and float zeros) are stored as fp16


@dataclass(frozen=True)
class QuantSpec:
    """Weight-only quantization of one matrix: bits, group along the input axis (0 = whole row), symmetry, method.

    `positive_scale` (symmetric only) keeps every scale > 0, as TensorRT requires, instead of llama.cpp Q4_0's
    signed scale that maps the largest-magnitude weight to −2^(b−1) whatever its sign.
    """

    bits: int
    group_size: int = 32
    symmetric: bool = True
    method: str = "rtn"
    positive_scale: bool = False

    def __post_init__(self):
        if self.bits not in BITS + FLOAT_BITS:
            raise UserError(f"unknown bit width {self.bits}: use one of {', '.join(map(str, BITS))} (or 16/32 to "
                            "keep a layer in float)")
        if self.group_size < 0:
            raise UserError(f"group size {self.group_size}: use a positive group (32, 64, 128) or 0 for per channel")
        if self.positive_scale and not self.symmetric:
            raise UserError("positive_scale applies to symmetric quantization only")
        if self.method not in METHODS:
            raise UserError(f"unknown quantization method '{self.method}': use one of {', '.join(METHODS)}")

    @property
    def is_float(self) -> bool:
        """True when the matrix is kept in float (16 or 32 bits) rather than quantized."""
        return self.bits in FLOAT_BITS

    def group_for(self, in_features: int) -> int:
        """The actual group length for a matrix with `in_features` columns (per-channel = the whole row)."""
        return in_features if self.group_size == 0 else self.group_size

    def bits_per_weight(self, in_features: int) -> float:
        """Stored bits per weight: codes + fp16 scale per group (+ zero point per group when asymmetric)."""
        if self.is_float:
            return float(self.bits)
        g = self.group_for(in_features)
        zero = 0 if self.symmetric else (SCALE_BITS if self.method == "hqq" else self.bits)
        return self.bits + (SCALE_BITS + zero) / g

    def stored_bytes(self, rows: int, cols: int) -> int:
        """Bytes of codes, scales and zeros for a rows × cols matrix, as packed on disk."""
        from compress.quantize.packing import packed_bytes

        if self.is_float:
            return rows * cols * self.bits // 8
        groups = rows * (cols // self.group_for(cols))
        zeros = 0
        if not self.symmetric:
            zeros = groups * 2 if self.method == "hqq" else packed_bytes(groups, self.bits)
        return packed_bytes(rows * cols, self.bits) + groups * 2 + zeros

    def check_shape(self, name: str, cols: int) -> None:
        """UserError when the group does not divide the input width."""
        if not self.is_float and cols % self.group_for(cols):
            raise UserError(f"group size {self.group_size} does not divide the input width {cols} of {name}; "
                            "use a group that divides it (or 0 for per channel)")

    def to_dict(self) -> dict:
        """JSON form (a Plan action)."""
        return asdict(self)

    def label(self) -> str:
        """Short name, e.g. 'q4g32s' or 'fp16'."""
        if self.is_float:
            return f"fp{self.bits}"
        g = "ch" if self.group_size == 0 else str(self.group_size)
        sym = ("p" if self.positive_scale else "s") if self.symmetric else "a"
        return f"q{self.bits}g{g}{sym}{'' if self.method == 'rtn' else '-' + self.method}"
