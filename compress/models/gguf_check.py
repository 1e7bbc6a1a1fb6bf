"""Check a GGUF file's structure before any reader trusts it: counts, strings, arrays and tensor extents must fit
in the file, so a truncated or hostile file is refused in milliseconds instead of allocating what it promises."""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

from compress.errors import UserError

_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value type -> bytes
_STRING, _ARRAY = 8, 9
MAX_DIMS = 4


class _Bad(Exception):
    pass


def check_gguf(path: Path) -> dict:
    """Walk the header of the GGUF at `path`; return {version, tensors, kvs, data_bytes}, or raise UserError naming
    the file and what does not fit."""
    path = Path(path)
    size = path.stat().st_size
    if size < 24:
        raise UserError(f"{path}: not a GGUF file ({size} bytes; a header alone is 24)")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        try:
            return _walk(buf, size)
        except _Bad as exc:
            raise UserError(f"{path}: damaged or hostile GGUF ({exc}); re-create or re-download it") from None


def _walk(buf, size: int) -> dict:
    if buf[:4] != b"GGUF":
        raise _Bad("no GGUF magic")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    if version not in (2, 3):
        raise _Bad(f"version {version}")
    pos = 24
    if n_kv * 13 > size - pos or n_tensors * 24 > size - pos:
        raise _Bad(f"header promises {n_tensors:,} tensors and {n_kv:,} metadata keys in a {size:,}-byte file")
    alignment = 32
    for _ in range(n_kv):
        key, pos = _string(buf, pos, size)
        (vtype,), pos = _unpack(buf, "<I", pos, size)
        start = pos
        pos = _value(buf, vtype, pos, size)
        if key == "general.alignment" and vtype == 4:
            alignment = struct.unpack_from("<I", buf, start)[0]
            if alignment == 0 or alignment & (alignment - 1):
                raise _Bad(f"alignment {alignment}")
    extents = []
    for _ in range(n_tensors):
        name, pos = _string(buf, pos, size)
        (n_dims,), pos = _unpack(buf, "<I", pos, size)
        if n_dims > MAX_DIMS:
            raise _Bad(f"tensor {name!r} has {n_dims} dimensions")
        dims, pos = _unpack(buf, f"<{n_dims}Q", pos, size)
        (ttype, offset), pos = _unpack(buf, "<IQ", pos, size)
        extents.append((name, dims, ttype, offset))
    data_start = -(-pos // alignment) * alignment
    data_bytes = size - data_start
    for name, dims, ttype, offset in extents:
        nbytes = _nbytes(name, dims, ttype)
        if offset > data_bytes or nbytes > data_bytes - offset:
            raise _Bad(f"tensor {name!r} needs bytes {offset:,}..{offset + nbytes:,} of a {data_bytes:,}-byte data "
                       "section (file truncated?)")
    return {"version": version, "tensors": n_tensors, "kvs": n_kv, "data_bytes": data_bytes}


def _nbytes(name: str, dims: tuple, ttype: int) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
    except (ValueError, KeyError):
        raise _Bad(f"tensor {name!r} has unknown type {ttype}") from None
    n = 1
    for d in dims:
        n *= d
        if n > 1 << 48:
            raise _Bad(f"tensor {name!r} has an absurd shape {list(dims)}")
    return n // block * type_size


def _unpack(buf, fmt: str, pos: int, size: int) -> tuple[tuple, int]:
    n = struct.calcsize(fmt)
    if pos + n > size:
        raise _Bad(f"ends inside the header at byte {pos:,}")
    return struct.unpack_from(fmt, buf, pos), pos + n


def _string(buf, pos: int, size: int) -> tuple[str, int]:
    (n,), pos = _unpack(buf, "<Q", pos, size)
    if n > size - pos:
        raise _Bad(f"a string of {n:,} bytes at byte {pos:,} runs past the end")
    return bytes(buf[pos:pos + n]).decode("utf-8", "replace"), pos + n


def _value(buf, vtype: int, pos: int, size: int) -> int:
    if vtype in _SCALAR:
        return _unpack(buf, f"<{_SCALAR[vtype]}s", pos, size)[1]
    if vtype == _STRING:
        return _string(buf, pos, size)[1]
    if vtype == _ARRAY:
        (etype, count), pos = _unpack(buf, "<IQ", pos, size)
        if etype in _SCALAR:
            if count * _SCALAR[etype] > size - pos:
                raise _Bad(f"an array of {count:,} values at byte {pos:,} runs past the end")
            return pos + count * _SCALAR[etype]
        if etype == _STRING:
            if count * 8 > size - pos:
                raise _Bad(f"an array of {count:,} strings at byte {pos:,} runs past the end")
            for _ in range(count):
                pos = _string(buf, pos, size)[1]
            return pos
        raise _Bad(f"array of type {etype}")
    raise _Bad(f"metadata value type {vtype}")
