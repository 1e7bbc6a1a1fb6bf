"""Runtime modules holding really packed weights; they dequantize on the fly in forward.

QuantLinear replaces nn.Linear (and GPT-2's Conv1D), QuantEmbedding replaces nn.Embedding, and TiedQuantHead is
an LM head that shares a QuantEmbedding's codes (tied weights quantized once and kept tied).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from compress.quantize.kquant import KQuantWeight, dequantize_k
from compress.quantize.packing import pack, unpack
from compress.quantize.rtn import QuantizedWeight, dequantize
from compress.quantize.spec import K_BLOCK, K_SUB, QuantSpec

TABLE_ROWS = 8192  # rows of a vocabulary-sized table dequantized at a time (embedding lookups, streamed heads)


class PackedWeight(nn.Module):
    """Packed codes, fp16 scales and zero points of one [rows, cols] matrix, with its QuantSpec."""

    def __init__(self, rows: int, cols: int, spec: QuantSpec, allocate: bool = True):
        """Zero buffers of the packed sizes (for load_state_dict to fill), or with `allocate=False` no buffers at all
        (from_quantized sets every one: a vocabulary-sized table's codes are not held twice)."""
        super().__init__()
        spec = spec.for_width(cols)
        self.rows, self.cols, self.spec = rows, cols, spec
        if not allocate:
            for name in ("qweight", "scales", "zeros", "sub_scales", "dmin", "sub_mins"):
                self.register_buffer(name, None)
            return
        if spec.kquant:
            self._init_kquant()
            return
        groups = rows * (cols // spec.group_for(cols))
        self.register_buffer("qweight", torch.zeros(-(-rows * cols * spec.bits // 8), dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(rows, groups // rows, dtype=torch.float16))
        if spec.symmetric:
            self.zeros = None
        elif spec.method == "hqq":
            self.register_buffer("zeros", torch.zeros(rows, groups // rows, dtype=torch.float16))
        else:
            self.register_buffer("zeros", torch.zeros(-(-groups * spec.bits // 8), dtype=torch.uint8))

    def _init_kquant(self) -> None:
        """Buffers of a K-quant: codes, fp16 super-block d (and dmin), integer sub-block scales (and mins)."""
        rows, cols, spec = self.rows, self.cols, self.spec
        subs = cols // K_SUB[spec.bits]
        self.register_buffer("qweight", torch.zeros(-(-rows * cols * spec.bits // 8), dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(rows, cols // K_BLOCK, dtype=torch.float16))
        self.register_buffer("sub_scales", torch.zeros(rows, subs, dtype=torch.int8 if spec.symmetric else torch.uint8))
        self.zeros = None
        if spec.symmetric:
            self.dmin = self.sub_mins = None
        else:
            self.register_buffer("dmin", torch.zeros(rows, cols // K_BLOCK, dtype=torch.float16))
            self.register_buffer("sub_mins", torch.zeros(rows, subs, dtype=torch.uint8))

    @classmethod
    def from_quantized(cls, q: QuantizedWeight | KQuantWeight) -> PackedWeight:
        """Pack a QuantizedWeight (or a K-quant's KQuantWeight)."""
        rows, cols = q.codes.shape
        m = cls(rows, cols, q.spec, allocate=False)
        m.register_buffer("qweight", pack(q.codes, q.spec.bits))
        if isinstance(q, KQuantWeight):
            m.register_buffer("scales", q.d.contiguous())
            m.register_buffer("sub_scales", q.sub_scales.contiguous())
            if q.dmin is not None:
                m.register_buffer("dmin", q.dmin.contiguous())
                m.register_buffer("sub_mins", q.sub_mins.contiguous())
            return m
        m.register_buffer("scales", q.scales.contiguous())
        if q.zeros is not None:
            m.register_buffer("zeros", q.zeros.contiguous() if q.zeros.dtype == torch.float16
                              else pack(q.zeros, q.spec.bits))
        return m

    def dequantize(self) -> torch.Tensor:
        """The float32 weight."""
        return self.dequantize_rows(0, self.rows)

    def dequantize_rows(self, start: int, stop: int) -> torch.Tensor:
        """The float32 rows start:stop (rows are quantized independently): a vocabulary-sized table is used a slice
        at a time without an fp32 copy of the whole of it."""
        stop = min(stop, self.rows)
        n, bits = stop - start, self.spec.bits
        if (self.cols * bits) % 8 == 0:  # whole bytes per row: unpack only these rows' codes
            row_bytes = self.cols * bits // 8
            codes = unpack(self.qweight[start * row_bytes:stop * row_bytes], bits, n * self.cols)
            codes = codes.reshape(n, self.cols)
        else:
            codes = unpack(self.qweight, bits, self.rows * self.cols).reshape(self.rows, self.cols)[start:stop]
        scales = self.scales[start:stop]
        if self.spec.kquant:
            mins = None if self.sub_mins is None else self.sub_mins[start:stop]
            dmin = None if self.dmin is None else self.dmin[start:stop]
            return dequantize_k(codes, scales, dmin, self.sub_scales[start:stop], mins, self.spec)
        zeros = self.zeros
        if zeros is not None and zeros.dtype == torch.uint8:
            zeros = unpack(zeros, bits, self.scales.numel()).reshape(self.scales.shape)
        return dequantize(codes, scales, None if zeros is None else zeros[start:stop], self.spec)

    def stored_weight_bytes(self) -> int:
        """Bytes of codes, scales and zeros (a K-quant's as its GGUF blocks hold them: 6-bit sub-block scales)."""
        if self.spec.kquant:
            return self.spec.stored_bytes(self.rows, self.cols)
        z = 0 if self.zeros is None else self.zeros.numel() * self.zeros.element_size()
        return self.qweight.numel() + self.scales.numel() * 2 + z

    def weight_numel(self) -> int:
        """Parameters this matrix stands for."""
        return self.rows * self.cols


class QuantLinear(nn.Module):
    """y = x Wᵀ + b with W dequantized from packed codes at every call."""

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, bias: bool,
                 packed: PackedWeight | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.packed = packed if packed is not None else PackedWeight(out_features, in_features, spec)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @property
    def spec(self) -> QuantSpec:
        return self.packed.spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.packed.dequantize().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.spec.label()}"


class QuantEmbedding(nn.Module):
    """Embedding lookup from packed codes (rows = tokens, groups along the hidden axis)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, spec: QuantSpec, padding_idx: int | None = None,
                 packed: PackedWeight | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.packed = packed if packed is not None else PackedWeight(num_embeddings, embedding_dim, spec)

    @property
    def spec(self) -> QuantSpec:
        return self.packed.spec

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized table (for code that reads `.weight`, e.g. tied heads)."""
        return self.packed.dequantize()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.num_embeddings
        if rows <= TABLE_ROWS:
            return F.embedding(ids, self.packed.dequantize(), self.padding_idx)
        out = torch.empty(*ids.shape, self.embedding_dim, dtype=torch.float32, device=ids.device)
        for s in range(0, rows, TABLE_ROWS):  # a vocabulary-sized table: looked up a slice of rows at a time
            hit = (ids >= s) & (ids < s + TABLE_ROWS)
            if hit.any():
                out[hit] = self.packed.dequantize_rows(s, min(s + TABLE_ROWS, rows))[ids[hit] - s]
        return out

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.spec.label()}"


class TiedQuantHead(nn.Module):
    """LM head tied to a QuantEmbedding: same codes, stored once."""

    def __init__(self, embedding: QuantEmbedding, bias: torch.Tensor | None = None):
        super().__init__()
        self._embedding = [embedding]  # a list so the codes are not registered (and saved, counted) twice
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._embedding[0].packed.dequantize().to(x.dtype), self.bias)

    @property
    def weight(self) -> torch.Tensor:
        return self._embedding[0].weight
