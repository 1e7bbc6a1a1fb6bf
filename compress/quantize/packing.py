"""Bit packing of integer codes: any width 1..8, exact round trip, little-endian bit order within the stream."""

from __future__ import annotations

import torch

CHUNK_CODES = 1 << 16  # codes packed or unpacked per step (a multiple of 8): 512 KB of int64 temporaries, below
# the 1 MiB above which a streamed run's allocator maps (and page-faults) every temporary afresh


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes (< 2**bits) into a 1-D uint8 tensor of ceil(n * bits / 8) bytes."""
    _check_bits(bits)
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() > CHUNK_CODES and bits != 8:  # 8 codes always fill `bits` whole bytes: chunks concatenate exactly
        out = torch.empty(packed_bytes(flat.numel(), bits), dtype=torch.uint8, device=flat.device)
        step = CHUNK_CODES * bits // 8
        for k, s in enumerate(range(0, flat.numel(), CHUNK_CODES)):
            part = _pack(flat[s:s + CHUNK_CODES], bits)
            out[k * step:k * step + part.numel()] = part
        return out
    return _pack(flat, bits)


def _pack(flat: torch.Tensor, bits: int) -> torch.Tensor:
    """Code j's bit i at bit j·bits + i of the stream: each run of 8 codes is one little-endian integer of 8·bits
    bits (≤ 56 for bits ≤ 7), cut into `bits` bytes."""
    if bits == 8:
        return flat.clone()
    n = flat.numel()
    per = 8 if 8 % bits else 8 // bits  # codes per whole number of bytes: 8 codes → `bits` bytes, or one byte
    pad = (-n) % per
    x = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, per).to(torch.int64)
    word = (x << (torch.arange(per, dtype=torch.int64, device=flat.device) * bits)).sum(1)
    nbytes = per * bits // 8
    if nbytes == 1:
        return word.to(torch.uint8)
    shifts = torch.arange(nbytes, dtype=torch.int64, device=flat.device) * 8
    return ((word.unsqueeze(1) >> shifts) & 0xFF).to(torch.uint8).reshape(-1)[:packed_bytes(n, bits)]


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack`: the first `n` codes as uint8."""
    _check_bits(bits)
    if n > CHUNK_CODES and bits != 8:
        step = CHUNK_CODES * bits // 8  # bytes holding CHUNK_CODES codes
        out = torch.empty(n, dtype=torch.uint8, device=packed.device)
        for k, s in enumerate(range(0, n, CHUNK_CODES)):
            m = min(CHUNK_CODES, n - s)
            out[s:s + m] = _unpack(packed[k * step:k * step + -(-m * bits // 8)], bits, m)
        return out
    return _unpack(packed, bits, n)


def _unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    if bits == 8:
        return packed[:n].clone()
    if 8 % bits == 0:  # 1, 2, 4: whole codes per byte
        per = 8 // bits
        shifts = torch.arange(per, dtype=torch.uint8, device=packed.device) * bits
        return ((packed.unsqueeze(1) >> shifts) & ((1 << bits) - 1)).reshape(-1)[:n]
    per, nbytes = 8, bits  # 8 codes in `bits` bytes, one little-endian integer
    pad = (-packed.numel()) % nbytes
    b = torch.cat([packed, packed.new_zeros(pad)]).reshape(-1, nbytes).to(torch.int64)
    word = (b << (torch.arange(nbytes, dtype=torch.int64, device=packed.device) * 8)).sum(1)
    shifts = torch.arange(per, dtype=torch.int64, device=packed.device) * bits
    return ((word.unsqueeze(1) >> shifts) & ((1 << bits) - 1)).to(torch.uint8).reshape(-1)[:n]


def packed_bytes(n: int, bits: int) -> int:
    """Bytes `pack` produces for n codes."""
    return (n * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"cannot pack {bits}-bit codes: widths 1..8 only")
