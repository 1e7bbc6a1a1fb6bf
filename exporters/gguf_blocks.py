"""GGUF block bytes for one weight matrix, built from an artifact's own codes and fp16 scales where the type can
hold them, else requantized from the dequantized weight with the `gguf` package's reference quantizers.

Layouts (blocks of 32 along the input axis, row-major): Q4_0 = fp16 d + 16 bytes of nibbles (low nibbles are
elements 0..15, high 16..31), value d·(q−8); Q5_0 = fp16 d + 4 bytes of fifth bits + 16 bytes of nibbles, value
d·(q−16); Q8_0 = fp16 d + 32 int8, value d·q; Q4_1/Q5_1 add an fp16 offset m after d, value d·q + m.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants

from compress.quantize.modules import PackedWeight
from compress.quantize.packing import unpack
from compress.quantize.rtn import dequantize as dequantize_codes
from compress.quantize.spec import K_BLOCK, QuantSpec
from exporters.ort_quant import codes_of

BLOCK = 32
LEVELS = {T.Q4_0: (-8, 7), T.Q5_0: (-16, 15), T.Q8_0: (-128, 127)}  # value = d·s with s in this range
FLOAT_TYPES = {"F32": T.F32, "F16": T.F16, "BF16": T.BF16}
QUANT_TYPES = {"Q8_0": T.Q8_0, "Q5_1": T.Q5_1, "Q5_0": T.Q5_0, "Q4_1": T.Q4_1, "Q4_0": T.Q4_0}
WRITABLE = {**FLOAT_TYPES, **QUANT_TYPES}


@dataclass
class Encoded:
    """Block bytes [rows, row_bytes] of one matrix, their type, and how they were made."""

    data: np.ndarray
    qtype: T
    how: str  # "codes" (from the artifact's codes), "requantized" (from the dequantized weight), "float"
    note: str = ""
    reference: np.ndarray | None = None  # the float32 weight the artifact's codes stand for


K_TYPES = {2: T.Q2_K, 3: T.Q3_K, 4: T.Q4_K, 5: T.Q5_K, 6: T.Q6_K}


def type_for(spec: QuantSpec) -> T:
    """The GGUF type for a quantized spec: Q{b}_K for a K-quant, Q4_0/Q5_0/Q8_0 for symmetric 4/5/8 bits, otherwise
    the nearest writable type with at least as many bits (2–3 → Q4_0, 6 → Q8_0; asymmetric 4 → Q4_1, 5 → Q5_1,
    6/8 → Q8_0)."""
    if spec.kquant:
        return K_TYPES[spec.bits]
    if spec.bits <= 3:
        return T.Q4_1 if not spec.symmetric and spec.method == "hqq" else T.Q4_0
    if spec.bits == 4:
        return T.Q4_0 if spec.symmetric else T.Q4_1
    if spec.bits == 5:
        return T.Q5_0 if spec.symmetric else T.Q5_1
    return T.Q8_0


def encode_packed(p: PackedWeight) -> Encoded:
    """Blocks of a packed matrix: from its codes when every 32-block has one scale, else requantized; with the
    artifact's dequantized weight (unpacked once) as `reference`."""
    spec, qtype = p.spec, type_for(p.spec)
    codes = unpack_codes(p)
    if spec.kquant:
        enc = Encoded(kquant_blocks(p, codes), qtype, "codes")
        enc.reference = p.dequantize().numpy()
        return enc
    zeros = None if spec.symmetric else _zeros(p)
    ref = dequantize_codes(torch.from_numpy(codes), p.scales, None if zeros is None else torch.from_numpy(zeros),
                           spec).numpy()
    enc = _from_codes(p, codes.astype(np.int16), zeros, qtype, ref)
    enc.reference = ref
    return enc


