"""Bit packing of integer codes: any width 1..8, exact round trip, little-endian bit order within the stream."""

from __future__ import annotations

import torch

CHUNK_CODES = 1 << 22  # codes packed or unpacked per step (a multiple of 8): bounds the int32 temporaries to 16 MB


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
    if bits == 8:
        return flat.clone()
    if 8 % bits == 0:  # 1, 2, 4: whole codes per byte
        per = 8 // bits
        pad = (-flat.numel()) % per
        x = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, per).to(torch.int32)
        shifts = torch.arange(per, dtype=torch.int32, device=flat.device) * bits
        return (x << shifts).sum(1).to(torch.uint8)
    bit_idx = torch.arange(bits, dtype=torch.uint8, device=flat.device)
    stream = ((flat.unsqueeze(1) >> bit_idx) & 1).reshape(-1)
    pad = (-stream.numel()) % 8
    stream = torch.cat([stream, stream.new_zeros(pad)]).reshape(-1, 8).to(torch.int32)
    return (stream << torch.arange(8, dtype=torch.int32, device=flat.device)).sum(1).to(torch.uint8)


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
    if 8 % bits == 0:
        per = 8 // bits
        shifts = torch.arange(per, dtype=torch.uint8, device=packed.device) * bits
        return ((packed.unsqueeze(1) >> shifts) & ((1 << bits) - 1)).reshape(-1)[:n]
    bit = torch.arange(8, dtype=torch.uint8, device=packed.device)
    stream = ((packed.unsqueeze(1) >> bit) & 1).reshape(-1)[: n * bits]
    weights = (1 << torch.arange(bits, dtype=torch.int32, device=packed.device))
    return (stream.reshape(n, bits).to(torch.int32) * weights).sum(1).to(torch.uint8)


def packed_bytes(n: int, bits: int) -> int:
    """Bytes `pack` produces for n codes."""
    return (n * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"cannot pack {bits}-bit codes: widths 1..8 only")
