"""Write a quantized artifact in the compressed-tensors `pack-quantized` format (vLLM / llm-compressor), which
transformers loads natively: `AutoModelForCausalLM.from_pretrained(dir)` with `quantization_config` in config.json.

The artifact's own codes are carried over exactly, never re-rounded. compressed-tensors stores signed codes
q ∈ [−2^(B−1), 2^(B−1)−1] of a B-bit container as `weight_packed` (int32, low bits first), fp16 `weight_scale`
[rows, groups] ([rows, 1] per channel), int64 `weight_shape`, and for asymmetric schemes `weight_zero_point`
(signed, packed the same way along the rows); it dequantizes w = (q − zp) × scale. Our codes are unsigned
c ∈ [0, 2^b): symmetric w = (c − 2^(b−1)) × s (s may be negative, the Q4_0 rule; the formula has no sign
condition), asymmetric w = (c − z) × s with an integer z. So symmetric: q = c − 2^(b−1), no zero point; asymmetric
"packed": q = c − 2^(B−1), zp = z − 2^(B−1); asymmetric "fold": a symmetric code q = c − z in the smallest
container holding every q of the layer. Each is the same weight to the bit.

compressed-tensors ≥ 0.18 cannot load packed zero points through transformers 4.57 (its meta-device compress
skips packing them: "size mismatch for weight_zero_point"), and it packs 3/5/6/7-bit codes densely across words
where ≤ 0.17 puts 32 // B codes in each word; hence the asymmetric modes and the container sets below.
"""

from __future__ import annotations

import copy
import re
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from compress.atomic import atomic_dir
from compress.errors import UserError
from compress.quantize.modules import PackedWeight, QuantEmbedding, QuantLinear, TiedQuantHead
from compress.quantize.packing import unpack

FORMAT = "pack-quantized"
# Container widths allowed per set; a layer goes into the smallest one that holds its codes exactly.
# "portable": 32 % B == 0, the same int32 layout in every compressed-tensors release; "native": any width (its
# layout is that of the installed release); "vllm": the 4- and 8-bit containers of vLLM's WNA16 kernels.
CONTAINERS = {"portable": (2, 4, 8), "native": (2, 3, 4, 5, 6, 7, 8), "vllm": (4, 8)}
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # vLLM fuses these and wants one scheme


