"""bitsandbytes backend: a plan's 8-bit Linears become Linear8bitLt, its 4-bit Linears Linear4bit (nf4).

bitsandbytes quantizes by itself (int8 absmax per output row; nf4 absmax per block of the flattened weight) and
cannot load our codes, so every mapped layer is built from the ORIGINAL float weight; the plan's bit width and
group size are honoured, its method (rtn/hqq/gptq) and symmetry are not. Measured on CPU (bitsandbytes 0.50.2):
- Linear8bitLt casts activations to fp16 and quantizes them per token to int8 (W8A8). threshold 0.0 (our default)
  is plain int8; 6.0 (LLM.int8() fp16 outlier columns) matched its error in a one-layer probe but ran a 512-token
  prefill 15x slower.
- Linear4bit, on CPUs with AVX512-BF16, repacks its weight at the first eval forward and computes in bf16 (not
  the float32 compute dtype) with a fused kernel; that kernel needs out_features % 32 == 0 and in_features %
  blocksize == 0, so other layers are pinned to bnb's dequantize + fp32 matmul path, which is about 4x slower.
- Nested ("double") quantization of the nf4 absmax is on by default: 4.13 bpw at block 64 instead of 4.5.
- bnb's own Linear4bit.state_dict() after a CPU forward re-quantizes the absmax (and without nesting saves it in
  the wrong layout); BnbLinear4bit saves the state bnb first made instead, and leaves the module untouched.
Saving: `hf_quantization_config` + `save_pretrained` for one-width mappings; transformers loads it back on CPU.
"""

from __future__ import annotations

import copy
import logging
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from compress.errors import UserError
from compress.quantize.spec import QuantSpec


@contextmanager
def _quiet(name: str):
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


# Importing bitsandbytes on a CPU with AVX512-BF16 warns that the optional `kernels` package is missing; bnb then
# uses its own bundled CPU kernel, which is what was measured here.
with _quiet("bitsandbytes.backends.cpu.ops"):
    import bitsandbytes as bnb
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bnb.functional.quantize_4bit accepts these (CPU: all)
DEFAULT_BLOCKSIZE = 64
CPU_PACK_N = 32  # bnb's CPU repacking groups output rows by 32
KEPT_WIDTH = "kept float: not expressible in bitsandbytes (only 8-bit Linear8bitLt and 4-bit nf4 Linear4bit)"
KEPT_EMBEDDING = "kept float: embeddings stay float in the bitsandbytes backend"
KEPT_HEAD = "kept float: the LM head stays float in the bitsandbytes backend"
KEPT_PLAN = "kept float: the plan keeps it in float (32 bits)"
KEPT_NOT_LINEAR = "kept: not a Linear"


