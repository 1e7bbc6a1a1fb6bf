"""GGUF export of llama-family decoders for llama.cpp: an artifact's quantized matrices become Q4_0/Q5_0/Q8_0 blocks
built from its own codes and fp16 scales (other specs take the nearest writable type), floats F16 (or `float_type`),
norms F32; attn_q/attn_k rows are permuted to llama.cpp's rotary layout. Every matrix written is dequantized again
and compared with the artifact's weight, so the report says which tensors are exact.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType
from torch import nn

from compress.atomic import atomic_file
from compress.errors import UserError
from compress.models.hf import LoadedModel
from compress.outputs import signature
from compress.quantize.modules import PackedWeight, QuantEmbedding, QuantLinear, TiedQuantHead
from exporters.gguf_blocks import BLOCK, QUANT_TYPES, WRITABLE, Encoded, dequantize, encode_packed, quantize_float
from exporters.gguf_vocab import add_tokenizer

ARCH = "llama"
LAYER_MATRICES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                  "mlp.up_proj", "mlp.down_proj")
LAYER_NORMS = ("input_layernorm", "post_attention_layernorm")
FILE_TYPES = {T.F32: LlamaFileType.ALL_F32, T.F16: LlamaFileType.MOSTLY_F16, T.BF16: LlamaFileType.MOSTLY_BF16,
              T.Q4_0: LlamaFileType.MOSTLY_Q4_0, T.Q4_1: LlamaFileType.MOSTLY_Q4_1, T.Q5_0: LlamaFileType.MOSTLY_Q5_0,
              T.Q5_1: LlamaFileType.MOSTLY_Q5_1, T.Q8_0: LlamaFileType.MOSTLY_Q8_0, T.Q2_K: LlamaFileType.MOSTLY_Q2_K,
              T.Q3_K: LlamaFileType.MOSTLY_Q3_K_M, T.Q4_K: LlamaFileType.MOSTLY_Q4_K_M,
              T.Q5_K: LlamaFileType.MOSTLY_Q5_K_M, T.Q6_K: LlamaFileType.MOSTLY_Q6_K}


@dataclass
class TensorRow:
    """One tensor written: its GGUF and HF names, the spec it had, the type used, and how close it came out."""

    name: str
    source: str
    spec: str  # plan label (q4g32s, fp16, fp32), "float" for matrices outside a plan, "norm"
    type: str
    shape: list[int]  # [rows, cols] as in HF ([out, in])
    exact: bool
    max_abs_err: float
    how: str  # codes | requantized | float | quantized
    planned: bool = False
    note: str = ""


@dataclass
class GgufReport:
    """What export_gguf wrote: per-tensor rows, file size, bits per weight, exact/approximated counts."""

    out_path: str
    file_bytes: int
    params: int
    bpw: float
    file_type: str
    tokenizer: str
    seconds: float
    tensors: list[TensorRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def n_exact(self) -> int:
        """Tensors whose written values equal the source weights bit for bit."""
        return sum(r.exact for r in self.tensors)

    @property
    def n_approximated(self) -> int:
        """Tensors written with some error (requantized, rounded to fp16, ...)."""
        return len(self.tensors) - self.n_exact

    @property
    def approximated_plan_entries(self) -> list[TensorRow]:
        """Plan entries of the artifact that could not be represented exactly."""
        return [r for r in self.tensors if r.planned and not r.exact]

    def approximation_note(self) -> str:
        """One line naming the plan entries that are not exact ('' when all are)."""
        rows = self.approximated_plan_entries
        if not rows:
            return ""
        shown = ", ".join(f"{r.source} ({r.spec} → {r.type} {r.how}, max |Δ| {r.max_abs_err:.2g})" for r in rows[:3])
        more = f" and {len(rows) - 3} more" if len(rows) > 3 else ""
        return f"{len(rows)} plan entries could not be represented exactly: {shown}{more}"

    def to_dict(self) -> dict:
        """JSON-ready dict (with the counts)."""
        return {**asdict(self), "n_exact": self.n_exact, "n_approximated": self.n_approximated,
                "approximation_note": self.approximation_note()}


def export_gguf(model: LoadedModel | str | Path, out_path: Path | str, *, float_type: str = "F16",
                tokenizer_gguf: Path | str | None = None) -> GgufReport:
    """Write `model` (an artifact, an HF model directory or a LoadedModel) to `out_path` as a llama.cpp GGUF.

    `float_type` is the type of matrices held in float (all of them in a plain model): F16, F32, BF16, Q8_0, Q5_1,
    Q5_0, Q4_1 or Q4_0. Tokenizer fields are copied from `tokenizer_gguf` (default: the model's source GGUF, if any)
    when its tokens match the HF tokenizer's, else built from the HF tokenizer.
    """
    t0 = time.perf_counter()
    ftype = _float_type(float_type)
    out = Path(out_path)
    if out.is_dir():
        raise UserError(f"{out_path} is a directory: pass the path of the .gguf file to write")
    loaded = model if isinstance(model, LoadedModel) else _load(model)
    config = loaded.module.config
    _check_config(config, loaded.spec)
    rows, arrays = _encode_all(loaded, ftype)
    file_type = _file_type(rows)
    source = Path(tokenizer_gguf).expanduser() if tokenizer_gguf else _source_gguf(loaded)
    if tokenizer_gguf and not source.is_file():
        raise UserError(f"tokenizer GGUF {tokenizer_gguf} not found: pass an existing .gguf file")
    with atomic_file(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), ARCH)
        try:
            _add_metadata(writer, config, loaded.spec, FILE_TYPES[file_type])
            tok = add_tokenizer(writer, loaded.tokenizer, config, int(config.vocab_size), source)
            for row, (data, qtype) in zip(rows, arrays, strict=True):
                writer.add_tensor(row.name, data, raw_dtype=None if qtype in (T.F32, T.F16) else qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return _report(out, rows, file_type, tok, t0)


def export_gguf_streaming(lazy, out_path: Path | str, *, float_type: str = "F16",
                          tokenizer_gguf: Path | str | None = None, progress=None) -> GgufReport:
    """export_gguf for a compress.stream LazyModel: the tensor table is laid out first from the shapes and specs,
    then each block is read, encoded, written and freed, so memory holds one block (and the embedding table while
    it is written) instead of the model. The bytes are those export_gguf writes for the same model."""
    t0 = time.perf_counter()
    ftype = _float_type(float_type)
    out = Path(out_path)
    if out.is_dir():
        raise UserError(f"{out_path} is a directory: pass the path of the .gguf file to write")
    loaded, model = lazy.loaded, lazy.model
    config = model.config
    _check_config(config, loaded.spec)
    lazy.load_trunk()
    tied = _is_tied(model)
    lazy.drop_trunk()
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    order = _source_names(config, tied)
    layout = [_planned_tensor(names, hf, lazy, ftype) for hf in order]
    file_type = _file_type([TensorRow(n, hf, "", q.name, shape, True, 0.0, "") for n, hf, shape, q, _, _ in layout])
    source = Path(tokenizer_gguf).expanduser() if tokenizer_gguf else _source_gguf(loaded)
    if tokenizer_gguf and not source.is_file():
        raise UserError(f"tokenizer GGUF {tokenizer_gguf} not found: pass an existing .gguf file")
    heads = _heads(config)
    planned = set(lazy.specs)
    rows: list[TensorRow] = []
    task = progress.add_task("gguf blocks", total=len(order)) if progress is not None else None
    with atomic_file(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), ARCH)
        try:
            _add_metadata(writer, config, loaded.spec, FILE_TYPES[file_type])
            tok = add_tokenizer(writer, loaded.tokenizer, config, int(config.vocab_size), source)
            for name, _hf, _shape, qtype, byte_shape, dtype in layout:
                nbytes = int(np.prod(byte_shape)) * np.dtype(dtype).itemsize
                writer.add_tensor_info(name, byte_shape, np.dtype(dtype), nbytes,
                                       raw_dtype=None if qtype in (T.F32, T.F16) else qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            loaded_part: str | None = None
            for name, hf, _shape, qtype, _bs, _dt in layout:
                part = _part_of(hf, lazy.lmap.blocks_path)
                if part != loaded_part:
                    _swap_part(lazy, loaded_part, part)
                    loaded_part = part
                row, data, got = _encode(name, hf, model.get_submodule(hf), ftype, hf in planned)
                if got != qtype:
                    raise RuntimeError(f"{hf}: encoded as {got.name}, laid out as {qtype.name}")
                n_head = heads.get(name.split(".")[-2])
                writer.write_tensor_data(permute_rows(data, n_head) if n_head else data)
                rows.append(row)
                if progress is not None:
                    progress.advance(task)
            _swap_part(lazy, loaded_part, None)
        finally:
            writer.close()
    return _report(out, rows, file_type, tok, t0)


def _source_names(config, tied: bool) -> list[str]:
    """The HF module names written, in file order (what `_sources` lists, without the modules)."""
    out = ["model.embed_tokens"]
    for i in range(config.num_hidden_layers):
        out += [f"model.layers.{i}.{part}" for part in LAYER_NORMS[:1] + LAYER_MATRICES + LAYER_NORMS[1:]]
    out.append("model.norm")
    return out if tied else [*out, "lm_head"]


def _planned_tensor(names, hf: str, lazy, ftype: T) -> tuple:
    """(llama.cpp name, HF name, shape, type, stored shape, stored dtype) of one tensor, from the skeleton's shape
    and the artifact's spec, before any weight is read."""
    from exporters.gguf_blocks import type_for

    name = names.get_name(f"{hf}.weight", try_suffixes=(".weight",))
    if name is None:
        raise UserError(f"{lazy.loaded.spec}: no llama.cpp tensor name for {hf}")
    module = lazy.model.get_submodule(hf)
    packed = _packed(module)
    shape = [packed.rows, packed.cols] if packed is not None else list(module.weight.shape)
    if len(shape) == 1:
        return name, hf, shape, T.F32, shape, np.float32
    spec = lazy.specs.get(hf)
    if spec is not None and not spec.is_float:
        qtype = type_for(spec.for_width(shape[1]))
    else:
        qtype = _encode_float(np.zeros((1, shape[1]), np.float32), ftype).qtype
    if qtype in (T.F32, T.F16):
        return name, hf, shape, qtype, shape, np.float32 if qtype == T.F32 else np.float16
    return name, hf, shape, qtype, list(gguf.quant_shape_to_byte_shape(shape, qtype)), np.uint8


def _part_of(hf: str, blocks_path: str) -> str:
    """'block N' for a module of block N, 'trunk' for the embedding, final norm and head."""
    if hf.startswith(blocks_path + "."):
        return "block " + hf[len(blocks_path) + 1:].split(".")[0]
    return "trunk"


def _swap_part(lazy, old: str | None, new: str | None) -> None:
    """Drop the part in memory and read the next one."""
    for part, load in ((old, False), (new, True)):
        if part is None:
            continue
        if part == "trunk":
            lazy.load_trunk(keep_storage=False) if load else lazy.drop_trunk()
        else:
            i = int(part.split()[1])
            lazy.load_block(i) if load else lazy.drop_block(i)


def permute_rows(x: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (convert_hf_to_gguf LlamaModel.permute): within each head, the two rotary halves
    are interleaved. Rows only, so the blocks along the input axis move whole."""
    rows = x.shape[0]
    idx = np.arange(rows).reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(-1)
    return x[idx]


def unpermute_rows(x: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of permute_rows."""
    rows = x.shape[0]
    idx = np.arange(rows).reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(-1)
    out = np.empty_like(x)
    out[idx] = x
    return out


# ---------------------------------------------------------------------------------------------------- tensors
def _encode_all(loaded: LoadedModel, ftype: T) -> tuple[list[TensorRow], list[tuple[np.ndarray, T]]]:
    """Rows and (data, type) of every tensor, in file order."""
    model, config = loaded.module, loaded.module.config
    planned = set((loaded.extra.get("manifest") or {}).get("modules", {}))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    sources = _sources(model, config)
    _check_covered(model, [s for s, _ in sources])
    heads = _heads(config)
    rows, arrays = [], []
    for hf, module in sources:
        name = names.get_name(f"{hf}.weight", try_suffixes=(".weight",))
        if name is None:
            raise UserError(f"{loaded.spec}: no llama.cpp tensor name for {hf}")
        row, data, qtype = _encode(name, hf, module, ftype, hf in planned)
        n_head = heads.get(name.split(".")[-2])
        if n_head:
            data = permute_rows(data, n_head)
        rows.append(row)
        arrays.append((data, qtype))
    return rows, arrays


def _sources(model: nn.Module, config) -> list[tuple[str, nn.Module]]:
    """(HF module name, module) of every tensor to write; the LM head only when it is not tied to the embedding."""
    return [(name, model.get_submodule(name)) for name in _source_names(config, _is_tied(model))]


def _heads(config) -> dict[str, int]:
    """Heads of the tensors whose rows llama.cpp permutes (attn_q, attn_k)."""
    return {"attn_q": config.num_attention_heads,
            "attn_k": getattr(config, "num_key_value_heads", None) or config.num_attention_heads}


def _report(out: Path, rows: list[TensorRow], file_type: T, tok, t0: float) -> GgufReport:
    """The GgufReport of a written file."""
    size = out.stat().st_size
    params = sum(int(np.prod(r.shape)) for r in rows)
    notes = [f"{r.source}: {r.note}" for r in rows if r.note]
    return GgufReport(str(out), size, params, round(size * 8 / params, 4), file_type.name, tok,
                      round(time.perf_counter() - t0, 2), rows, notes)


def _is_tied(model: nn.Module) -> bool:
    head, emb = model.get_submodule("lm_head"), model.get_submodule("model.embed_tokens")
    if isinstance(head, TiedQuantHead):
        return True
    return isinstance(emb, nn.Embedding) and getattr(head, "weight", None) is emb.weight


def _check_covered(model: nn.Module, sources: list[str]) -> None:
    """UserError naming a stored tensor (e.g. a bias) that has no place in the llama layout written."""
    covered = set(sources)
    for key in model.state_dict():
        owner = key.rsplit(".", 1)[0].removesuffix(".packed")
        if owner not in covered and owner != "lm_head":
            raise UserError(f"{key}: the llama GGUF layout written here has no place for this tensor; export a "
                            "llama model without biases or extra weights")
        if key.endswith(".bias") and owner in covered:
            raise UserError(f"{key}: biases are not exported to GGUF; use a llama model without biases")


def _encode(name: str, hf: str, module: nn.Module, ftype: T, planned: bool) -> tuple[TensorRow, np.ndarray, T]:
    """Encode one module's weight and check it against the weight it stands for."""
    packed = _packed(module)
    if packed is not None:
        enc = encode_packed(packed)
        ref, spec = enc.reference, packed.spec.label()
    else:
        w = module.weight.detach()
        ref = w.float().numpy()
        if ref.ndim == 1:  # norms: always F32
            row = TensorRow(name, hf, "norm", "F32", [ref.shape[0]], True, 0.0, "float", planned)
            return row, np.ascontiguousarray(ref), T.F32
        spec = {torch.float16: "fp16", torch.float32: "fp32"}.get(w.dtype, str(w.dtype)) if planned else "float"
        enc = _encode_float(ref, ftype)
    back = dequantize(enc.data, enc.qtype, ref.shape[1])
    exact = bool(np.array_equal(back, ref))
    err = 0.0 if exact else float(np.abs(back - ref).max())
    row = TensorRow(name, hf, spec, enc.qtype.name, list(ref.shape), exact, err, enc.how, planned, enc.note)
    return row, enc.data, enc.qtype


def _packed(module: nn.Module) -> PackedWeight | None:
    if isinstance(module, QuantLinear | QuantEmbedding):
        return module.packed
    return None


def _encode_float(w: np.ndarray, ftype: T) -> Encoded:
    """A float matrix in `ftype`; block types fall back to F16 when the row is not a whole number of blocks."""
    if ftype in QUANT_TYPES.values():
        if w.shape[1] % BLOCK:
            return Encoded(w.astype(np.float16), T.F16, "float", f"{w.shape[1]} columns are not blocks of {BLOCK}")
        return Encoded(quantize_float(w, ftype), ftype, "quantized")
    return Encoded(quantize_float(w, ftype), ftype, "float")


# --------------------------------------------------------------------------------------------------- metadata
def _add_metadata(writer: gguf.GGUFWriter, config, spec: str, file_type: LlamaFileType) -> None:
    n_head = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    writer.add_name(Path(str(spec)).name or "model")
    writer.add_string("general.quantized_by", signature())  # early in the header: how --gguf knows a file is ours
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(n_head))
    writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or n_head))
    writer.add_rope_freq_base(float(getattr(config, "rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_dimension_count(int(head_dim))
    if head_dim * n_head != config.hidden_size:
        writer.add_key_length(int(head_dim))
        writer.add_value_length(int(head_dim))
    scaling = getattr(config, "rope_scaling", None)
    if scaling:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _check_config(config, spec: str) -> None:
    """UserError when the model is not a llama decoder llama.cpp's llama graph runs as written."""
    if config.model_type != ARCH:
        raise UserError(f"{spec}: model type '{config.model_type}' — GGUF export supports llama decoders only")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise UserError(f"{spec}: hidden_act '{config.hidden_act}' — llama.cpp's llama graph uses silu")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise UserError(f"{spec}: attention/MLP biases are not exported to GGUF; use a llama model without biases")
    scaling = getattr(config, "rope_scaling", None)
    if scaling and (scaling.get("rope_type") or scaling.get("type")) != "linear":
        kind = scaling.get("rope_type") or scaling.get("type")
        raise UserError(f"{spec}: rope_scaling '{kind}' is not exported to GGUF (only linear); use a model without it")


def _float_type(name: str) -> T:
    try:
        return WRITABLE[name.upper()]
    except KeyError:
        raise UserError(f"float type {name}: use one of {', '.join(WRITABLE)}") from None


def _file_type(rows: list[TensorRow]) -> T:
    """The type holding most matrix parameters (general.file_type)."""
    count: dict[str, int] = {}
    for r in rows:
        if len(r.shape) == 2:
            count[r.type] = count.get(r.type, 0) + int(np.prod(r.shape))
    return T[max(count, key=count.get)] if count else T.F32


def _load(spec: Path | str) -> LoadedModel:
    from compress.models import load_model

    return load_model(str(Path(spec).expanduser()) if Path(str(spec)).expanduser().exists() else str(spec))


def _source_gguf(loaded: LoadedModel) -> Path | None:
    """The GGUF a model was converted from, when it sits beside it (zoo models keep it in source/)."""
    from compress.models import zoo

    if str(loaded.spec).endswith(".gguf") and Path(loaded.spec).expanduser().is_file():
        return Path(loaded.spec).expanduser()
    dirs = [loaded.path] if loaded.path else []
    base = (loaded.extra.get("manifest") or {}).get("base")
    if base:
        if base in zoo.ZOO:
            dirs.append(zoo.model_dir(base))
        elif str(base).endswith(".gguf") and Path(base).expanduser().is_file():
            return Path(base).expanduser()
        else:
            dirs.append(Path(base).expanduser())
    for d in dirs:
        found = sorted(Path(d).glob("source/*.gguf")) if Path(d).is_dir() else []
        if found:
            return found[0]
    return None