def write_compressed_tensors(loaded, out_dir: Path, containers: str = "portable", asymmetric: str = "auto",
                             embedding: str = "quantized", unsupported: str = "error") -> dict:
    """Write `loaded` (from load_artifact) to `out_dir` as a compressed-tensors checkpoint; return what was written.

    asymmetric: "packed" (zero points), "fold" (symmetric codes c − z) or "auto" (packed where the installed
    compressed-tensors can load it, ≤ 0.17). embedding: "quantized" or "float". unsupported="float" writes layers
    the format cannot hold exactly (hqq float zero points, non-Linear modules) dequantized instead of refusing.
    """
    ct = _compressed_tensors()
    _choice("containers", containers, CONTAINERS)
    _choice("asymmetric", asymmetric, ("auto", "packed", "fold"))
    _choice("embedding", embedding, ("quantized", "float"))
    _choice("unsupported", unsupported, ("error", "float"))
    notes: list[str] = []
    if asymmetric == "auto":
        asymmetric = "packed" if ct["version"] < (0, 18) else "fold"
    model = loaded.module
    config = copy.deepcopy(model.config)
    kinds = _hf_module_kinds(model, config)
    modules = dict(model.named_modules())
    heads = {id(m._embedding[0]): n for n, m in modules.items() if isinstance(m, TiedQuantHead)}
    allowed = CONTAINERS[containers]

    plans: dict[str, _Plan] = {}  # module name -> how its packed weight is stored
    floats: dict[str, torch.Tensor] = {}  # module name -> dequantized float weight, as the HF module stores it
    for name, mod in modules.items():
        if not isinstance(mod, (QuantLinear, QuantEmbedding)):
            continue
        pw, head = mod.packed, heads.get(id(mod))
        reason = _unsupported(kinds.get(name), pw)
        if head is not None and reason is None and kinds.get(head) != "linear":
            reason = f"its tied head {head} is not an nn.Linear in transformers"
        if reason is None and isinstance(mod, QuantEmbedding) and embedding == "float":
            reason = "embedding='float'"
        if reason is None:
            try:
                plan = _plan(pw, allowed, asymmetric)
            except UserError as exc:
                raise UserError(f"{name}: {exc}") from None
            plans[name] = plan
            if head is not None:
                plans[head] = plan  # compressed-tensors has no tied packed weights: the same codes twice
                notes.append(f"{head} was tied to {name}: untied (tie_word_embeddings=false), the same "
                             f"{pw.spec.label()} codes stored twice")
            continue
        if unsupported == "error" and reason != "embedding='float'":
            raise UserError(f"{name}: {pw.spec.label()} cannot be written as compressed-tensors: {reason}; "
                            "pass unsupported='float' to write it dequantized, or requantize that layer")
        w = pw.dequantize()
        if kinds.get(name) == "conv1d":
            w = w.t()
        w = w.half() if torch.equal(w.half().float(), w) else w  # fp16 only when exact
        floats[name] = w.contiguous()
        notes.append(f"{name}: {pw.spec.label()} written dequantized as {str(w.dtype).removeprefix('torch.')} "
                     f"({reason})" + (f"; {head} stays tied to it" if head is not None else ""))
    if any(h in plans for h in heads.values()):
        config.tie_word_embeddings = False
    if any(p.folded for p in plans.values()):
        why = (f"compressed-tensors {ct['text']} cannot load packed zero points in transformers; ≤ 0.17.1 can, "
               "with asymmetric='packed'") if ct["version"] >= (0, 18) else "asymmetric='fold'"
        notes.append(f"asymmetric layers folded to exact symmetric codes c − z in the smallest container ({why})")
    if ct["version"] >= (0, 18) and any(p.zp is not None for p in plans.values()):
        notes.append(f"packed zero points: compressed-tensors {ct['text']} in transformers 4.57 cannot load them "
                     "(size mismatch for weight_zero_point); ≤ 0.17.1 and vLLM read them")
    notes += _fused_notes(plans, kinds)

    config_groups, record_groups, widths = _config_groups(plans)
    ignore = sorted(n for n, k in kinds.items() if k == "linear" and n not in plans)
    qcfg = ct["QuantizationConfig"].model_validate({
        "config_groups": config_groups, "format": FORMAT, "quantization_status": "compressed", "ignore": ignore,
        "quant_method": "compressed-tensors"})
    config.quantization_config = {"version": ct["text"], "sparsity_config": {}, "transform_config": {},
                                  **qcfg.model_dump()}

    state = _float_state(model, set(plans) | set(floats))
    q_bytes = 0
    for name, plan in plans.items():
        tensors = plan.tensors(ct["pack"], ct["unpack"], name)
        q_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
        state.update({f"{name}.{k}": v for k, v in tensors.items()})
    for name, w in floats.items():
        state[f"{name}.weight"] = w
    total = sum(t.numel() * t.element_size() for t in state.values())
    from safetensors.torch import save_file

    with atomic_dir(Path(out_dir)) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(tmp)
        file_bytes = (tmp / "model.safetensors").stat().st_size
        dir_bytes = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
    return {"groups": record_groups, "containers": dict(sorted(widths.items())), "dequantized_float": sorted(floats),
            "ignore": ignore, "notes": notes, "file_bytes": file_bytes, "dir_bytes": dir_bytes,
            "quantized_bytes": q_bytes, "float_bytes": total - q_bytes,
            "dequantized_float_bytes": sum(w.numel() * w.element_size() for w in floats.values()),
            "asymmetric": asymmetric, "containers_set": containers, "compressed_tensors": ct["text"]}