def unpack_codes(p: PackedWeight) -> np.ndarray:
    """Unsigned codes [rows, cols] (uint8), as ort_quant.codes_of gives them; 3/5/6/7-bit streams are read 8 codes
    (= `bits` bytes, one little-endian integer) at a time, ~10× faster than the generic bit-by-bit unpack."""
    bits, n = p.spec.bits, p.rows * p.cols
    if 8 % bits == 0 or n % 8:
        return codes_of(p)
    chunks = p.qweight.numpy()[: n * bits // 8].reshape(-1, bits).astype(np.uint64)
    word = np.zeros(len(chunks), np.uint64)
    for i in range(bits):
        word |= chunks[:, i] << np.uint64(8 * i)
    shifts = np.arange(8, dtype=np.uint64) * np.uint64(bits)
    return ((word[:, None] >> shifts) & np.uint64((1 << bits) - 1)).astype(np.uint8).reshape(p.rows, p.cols)


def _from_codes(p: PackedWeight, codes: np.ndarray, zeros: np.ndarray | None, qtype: T, ref: np.ndarray) -> Encoded:
    spec = p.spec
    g = spec.group_for(p.cols)
    if g % BLOCK:
        return Encoded(quantize_float(ref, qtype), qtype, "requantized", f"group {g} is not a multiple of {BLOCK}")
    per = g // BLOCK
    d = np.repeat(p.scales.numpy().astype(np.float16), per, axis=1)  # one scale per 32-block
    if qtype in (T.Q4_1, T.Q5_1):
        m = (-np.repeat(zeros.astype(np.float32), per, axis=1) * d.astype(np.float32)).astype(np.float16)
        return Encoded(affine_blocks(codes.astype(np.uint8), d, m, qtype), qtype, "codes",
                       "offset m = −zero·scale rounded to fp16")
    if zeros is not None and spec.method == "hqq":
        return Encoded(quantize_float(ref, qtype), qtype, "requantized",
                       f"fp16 zero points do not fit {qtype.name}'s integer levels")
    zero = 2 ** (spec.bits - 1) if zeros is None else np.repeat(zeros.astype(np.int16), g, axis=1)
    levels = codes - zero
    lo, hi = LEVELS[qtype]
    if levels.min() < lo or levels.max() > hi:
        return Encoded(quantize_float(ref, qtype), qtype, "requantized",
                       f"codes − zero span [{levels.min()}, {levels.max()}], beyond {qtype.name}'s [{lo}, {hi}]")
    return Encoded(level_blocks(levels, d, qtype), qtype, "codes")


def level_blocks(levels: np.ndarray, d: np.ndarray, qtype: T) -> np.ndarray:
    """Q4_0/Q5_0/Q8_0 bytes [rows, row_bytes] of value = d·s, from signed levels s [rows, cols], fp16 d [rows, nb]."""
    rows, cols = levels.shape
    nb = cols // BLOCK
    s = levels.reshape(rows, nb, BLOCK)
    head = d.astype(np.float16).reshape(rows, nb, 1).view(np.uint8)
    if qtype == T.Q8_0:
        body = [s.astype(np.int8).view(np.uint8)]
    elif qtype == T.Q4_0:
        body = [_nibbles((s + 8).astype(np.uint8))]
    else:
        q = (s + 16).astype(np.uint8)
        body = [_fifth_bits(q), _nibbles(q)]
    return np.concatenate([head, *body], axis=-1).reshape(rows, -1)


def affine_blocks(codes: np.ndarray, d: np.ndarray, m: np.ndarray, qtype: T) -> np.ndarray:
    """Q4_1/Q5_1 bytes of value = d·q + m, from unsigned codes q [rows, cols] and fp16 d, m [rows, nb]."""
    rows, cols = codes.shape
    nb = cols // BLOCK
    q = codes.reshape(rows, nb, BLOCK)
    parts = [d.astype(np.float16).reshape(rows, nb, 1).view(np.uint8),
             m.astype(np.float16).reshape(rows, nb, 1).view(np.uint8)]
    if qtype == T.Q5_1:
        parts.append(_fifth_bits(q))
    parts.append(_nibbles(q))
    return np.concatenate(parts, axis=-1).reshape(rows, -1)


def quantize_float(w: np.ndarray, qtype: T) -> np.ndarray:
    """`w` [rows, cols] in `qtype` (floats cast, block types by the gguf reference quantizer)."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    if qtype == T.F32:
        return w
    if qtype == T.F16:
        return w.astype(np.float16)
    return quants.quantize(w, qtype)


def dequantize(data: np.ndarray, qtype: T, cols: int) -> np.ndarray:
    """float32 [rows, cols] of what `data` holds (the gguf package's reference dequantizers)."""
    if qtype in (T.F32, T.F16):
        return data.astype(np.float32).reshape(-1, cols)
    return quants.dequantize(data, qtype).reshape(-1, cols)


def _zeros(p: PackedWeight) -> np.ndarray:
    """Zero points [rows, groups] (integer codes unpacked as uint8, or hqq's fp16)."""
    if p.zeros.dtype == torch.float16:
        return p.zeros.numpy()
    return unpack(p.zeros, p.spec.bits, p.scales.numel()).reshape(p.scales.shape).numpy()


def _nibbles(q: np.ndarray) -> np.ndarray:
    """16 bytes per block: element j in the low nibble of byte j, element 16+j in its high nibble."""
    return (q[..., :16] & 0x0F) | ((q[..., 16:] & 0x0F) << 4)


def _fifth_bits(q: np.ndarray) -> np.ndarray:
    """4 bytes per block: bit 4 of element j at bit j of a little-endian uint32."""
    return np.packbits((q >> 4) & 1, axis=-1, bitorder="little")


def kquant_blocks(p: PackedWeight, codes: np.ndarray) -> np.ndarray:
    """Q2_K … Q6_K bytes [rows, row_bytes] of a K-quant's codes [rows, cols], fp16 d (dmin) [rows, super-blocks]
    and integer sub-block scales (mins) [rows, sub-blocks], in llama.cpp's block layouts (block_q*_K in
    ggml-common.h; the inverse of the gguf package's dequantize_blocks)."""
    rows, cols = codes.shape
    nb = cols // K_BLOCK
    q = codes.reshape(rows, nb, K_BLOCK)
    d = p.scales.numpy().astype(np.float16).reshape(rows, nb, 1).view(np.uint8)
    sc = p.sub_scales.numpy().reshape(rows, nb, -1)
    bits = p.spec.bits
    if bits == 6:
        ql = q.reshape(rows, nb, 2, 2, 64)  # [half][nibble][64]: element h·128 + s·64 + e
        low = (ql[..., 0, :] & 0x0F) | ((ql[..., 1, :] & 0x0F) << 4)
        qh = (q.reshape(rows, nb, 2, 4, 32) >> 4) & 0x03  # [half][pair][32]: element h·128 + k·32 + l
        high = qh[..., 0, :] | (qh[..., 1, :] << 2) | (qh[..., 2, :] << 4) | (qh[..., 3, :] << 6)
        parts = [low.reshape(rows, nb, 128), high.reshape(rows, nb, 64), sc.astype(np.int8).view(np.uint8), d]
    elif bits == 3:
        u = q.reshape(rows, nb, 2, 4, 32)  # codes = level + 4, in [0, 7]
        low = (u[..., 0, :] & 3) | ((u[..., 1, :] & 3) << 2) | ((u[..., 2, :] & 3) << 4) | ((u[..., 3, :] & 3) << 6)
        hmask = np.packbits((q.reshape(rows, nb, 8, 32) >> 2) & 1, axis=-2, bitorder="little").reshape(rows, nb, 32)
        s6 = (sc.astype(np.int16) + 32).astype(np.uint8)  # 16 six-bit scales, stored + 32
        lo4 = (s6[..., :8] & 0x0F) | ((s6[..., 8:] & 0x0F) << 4)
        hi2 = s6 >> 4
        hi = hi2[..., 0:4] | (hi2[..., 4:8] << 2) | (hi2[..., 8:12] << 4) | (hi2[..., 12:16] << 6)
        parts = [hmask, low.reshape(rows, nb, 64), lo4, hi, d]
    elif bits == 2:
        u = q.reshape(rows, nb, 2, 4, 32)
        qs = u[..., 0, :] | (u[..., 1, :] << 2) | (u[..., 2, :] << 4) | (u[..., 3, :] << 6)
        mins = p.sub_mins.numpy().reshape(rows, nb, -1)
        dmin = p.dmin.numpy().astype(np.float16).reshape(rows, nb, 1).view(np.uint8)
        parts = [(sc & 0x0F) | ((mins & 0x0F) << 4), qs.reshape(rows, nb, 64), d, dmin]
    else:  # Q4_K, Q5_K: 8 sub-blocks of 32, six-bit scales and mins in 12 bytes
        mins = p.sub_mins.numpy().reshape(rows, nb, -1)
        dmin = p.dmin.numpy().astype(np.float16).reshape(rows, nb, 1).view(np.uint8)
        packed = np.concatenate([sc[..., :4] | ((sc[..., 4:] >> 4) << 6), mins[..., :4] | ((mins[..., 4:] >> 4) << 6),
                                 (sc[..., 4:] & 0x0F) | ((mins[..., 4:] & 0x0F) << 4)], axis=-1)
        pairs = q.reshape(rows, nb, 4, 2, 32)  # sub-block 2c in the low nibbles of chunk c, 2c + 1 in the high
        nib = ((pairs[..., 0, :] & 0x0F) | ((pairs[..., 1, :] & 0x0F) << 4)).reshape(rows, nb, 128)
        parts = [d, dmin, packed.astype(np.uint8)]
        if bits == 5:
            parts.append(np.packbits((q.reshape(rows, nb, 8, 32) >> 4) & 1, axis=-2, bitorder="little")
                         .reshape(rows, nb, 32))
        parts.append(nib)
    return np.concatenate([x.astype(np.uint8) for x in parts], axis=-1).reshape(rows, -1)