class _CastWarningFilter(logging.Filter):
    """Drops bnb's per-call 'inputs will be cast from float32 to float16' warning (documented above)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "will be cast from" not in record.getMessage()


_bnb_autograd_log = logging.getLogger("bitsandbytes.autograd._functions")
if not any(isinstance(f, _CastWarningFilter) for f in _bnb_autograd_log.filters):
    _bnb_autograd_log.addFilter(_CastWarningFilter())


class BnbLinear8bit(bnb.nn.Linear8bitLt):
    """Linear8bitLt (int8 weight, fp32 scale per row) that reports its stored bytes to weight_footprint."""

    stored: int = 0

    def stored_weight_bytes(self) -> int:
        """int8 weights + fp32 row scales, as bitsandbytes serializes them."""
        return self.stored

    def weight_numel(self) -> int:
        """Parameters this matrix stands for."""
        return self.in_features * self.out_features


class BnbLinear4bit(bnb.nn.Linear4bit):
    """Linear4bit (nf4) that reports its stored bytes to weight_footprint and saves without side effects.

    bnb's own state_dict() undoes its CPU repacking in place and re-quantizes the absmax from bf16, which changes
    the model a little at every save (and corrupts it without nesting); this one saves the codes unpacked and the
    quant state as bnb first made it, and leaves the module as it was.
    """

    stored: int = 0
    saved_state: dict | None = None  # quant_state.as_dict(packed=True) right after quantization

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        state = self.weight.quant_state
        if self.saved_state is None or not getattr(state, "packing_format_for_cpu", False):
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        codes, _ = _convert_weight_packed_for_cpu_inverse(self.weight.data, copy.copy(state))
        destination[prefix + "weight"] = codes
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
        for k, v in self.saved_state.items():
            destination[prefix + "weight." + k] = v

    def stored_weight_bytes(self) -> int:
        """Packed nf4 codes + absmax per block (8-bit when nested, + fp32 per 256 blocks) + codebooks."""
        return self.stored

    def weight_numel(self) -> int:
        """Parameters this matrix stands for."""
        return self.in_features * self.out_features


@dataclass
class BnbRecord:
    """What to_bitsandbytes did: mapped layers (name -> kind), kept layers (name -> why), sizes, notes."""

    mapped: dict[str, str] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)
    bits: dict[int, int] = field(default_factory=dict)
    stored_bytes: int = 0
    weight_params: int = 0
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    threshold: float = 0.0
    double_quant: bool = True

    @property
    def bpw(self) -> float:
        """Stored bits per weight over the mapped layers."""
        return self.stored_bytes * 8 / self.weight_params if self.weight_params else float("nan")

    def to_dict(self) -> dict:
        """JSON form."""
        return {**asdict(self), "bpw": round(self.bpw, 4)}


def to_bitsandbytes(model: nn.Module, specs: dict[str, QuantSpec], original_weights: dict | None = None, *,
                    strict: bool = False, threshold: float = 0.0, double_quant: bool = True,
                    fused_cpu: bool = True) -> BnbRecord:
    """Replace the plan's 8-bit Linears by Linear8bitLt and 4-bit ones by Linear4bit nf4, in place, quantized by
    bitsandbytes from the float weights (the module's own, or `original_weights[name]` when given; bnb cannot load
    our codes). Other widths, embeddings and the LM head stay as they are (UserError instead when `strict`).

    `threshold` is Linear8bitLt's outlier threshold; `double_quant` nests the nf4 absmax; `fused_cpu=False` pins
    every Linear4bit to bnb's dequantize + fp32 matmul path instead of its bf16 CPU kernel.
    """
    t0 = time.perf_counter()
    original_weights = original_weights or {}
    record = BnbRecord(threshold=threshold, double_quant=double_quant)
    head = _head_name(model)
    plan: list[tuple[str, nn.Module, QuantSpec]] = []
    for name, spec in specs.items():
        module = model.get_submodule(name)
        reason = _kept_reason(name, module, spec, head, name in original_weights)
        if reason is None:
            plan.append((name, module, spec))
        else:
            record.kept[name] = reason
    refused = {n: r for n, r in record.kept.items() if r != KEPT_PLAN}
    if strict and refused:
        listed = "; ".join(f"{n} ({specs[n].label()})" for n in list(refused)[:5])
        more = f" and {len(refused) - 5} more" if len(refused) > 5 else ""
        raise UserError(f"--backend bnb maps only 8-bit and 4-bit Linear layers; the plan also has {listed}{more}: "
                        "change those rules to 8 or 4 bits (or 32 to keep them), or drop strict")
    blocks_fallback: set[int] = set()
    unfused: list[str] = []
    for name, module, spec in plan:
        weight, bias = _float_weight(name, module, original_weights.get(name))
        if spec.bits == 8:
            new = _make_8bit(weight, bias, threshold)
            record.mapped[name] = "int8 Linear8bitLt"
        else:
            blocksize = spec.group_for(weight.shape[1])
            if blocksize not in BLOCKSIZES:
                blocks_fallback.add(blocksize)
                blocksize = DEFAULT_BLOCKSIZE
            new = _make_nf4(weight, bias, blocksize, double_quant)
            if not (fused_cpu and weight.shape[0] % CPU_PACK_N == 0 and weight.shape[1] % blocksize == 0):
                new.support_avx512bf16_for_cpu = False
                if fused_cpu_kernel():
                    unfused.append(name)
            record.mapped[name] = f"nf4 Linear4bit block {blocksize}"
        new.train(module.training)
        record.bits[spec.bits] = record.bits.get(spec.bits, 0) + 1
        record.stored_bytes += new.stored
        record.weight_params += new.weight_numel()
        _set(model, name, new)
    record.bits = dict(sorted(record.bits.items(), reverse=True))
    _notes(record, specs, blocks_fallback, unfused, threshold, double_quant, fused_cpu)
    record.seconds = round(time.perf_counter() - t0, 2)
    return record


def hf_quantization_config(model: nn.Module, record: BnbRecord):
    """A transformers BitsAndBytesConfig describing the mapped model, so that `model.config.quantization_config =
    it; model.save_pretrained(dir)` writes a checkpoint `from_pretrained(dir, device_map="cpu",
    dtype=torch.float32)` loads back (nf4 block sizes ride in each layer's saved quant state).

    One config holds one width: UserError for a plan mixing 8-bit and 4-bit layers. Every Linear left float is
    listed in llm_int8_skip_modules (else transformers would quantize it on load).
    """
    from transformers import BitsAndBytesConfig

    widths = [b for b, n in record.bits.items() if n]
    if len(widths) != 1:
        raise UserError("transformers' BitsAndBytesConfig describes one width (8-bit or 4-bit) per model; this "
                        f"mapping has {widths or 'no mapped layers'}: save it with torch.save, or use one width")
    skip = [n for n, m in model.named_modules()
            if (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D")
            and not isinstance(m, bnb.nn.Linear8bitLt | bnb.nn.Linear4bit)]
    if widths[0] == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=record.threshold,
                                  llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                              bnb_4bit_use_double_quant=record.double_quant, llm_int8_skip_modules=skip)


def fused_cpu_kernel() -> bool:
    """True when bnb's Linear4bit uses its fused bf16 CPU kernel on this machine (AVX512-BF16)."""
    return bool(bnb.functional.has_avx512bf16())


def _head_name(model: nn.Module) -> str | None:
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if head is None:
        return None
    return next((n for n, m in model.named_modules() if m is head), None)


def _kept_reason(name: str, module: nn.Module, spec: QuantSpec, head: str | None, has_original: bool) -> str | None:
    if spec.bits == 32:
        return KEPT_PLAN
    if isinstance(module, nn.Embedding):
        return KEPT_EMBEDDING
    if name == head:
        return KEPT_HEAD
    if spec.bits not in (4, 8):
        return KEPT_WIDTH
    if isinstance(module, bnb.nn.Linear8bitLt | bnb.nn.Linear4bit):
        raise UserError(f"{name} is already a bitsandbytes layer: map the float model once")
    if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
        return None
    if has_original and hasattr(module, "in_features") and hasattr(module, "out_features"):
        return None  # e.g. our QuantLinear, rebuilt from the caller's float weight
    if hasattr(module, "packed"):
        raise UserError(f"{name} holds our packed codes, which bitsandbytes cannot load: map the float model, or "
                        "pass its float weights as original_weights")
    return KEPT_NOT_LINEAR


def _float_weight(name: str, module: nn.Module, original: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The [out, in] float weight (the caller's original if given) and bias of a Linear or GPT-2 Conv1D."""
    from compress.quantize.apply import weight_matrix

    if original is not None:
        shape = (module.out_features, module.in_features) if hasattr(module, "in_features") else None
        weight = original.detach()
        if shape is not None and tuple(weight.shape) != shape:
            raise UserError(f"original_weights[{name}] has shape {tuple(weight.shape)}, the layer needs {shape}")
    else:
        weight = weight_matrix(module).detach()
    if not weight.is_floating_point():
        raise UserError(f"{name}: bitsandbytes needs a float weight, got {weight.dtype}")
    return weight.contiguous(), getattr(module, "bias", None)


def _make_8bit(weight: torch.Tensor, bias: torch.Tensor | None, threshold: float) -> BnbLinear8bit:
    out_f, in_f = weight.shape
    new = BnbLinear8bit(in_f, out_f, bias=bias is not None, has_fp16_weights=False, threshold=threshold,
                        device="meta")
    new.weight = bnb.nn.Int8Params(weight.clone(), requires_grad=False, has_fp16_weights=False)
    new.weight._quantize(weight.device)  # int8 per-row absmax (bnb casts to fp16 first)
    new.stored = new.weight.data.numel() + new.weight.SCB.numel() * new.weight.SCB.element_size()
    _copy_bias(new, bias)
    return new


def _make_nf4(weight: torch.Tensor, bias: torch.Tensor | None, blocksize: int, nested: bool) -> BnbLinear4bit:
    out_f, in_f = weight.shape
    new = BnbLinear4bit(in_f, out_f, bias=bias is not None, compute_dtype=weight.dtype, compress_statistics=nested,
                        quant_type="nf4", device="meta")
    new.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, blocksize=blocksize,
                                   compress_statistics=nested, quant_type="nf4", module=new)
    new.weight._quantize(weight.device)  # sets new.weight.quant_state and new.quant_state
    new.saved_state = {k: v.clone() for k, v in new.weight.quant_state.as_dict(packed=True).items()}
    new.stored = new.weight.data.numel() * new.weight.data.element_size() + sum(
        t.numel() * t.element_size() for t in new.saved_state.values())
    _copy_bias(new, bias)
    return new


def _copy_bias(new: nn.Module, bias: torch.Tensor | None) -> None:
    if bias is not None:
        new.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)


def _notes(record: BnbRecord, specs: dict[str, QuantSpec], blocks_fallback: set[int], unfused: list[str],
           threshold: float, double_quant: bool, fused_cpu: bool) -> None:
    mapped = [specs[n] for n in record.mapped]
    record.notes.append("bitsandbytes quantized the float weights itself (int8 absmax per row, nf4 absmax per "
                        "block); the plan's method and symmetry do not apply")
    if any(s.method != "rtn" or not s.symmetric for s in mapped):
        asked = ", ".join(sorted({s.label() for s in mapped}))
        record.notes.append(f"plan asked for {asked}: bnb used its own absmax quantization instead")
    if record.bits.get(8):
        outliers = "LLM.int8() fp16 outlier columns" if threshold else "no outlier decomposition"
        record.notes.append(f"8-bit: Linear8bitLt, threshold {threshold} ({outliers}); the group size does not "
                            "apply (one scale per row); activations are quantized to int8 per token on the fly")
    if blocks_fallback:
        record.notes.append(f"4-bit groups {sorted(blocks_fallback)} are not bnb block sizes {BLOCKSIZES}: used "
                            f"{DEFAULT_BLOCKSIZE}")
    if record.bits.get(4):
        record.notes.append("4-bit: nf4" + (" with nested (8-bit) absmax" if double_quant else ", fp32 absmax"))
        if fused_cpu_kernel() and fused_cpu:
            record.notes.append("4-bit on this CPU: bnb's fused kernel computes in bf16 (weights repacked at the "
                                "first eval forward)")
        if unfused:
            record.notes.append(f"{len(unfused)} 4-bit layers use bnb's slower dequantize + fp32 path (shape not "
                                f"supported by the fused CPU kernel: out % {CPU_PACK_N} or in % block != 0)")
    kept = Counter(record.kept.values())
    for reason, n in kept.items():
        record.notes.append(f"{n} layer(s) {reason}")


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
