"""QuantSpec: how one weight matrix is quantized, and what it costs in stored bits."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from compress.errors import UserError
from compress.quantize.choices import METHOD

BITS = (2, 3, 4, 5, 6, 8)
FLOAT_BITS = (16, 32)  # "keep in float": fp16 or fp32 storage
METHODS = tuple(METHOD)
SCALE_BITS = 16  # scales (and float zeros) are stored as fp16
# llama.cpp's K-quants: super-blocks of 256 weights; bytes per super-block, sub-block length, signed (scale only)
K_BLOCK = 256
K_BYTES = {2: 84, 3: 110, 4: 144, 5: 176, 6: 210}
K_SUB = {2: 16, 3: 16, 4: 32, 5: 32, 6: 16}
K_SYMMETRIC = {2: False, 3: True, 4: False, 5: False, 6: True}
# what llama.cpp writes instead when a row is not a whole number of super-blocks (Q2_K/Q3_K → IQ4_NL there, Q4_0
# here at the same 4.5 bits; Q5_K → Q5_1 there, Q5_0 here at Q5_K's own 5.5 bits)
K_FALLBACK_BITS = {2: 4, 3: 4, 4: 5, 5: 5, 6: 8}


@dataclass(frozen=True)
class QuantSpec:
    """Weight-only quantization of one matrix: bits, group along the input axis (0 = whole row), symmetry, method.

    `positive_scale` (symmetric only) keeps every scale > 0, as TensorRT requires, instead of llama.cpp Q4_0's
    signed scale that maps the largest-magnitude weight to −2^(b−1) whatever its sign. `kquant` is llama.cpp's
    Q{bits}_K (`QuantSpec.k(bits)`): super-blocks of 256 with quantized sub-block scales (compress.quantize.kquant);
    a matrix whose width is not a multiple of 256 takes `for_width`'s group type instead, as llama.cpp does.
    """

    bits: int
    group_size: int = 32
    symmetric: bool = True
    method: str = "rtn"
    positive_scale: bool = False
    kquant: bool = False

    @classmethod
    def k(cls, bits: int) -> QuantSpec:
        """llama.cpp's Q{bits}_K (bits 2–6)."""
        return cls(bits, K_BLOCK, K_SYMMETRIC.get(bits, True), "rtn", kquant=True)  # __post_init__ checks bits

    def __post_init__(self):
        if self.kquant and self.bits not in K_BYTES:
            raise UserError(f"no K-quant of {self.bits} bits: llama.cpp has Q2_K, Q3_K, Q4_K, Q5_K and Q6_K")
        if self.bits not in BITS + FLOAT_BITS:
            raise UserError(f"unknown bit width {self.bits}: use one of {', '.join(map(str, BITS))} (or 16/32 to "
                            "keep a layer in float)")
        if self.group_size < 0:
            raise UserError(f"group size {self.group_size}: use a positive group (32, 64, 128) or 0 for per channel")
        if self.positive_scale and not self.symmetric:
            raise UserError("positive_scale applies to symmetric quantization only")
        if self.method not in METHODS:
            raise UserError(f"unknown quantization method '{self.method}': use one of {', '.join(METHODS)}")
        if self.kquant:
            if self.group_size != K_BLOCK or self.symmetric != K_SYMMETRIC[self.bits] or self.positive_scale:
                raise UserError(f"{self.bits}-bit K-quant: write it as {self.bits}k (llama.cpp's Q{self.bits}_K)")
            if self.method != "rtn":
                raise UserError(f"K-quants are made by RTN (weighted by the importance matrix), not {self.method}: "
                                "use --method rtn or group candidates (e.g. 8,5,4)")

    def for_width(self, in_features: int) -> QuantSpec:
        """The spec a matrix `in_features` wide really gets: a K-quant falls back to Q4_0/Q5_0/Q8_0 (group 32)
        when the width is not a multiple of 256, as llama.cpp's quantizer does; any other spec is itself."""
        if not self.kquant or in_features % K_BLOCK == 0:
            return self
        return QuantSpec(K_FALLBACK_BITS[self.bits], 32, True, "rtn")

    def fits(self, in_features: int) -> bool:
        """True when the spec (after a K-quant's fallback) can quantize a matrix `in_features` wide."""
        spec = self.for_width(in_features)
        return spec.is_float or in_features % spec.group_for(in_features) == 0

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
        if self.kquant:
            spec = self.for_width(in_features)
            return K_BYTES[self.bits] * 8 / K_BLOCK if spec is self else spec.bits_per_weight(in_features)
        g = self.group_for(in_features)
        zero = 0 if self.symmetric else (SCALE_BITS if self.method == "hqq" else self.bits)
        return self.bits + (SCALE_BITS + zero) / g

    def stored_bytes(self, rows: int, cols: int) -> int:
        """Bytes of codes, scales and zeros for a rows × cols matrix, as packed on disk."""
        from compress.quantize.packing import packed_bytes

        if self.is_float:
            return rows * cols * self.bits // 8
        if self.kquant:
            spec = self.for_width(cols)
            return rows * (cols // K_BLOCK) * K_BYTES[self.bits] if spec is self else spec.stored_bytes(rows, cols)
        groups = rows * (cols // self.group_for(cols))
        zeros = 0
        if not self.symmetric:
            zeros = groups * 2 if self.method == "hqq" else packed_bytes(groups, self.bits)
        return packed_bytes(rows * cols, self.bits) + groups * 2 + zeros

    def check_shape(self, name: str, cols: int) -> None:
        """UserError when the group does not divide the input width."""
        if not self.fits(cols):
            raise UserError(f"group size {self.group_size} does not divide the input width {cols} of {name}; "
                            "use a group that divides it (or 0 for per channel)")

    def to_dict(self) -> dict:
        """JSON form (a Plan action); `kquant` only when set, so group specs read as they always did."""
        d = asdict(self)
        if not self.kquant:
            del d["kquant"]
        return d

    def label(self) -> str:
        """Short name, e.g. 'q4g32s', 'q4k' (Q4_K) or 'fp16'."""
        if self.is_float:
            return f"fp{self.bits}"
        if self.kquant:
            return f"q{self.bits}k"
        g = "ch" if self.group_size == 0 else str(self.group_size)
        sym = ("p" if self.positive_scale else "s") if self.symmetric else "a"
        return f"q{self.bits}g{g}{sym}{'' if self.method == 'rtn' else '-' + self.method}"
