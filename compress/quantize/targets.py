"""Deployment targets: which quantization specs each runtime executes exactly, so a plan made with `--target`
exports without requantizing.

- torch: anything the packed format stores (2–8 bits, any group, symmetric or not, any method).
- ort: ONNX Runtime CPU — MatMulNBits runs 2/4/8-bit codes with power-of-two blocks ≥ 16 (no per-channel);
  GatherBlockQuantized keeps an embedding at 4 or 8 bits.
- trt: TensorRT explicit quantization — symmetric only (zero point 0) with positive scales; INT8 per output
  channel in [-127, 127]; INT4 block-wise weight-only DequantizeLinear. An embedding follows the same rules (its
  DequantizeLinear feeds the tied head's MatMul and, transposed, the Gather).
- gguf: tensor types written from our codes exactly — Q4_0, Q5_0 (symmetric, blocks of 32), Q8_0 (symmetric
  narrow range, blocks of 32) and the K-quants Q2_K … Q6_K (`4k`: super-blocks of 256; a matrix whose width is
  not a multiple of 256 takes Q4_0/Q5_0/Q8_0 instead, as llama.cpp does).

A budget (`--avg-bits`, `--max-size`) counts bytes as the target's file stores them (`stored_bytes`): on ort the
scales are fp32, the graph's activation type, so a group of 32 costs a whole bit per weight, not half of one.
"""

from __future__ import annotations

from dataclasses import replace

from compress.errors import UserError
from compress.quantize.spec import QuantSpec

TARGETS = ("torch", "ort", "trt", "gguf")
DEFAULT_CANDIDATES = {"torch": "8,6,5,4,3", "ort": "8g64,4a,4,4g64a,4g64,2a", "trt": "8g0,4,4g64",
                      "gguf": "8,6k,5k,5,4k,4,3k"}
GGUF_GROUP_CANDIDATES = "8,5,4"  # the gguf menu for GPTQ/HQQ, which write group codes only
# One line per target for --help and messages (the module docstring has the whole rule).
SUMMARY = {"torch": "any width, group and symmetry",
           "ort": "2/4/8-bit, power-of-two groups >= 16; embedding 4/8-bit",
           "trt": "symmetric, positive scales; INT8 per channel, INT4 block-wise; the embedding too",
           "gguf": "Q4_0, Q5_0, Q8_0 and the K-quants 2k-6k"}
EMBEDDING = "embedding"
LINEAR = "linear"


ORT_SCALE_BYTES = 4  # MatMulNBits / GatherBlockQuantized scales have the activation type: fp32 in our graphs


def stored_bytes(spec: QuantSpec, rows: int, cols: int, target: str = "torch") -> int:
    """Bytes of one rows × cols matrix as `target`'s file stores it: the artifact's packing, except on ort, where
    scales are fp32 and zero points are stored only for asymmetric codes (MatMulNBits' default is 2^(bits−1))."""
    from compress.quantize.packing import packed_bytes  # imports torch: not at import time (the CLI's help)

    if target != "ort" or spec.is_float:
        return spec.stored_bytes(rows, cols)
    groups = rows * (cols // spec.group_for(cols))
    zeros = 0 if spec.symmetric else packed_bytes(groups, spec.bits)
    return packed_bytes(rows * cols, spec.bits) + groups * ORT_SCALE_BYTES + zeros


def bits_per_weight(spec: QuantSpec, cols: int, target: str = "torch") -> float:
    """Stored bits per weight of a matrix `cols` wide, as `target`'s file stores it (see stored_bytes)."""
    return stored_bytes(spec, 1, cols, target) * 8 / cols if target == "ort" and not spec.is_float \
        else spec.bits_per_weight(cols)


def check_target(target: str) -> str:
    """The target name, or UserError naming the choices."""
    if target not in TARGETS:
        raise UserError(f"--target {target}: use one of {', '.join(TARGETS)}")
    return target


def problem(spec: QuantSpec, target: str, role: str = LINEAR) -> str | None:
    """Why `target` cannot run `spec` for a module of `role` ('linear' or 'embedding'), or None when it can."""
    if spec.is_float or target == "torch":
        return None
    if spec.kquant:
        return None if target == "gguf" else "K-quants run in llama.cpp only: use --target gguf (or torch)"
    g = spec.group_size
    if target == "ort":
        allowed = (4, 8) if role == EMBEDDING else (2, 4, 8)
        if spec.bits not in allowed:
            return f"ONNX Runtime runs {'/'.join(map(str, allowed))}-bit {role}s only"
        if g < 16 or g & (g - 1):
            return "ONNX Runtime needs a power-of-two group ≥ 16 (not per channel)"
        return None
    if target == "trt":
        if not spec.symmetric:
            return "TensorRT needs symmetric quantization (zero point 0)"
        if spec.bits == 8:
            return None if g == 0 else "TensorRT runs INT8 weights per output channel only (write 8g0)"
        if spec.bits == 4:
            if not spec.positive_scale:
                return "TensorRT rejects negative scales: use positive-scale symmetric codes (4p)"
            return None if g >= 16 and not g & (g - 1) else "TensorRT INT4 needs a power-of-two block ≥ 16"
        return "TensorRT runs INT8 (per channel) and INT4 (block-wise) weights only"
    if target == "gguf":
        if spec.bits not in (4, 5, 8) or not spec.symmetric or g != 32:
            return ("GGUF types written from our codes are Q4_0, Q5_0, Q8_0 (symmetric 4, 5 or 8 bits, group 32) and "
                    "the K-quants 2k-6k")
        return None
    raise UserError(f"--target {target}: use one of {', '.join(TARGETS)}")


def adapt(spec: QuantSpec, target: str) -> QuantSpec:
    """The spec as `target` needs it where that is only a choice of rule: TensorRT's symmetric codes use positive
    scales (llama.cpp Q4_0's signed scale cannot be expressed there)."""
    if target == "trt" and spec.symmetric and not spec.is_float and spec.bits != 8 and not spec.positive_scale \
            and not spec.kquant:
        return replace(spec, positive_scale=True)
    return spec


def check_candidates(candidates: list[QuantSpec], target: str) -> None:
    """UserError naming the first candidate `target` cannot run as a Linear."""
    for c in candidates:
        why = problem(c, target, LINEAR)
        if why:
            raise UserError(f"candidate {c.label()} cannot run on --target {target}: {why}")


def check_specs(specs: dict[str, QuantSpec], target: str, embeddings: set[str]) -> None:
    """UserError naming the first module whose spec `target` cannot run (plans from --plan or --bits)."""
    for name, spec in specs.items():
        why = problem(spec, target, EMBEDDING if name in embeddings else LINEAR)
        if why:
            raise UserError(f"{name}: {spec.label()} cannot run on --target {target}: {why}")