class _Plan:
    """One packed weight as stored: signed codes (and zero points) in a `box`-bit container."""

    def __init__(self, pw: PackedWeight, box: int, q: torch.Tensor, zp: torch.Tensor | None, folded: bool):
        self.pw, self.box, self.q, self.zp, self.folded = pw, box, q, zp, folded

    @property
    def key(self) -> tuple[int, int, bool]:
        """(container bits, group size (0 = per channel), symmetric): one config group each."""
        return self.box, self.pw.spec.group_size, self.zp is None

    @property
    def label(self) -> str:
        b = self.pw.spec.bits
        tag = f"{b}a" if not self.pw.spec.symmetric else str(b)
        return tag if (b == self.box and self.pw.spec.symmetric == (self.zp is None)) else \
            f"{tag}→{self.box}{'s' if self.folded else ''}"

    def tensors(self, pack, unpack_ct, name: str) -> dict[str, torch.Tensor]:
        """weight_packed / weight_scale / weight_shape (/ weight_zero_point), checked to unpack to our grid."""
        pw = self.pw
        out = {"weight_packed": pack(self.q, self.box).contiguous(), "weight_scale": pw.scales.clone(),
               "weight_shape": torch.tensor([pw.rows, pw.cols])}
        if not torch.equal(unpack_ct(out["weight_packed"], self.box, torch.Size([pw.rows, pw.cols])), self.q):
            raise RuntimeError(f"{name}: packed codes do not round-trip")
        if self.zp is not None:
            out["weight_zero_point"] = pack(self.zp, self.box, packed_dim=0).contiguous()
            back = unpack_ct(out["weight_zero_point"], self.box, torch.Size(self.zp.shape), packed_dim=0)
            if not torch.equal(back, self.zp):
                raise RuntimeError(f"{name}: packed zero points do not round-trip")
        return out


def _plan(pw: PackedWeight, allowed: tuple[int, ...], asymmetric: str) -> _Plan:
    """Signed codes of `pw` in the smallest allowed container that reproduces its weights exactly."""
    spec = pw.spec
    codes = unpack(pw.qweight, spec.bits, pw.rows * pw.cols).reshape(pw.rows, pw.cols).to(torch.int16)
    if spec.symmetric:
        return _Plan(pw, _box(spec.bits, allowed, spec), (codes - 2 ** (spec.bits - 1)).to(torch.int8), None, False)
    zeros = unpack(pw.zeros, spec.bits, pw.scales.numel()).reshape(pw.scales.shape).to(torch.int16)
    if asymmetric == "packed":
        box = _box(spec.bits, allowed, spec)
        off = 2 ** (box - 1)
        return _Plan(pw, box, (codes - off).to(torch.int8), (zeros - off).to(torch.int8), False)
    groups = pw.scales.shape[1]
    d = codes.reshape(pw.rows, groups, -1) - zeros.unsqueeze(-1)
    lo, hi = int(d.min()), int(d.max())
    need = next((b for b in range(2, 9) if -(2 ** (b - 1)) <= lo and hi < 2 ** (b - 1)), None)
    if need is None:
        raise UserError(f"{spec.label()} folded to symmetric codes c − z spans [{lo}, {hi}], more than 8 bits; "
                        "compressed-tensors ≥ 0.18 cannot load packed zero points in transformers (use "
                        "compressed-tensors ≤ 0.17.1 and asymmetric='packed', or requantize the layer symmetric)")
    return _Plan(pw, _box(need, allowed, spec), d.reshape(pw.rows, pw.cols).to(torch.int8), None, True)


def _box(bits: int, allowed: tuple[int, ...], spec) -> int:
    box = next((b for b in allowed if b >= bits), None)
    if box is None:
        raise UserError(f"{spec.label()} needs {bits}-bit codes, above the containers {allowed}")
    return box


def _config_groups(plans: dict[str, _Plan]) -> tuple[dict, dict, Counter]:
    """config_groups (one per stored bits / group / symmetry, exact module names as targets) and the record."""
    by_key: dict[tuple[int, int, bool], list[str]] = {}
    widths: Counter[str] = Counter()
    for name, plan in plans.items():
        by_key.setdefault(plan.key, []).append(name)
        widths[plan.label] += 1
    config_groups, record = {}, {}
    for i, ((box, g, sym), targets) in enumerate(sorted(by_key.items())):
        strategy = "channel" if g == 0 else "group"
        weights = {"num_bits": box, "type": "int", "symmetric": sym, "strategy": strategy,
                   "group_size": None if g == 0 else g, "dynamic": False, "actorder": None}
        config_groups[f"group_{i}"] = {"targets": targets, "weights": weights, "input_activations": None,
                                       "output_activations": None, "format": FORMAT}
        record[f"group_{i}"] = {"num_bits": box, "strategy": strategy, "group_size": g, "symmetric": sym,
                                "targets": targets}
    return config_groups, record, widths


def _float_state(model: nn.Module, replaced: set[str]) -> dict[str, torch.Tensor]:
    """Every tensor of `model` except the packed ones of `replaced` modules (biases kept), tied ones once."""
    prefixes = tuple(f"{n}." for n in replaced)
    seen, out = set(), {}
    for k, v in model.state_dict().items():
        if k.startswith(prefixes) and not (k.endswith(".bias") and k.rpartition(".")[0] in replaced):
            continue
        if v.numel() and v.data_ptr() in seen:
            continue
        seen.add(v.data_ptr())
        out[k] = v.detach().contiguous()
    return out


def _unsupported(kind: str | None, pw: PackedWeight) -> str | None:
    """Why `pw` cannot be stored exactly as pack-quantized on a module of HF `kind`, or None."""
    if kind not in ("linear", "embedding"):
        return ("compressed-tensors quantizes nn.Linear and nn.Embedding only"
                + (" (this is a GPT-2 Conv1D)" if kind == "conv1d" else ""))
    if not pw.spec.symmetric and pw.spec.method == "hqq":
        return "its zero points are fp16 (hqq); pack-quantized stores integer zero points"
    if pw.spec.kquant:
        return "a K-quant's two-level scales are llama.cpp's (export it with --gguf)"
    return None


def _fused_notes(plans: dict, kinds: dict) -> list[str]:
    """A note when vLLM's fused q/k/v or gate/up projections would get different schemes."""
    mixed = []
    for name in kinds:
        for group in FUSED:
            if name.endswith("." + group[0]):
                base = name[: -len(group[0])]
                members = [base + m for m in group if base + m in kinds]
                if len({plans[m].key if m in plans else None for m in members}) > 1:
                    mixed.append(f"{base}{{{','.join(group)}}}")
    if not mixed:
        return []
    return [f"{len(mixed)} fused projection sets have different schemes (e.g. {mixed[0]}): transformers loads "
            "them, vLLM fuses them and needs one scheme per set"]


def _hf_module_kinds(model: nn.Module, config) -> dict[str, str]:
    """Module name -> 'linear' / 'embedding' / 'conv1d' in the plain transformers model (built on meta)."""
    with torch.device("meta"):
        skeleton = type(model)._from_config(copy.deepcopy(config))
    out = {}
    for n, m in skeleton.named_modules():
        if isinstance(m, nn.Linear):
            out[n] = "linear"
        elif isinstance(m, nn.Embedding):
            out[n] = "embedding"
        elif type(m).__name__ == "Conv1D":
            out[n] = "conv1d"
    return out


def _compressed_tensors() -> dict:
    """The installed compressed-tensors: version and its own int32 packers (whose layout its loader reads)."""
    try:
        import compressed_tensors
        from compressed_tensors.quantization import QuantizationConfig
    except ImportError as exc:
        raise UserError("writing compressed-tensors needs the package: pip install compressed-tensors") from exc
    try:
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
    except ImportError:
        from compressed_tensors.compressors.quantized_compressors.pack_quantized import (
            pack_to_int32,
            unpack_from_int32,
        )
    text = compressed_tensors.__version__
    version = tuple(int(x) for x in re.findall(r"\d+", text)[:2])
    return {"text": text, "version": version, "QuantizationConfig": QuantizationConfig, "pack": pack_to_int32,
            "unpack": unpack_from_int32}


def _choice(what: str, value: str, options) -> None:
    if value not in options:
        raise UserError(f"{what}='{value}': use one of {', '.join(options)}")
