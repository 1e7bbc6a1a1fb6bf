"""A model whose weights stay on disk: the skeleton is built on the meta device (accelerate's `init_empty_weights`,
buffers real), and each block's tensors are read from the safetensors files when it is worked on and dropped after.

The block stack is run from recorded call arguments: one forward of the trunk with every block replaced by a
recorder gives block 0's input and the arguments (masks, rotary tables) each block is called with, exactly as the
whole model would call it. Hidden states then flow block to block in the compute dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from compress.models.hf import LoadedModel
from compress.models.layers import LayerMap
from compress.models.runner import _split_hidden, hidden_of
from compress.quantize.modules import TABLE_ROWS
from compress.stream.checkpoint import Checkpoint


@dataclass
class Calls:
    """What the block stack receives for one batch of windows: block 0's input and each block's other arguments."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    hidden: torch.Tensor
    args: list[tuple[tuple, dict]] = field(default_factory=list)


class _Stop(Exception):
    """Raised by the last recorder: the rest of the forward (final norm, head) is not needed."""


class _Recorder(nn.Module):
    """Stands in for block `index` during the capture forward: records its arguments, passes the hidden on."""

    def __init__(self, index: int, last: bool, calls: Calls, block: nn.Module | None = None):
        super().__init__()
        self.index, self.last, self.calls = index, last, calls
        self._block = [block]  # in a list: not registered as a submodule

    def __getattr__(self, name: str):
        """Attributes the model reads off its blocks (Qwen3's and Gemma's `attention_type`) come from the block."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            block = self.__dict__.get("_block", [None])[0]
            if block is None:
                raise
            return getattr(block, name)

    def forward(self, *args, **kwargs):
        hidden, rest_args, rest_kwargs = _split_hidden(args, kwargs)
        if self.index == 0:
            self.calls.hidden = hidden.detach()
        rest_kwargs = dict(rest_kwargs)
        for k in ("past_key_values", "past_key_value", "layer_past"):
            rest_kwargs.pop(k, None)
        if "use_cache" in rest_kwargs:
            rest_kwargs["use_cache"] = False
        self.calls.args.append((rest_args, rest_kwargs))
        if self.last:
            raise _Stop
        return hidden


class _Grab(_Recorder):
    """Stands in for block 0: keeps its input with the autograd graph that made it, then stops the forward."""

    hidden: torch.Tensor

    def __init__(self, block: nn.Module):
        super().__init__(0, True, Calls(torch.empty(0), torch.empty(0), torch.empty(0)), block)

    def forward(self, *args, **kwargs):
        self.hidden = _split_hidden(args, kwargs)[0]
        raise _Stop


class LazyModel:
    """A LoadedModel on the meta device plus the checkpoint its tensors come from; blocks are loaded one at a time."""

    def __init__(self, loaded: LoadedModel, lmap: LayerMap, checkpoint: Checkpoint | None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.loaded, self.lmap, self.checkpoint, self.dtype = loaded, lmap, checkpoint, dtype
        self.device = torch.device(device)
        self.model = loaded.module
        self.blocks = self.model.get_submodule(lmap.blocks_path)
        self.specs: dict = {}  # a packed artifact's module specs, applied block by block as they are loaded
        self._swapped: set[str] = set()

    @classmethod
    def resident(cls, loaded: LoadedModel, lmap: LayerMap) -> LazyModel:
        """A model already whole in memory, run through the same block-by-block code (loading and dropping do
        nothing), so an algorithm written once gives the same numbers in memory and streamed."""
        p = next(loaded.module.parameters())
        return cls(loaded, lmap, None, p.dtype, p.device)

    @property
    def streamed(self) -> bool:
        """True when the weights come from disk block by block."""
        return self.checkpoint is not None

    # ---- which tensors belong where
    def block_names(self, i: int) -> list[str]:
        """State names of block i as the model now names them (after any module swaps)."""
        prefix = f"{self.lmap.blocks_path}.{i}."
        return [prefix + n for n in _state_names(self.blocks[i])]

    def trunk_names(self) -> list[str]:
        """State names outside the block stack (embeddings, final norm, head; a tied copy once)."""
        prefix = self.lmap.blocks_path + "."
        return [n for n in _state_names(self.model, skip=prefix)]

    # ---- loading and dropping
    def load_block(self, i: int, keep_storage: tuple[str, ...] = ()) -> None:
        """Read block i (its specs applied first when the model is a packed artifact); the tensors named in
        `keep_storage` stay in the checkpoint's dtype (the caller casts them where it uses them)."""
        if not self.streamed:
            return
        self._prepare(f"{self.lmap.blocks_path}.{i}.")
        self._load(self.block_names(i), keep_storage)

    def load_block_narrow(self, i: int) -> None:
        """Block i as load_block reads it, but its Linears' weights kept in the checkpoint's dtype and cast to the
        input's where used: the same outputs, and a bf16 block's Linears at half the bytes (for a pass that only
        runs the block)."""
        if not self.streamed:
            return
        prefix = f"{self.lmap.blocks_path}.{i}."
        self._prepare(prefix)
        linears = [(n, m) for n, m in self.blocks[i].named_modules() if isinstance(m, nn.Linear)]
        self._load(self.block_names(i), tuple(f"{prefix}{n}.weight" for n, _ in linears))
        for _, m in linears:
            m.forward = lambda x, m=m: linear_cast(x, m.weight, m.bias)

    def drop_block(self, i: int) -> None:
        """Free every tensor of block i (including ones a transform put there)."""
        if not self.streamed:
            return
        for m in self.blocks[i].modules():
            m.__dict__.pop("forward", None)  # load_block_narrow's cast
        self.blocks[i].to("meta")
        release_freed_memory()

    def load_trunk(self, keep_storage: bool = True) -> None:
        """Read the tensors outside the stack; with `keep_storage`, the embedding and head tables stay in the
        checkpoint's dtype (looked up, or multiplied 8,192 rows at a time), the rest in the compute dtype."""
        if not self.streamed:
            return
        self._prepare(None)
        self._load(self.trunk_names(), self.big_tables() if keep_storage else ())
        self._tie()

    def drop_trunk(self) -> None:
        """Free the tensors outside the stack."""
        from accelerate.utils import set_module_tensor_to_device

        if not self.streamed:
            return
        for n in self.trunk_names():
            set_module_tensor_to_device(self.model, n, "meta")
        self._tie()
        release_freed_memory()

    def _tie(self) -> None:
        """Tie the head to the embedding again (replacing a tensor unties them), unless the codes are shared."""
        tied = getattr(self.model.config, "tie_word_embeddings", False) and hasattr(self.model, "tie_weights")
        if tied and self.lmap.embeddings not in self.specs and self.lmap.embeddings not in self._quantized():
            self.model.tie_weights()

    def _quantized(self) -> set[str]:
        from compress.quantize.modules import QuantEmbedding

        emb = self.model.get_submodule(self.lmap.embeddings) if self.lmap.embeddings else None
        return {self.lmap.embeddings} if isinstance(emb, QuantEmbedding) else set()

    def _prepare(self, prefix: str | None) -> None:
        """Swap in the packed modules of the artifact's specs under `prefix` (None: outside the stack), once."""
        from compress.quantize.apply import apply_plan

        stack = self.lmap.blocks_path + "."
        mine = {n: s for n, s in self.specs.items() if n not in self._swapped
                and (n.startswith(prefix) if prefix else not n.startswith(stack))}
        if mine:
            apply_plan(self.model, self.lmap, mine, empty=True)
            self._swapped.update(mine)

    def _load(self, names: list[str], keep_storage: tuple[str, ...] = ()) -> None:
        """Read `names` one tensor at a time (so only one is ever held in both dtypes) and set them in place."""
        from accelerate.utils import set_module_tensor_to_device

        for n in names:
            t = self.checkpoint.read([n])[n]
            current = _tensor(self.model, n)
            if t.is_floating_point() and current.is_floating_point() and n not in keep_storage:
                t = t.to(self.dtype if current.dtype == torch.float32 else current.dtype)  # fp32: the skeleton's
            set_module_tensor_to_device(self.model, n, self.device, value=t, dtype=t.dtype)  # no cast: chosen above
        release_freed_memory()

    # ---- running
    def big_tables(self) -> tuple[str, ...]:
        """The embedding and head weights: kept in the checkpoint's dtype while loaded (they are looked up or
        multiplied chunk by chunk), everything else is computed in the compute dtype."""
        names = set(self.trunk_names())
        return tuple(f"{m}.weight" for m in (self.lmap.embeddings, self.lmap.head) if m and f"{m}.weight" in names)

    def capture(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Calls:
        """Block 0's input and every block's call arguments for one batch (the trunk must be loaded)."""
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        calls = Calls(input_ids, attention_mask, torch.empty(0))
        n = len(self.blocks)
        originals = list(self.blocks)
        embed = self.model.get_submodule(self.lmap.embeddings) if self.lmap.embeddings else None
        cast = embed.register_forward_hook(lambda m, a, out: out.to(self.dtype)) if embed is not None else None
        for i in range(n):
            self.blocks[i] = _Recorder(i, i == n - 1, calls, originals[i])
        try:
            base = getattr(self.model, "base_model", self.model)
            with torch.inference_mode():
                if self.loaded.kind == "decoder":
                    base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
                else:
                    base(input_ids=input_ids, attention_mask=attention_mask)
        except _Stop:
            pass
        finally:
            for i, blk in enumerate(originals):
                self.blocks[i] = blk
            if cast is not None:
                cast.remove()
        if len(calls.args) != n:
            raise RuntimeError(f"recorded {len(calls.args)} block calls for {n} blocks: the stack is not called "
                               "once per block in order")
        calls.hidden = calls.hidden.to(self.dtype)
        return calls

    def embedding_grad(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       d_hidden: torch.Tensor) -> torch.Tensor:
        """The gradient at the embedding's output given the gradient at block 0's input: the trunk's path between
        them (scaling, position embeddings) run again with autograd, stopped at block 0 (the trunk must be loaded)."""
        embed = self.model.get_submodule(self.lmap.embeddings)
        leaf: list[torch.Tensor] = []

        def as_leaf(module, args, out):
            leaf.append(out.detach().to(self.dtype).requires_grad_(True))
            return leaf[0]

        original = self.blocks[0]
        grab = _Grab(original)
        self.blocks[0] = grab
        hook = embed.register_forward_hook(as_leaf)
        try:
            with torch.enable_grad():
                base = getattr(self.model, "base_model", self.model)
                base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _Stop:
            pass
        finally:
            self.blocks[0] = original
            hook.remove()
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(grab.hidden, leaf[0], d_hidden)
        return grad

    def run_block(self, i: int, calls: Calls, hidden: torch.Tensor) -> torch.Tensor:
        """Block i (loaded) applied to `hidden` with the arguments the whole model would pass it."""
        rest_args, rest_kwargs = calls.args[i]
        return hidden_of(self.blocks[i](hidden, *rest_args, **rest_kwargs))

    def final_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """The final norm (if the family has one) applied to the last block's output."""
        if self.lmap.final_norm:
            return self.model.get_submodule(self.lmap.final_norm)(hidden)
        return hidden

    def logits(self, normed: torch.Tensor, rows: int = TABLE_ROWS) -> torch.Tensor:
        """LM-head logits; a quantized head, or a float one stored in a narrower dtype, is multiplied TABLE_ROWS
        vocabulary rows at a time, so no fp32 copy of the whole head is made."""
        head = self.model.get_submodule(self.lmap.head)
        packed = _packed_table(head)  # quantized: dequantized a slice at a time, never the whole table in fp32
        if packed is not None or (isinstance(head, nn.Linear) and head.weight.dtype != normed.dtype):
            n = packed.rows if packed is not None else head.weight.shape[0]
            table = packed.dequantize_rows if packed is not None else lambda s, e: head.weight[s:e]
            out = torch.cat([normed @ table(s, min(s + rows, n)).to(normed.dtype).T for s in range(0, n, rows)],
                            dim=-1)
            if getattr(head, "bias", None) is not None:
                out = out + head.bias.to(normed.dtype)
        else:
            out = head(normed)
        cap = self.lmap.logit_softcap
        return torch.tanh(out / cap) * cap if cap else out


def _packed_table(head: nn.Module):
    """The PackedWeight of a quantized LM head (its own codes, or the embedding's it is tied to), else None."""
    from compress.quantize.modules import QuantLinear, TiedQuantHead

    if isinstance(head, QuantLinear):
        return head.packed
    if isinstance(head, TiedQuantHead):
        return head._embedding[0].packed
    return None


_MMAP_SET = False


def release_freed_memory() -> None:
    """Hand freed memory back to the system (glibc): tensors of 1 MiB and more are mapped on their own and unmapped
    when freed, and the heap is trimmed. Without it, blocks that come and go leave the process holding the peak."""
    global _MMAP_SET
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        if not _MMAP_SET:
            libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
            _MMAP_SET = True
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        _MMAP_SET = True


def linear_cast(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool = False
                ) -> torch.Tensor:
    """x Wᵀ + b with W (stored [out, in], or [in, out] when `transposed`, as Conv1D) and b cast to x's dtype."""
    w = (weight.t() if transposed else weight).to(x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


def open_lazy(path: Path, spec: str, dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu") -> LazyModel:
    """The model of an HF directory (or a packed artifact) with safetensors weights, built on the meta device;
    nothing is read yet. Blocks are loaded onto `device` and computed there."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    from compress.integrity import check_before_use
    from compress.models.hf import check_remote_code, load_tokenizer, model_class, quiet_transformers, wrap
    from compress.models.layers import layer_map

    quiet_transformers()
    release_freed_memory()
    path = Path(path)
    check_before_use(path)  # an output this tool wrote must match its file records
    checkpoint = Checkpoint(path)
    remote = check_remote_code(path, spec)
    config = AutoConfig.from_pretrained(path, trust_remote_code=remote)
    with init_empty_weights(include_buffers=False):
        model = model_class(config, spec).from_config(config, dtype=torch.float32, trust_remote_code=remote)
    model.eval()
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    loaded = wrap(model, load_tokenizer(path), spec, path)
    lazy = LazyModel(loaded, layer_map(model), checkpoint, dtype, device)
    _buffers_to(model, lazy.device)
    manifest = _manifest(path)
    if manifest is not None:
        lazy.specs = _packed_specs(path, manifest)
        loaded.kind, loaded.pooling = manifest.get("kind", loaded.kind), manifest.get("pooling", loaded.pooling)
        loaded.extra["manifest"] = manifest
    return lazy


def _buffers_to(model: nn.Module, device: torch.device) -> None:
    """The skeleton's real buffers (rotary tables, position ids) onto the compute device; meta ones stay."""
    if device.type == "cpu":
        return
    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.device.type != "meta":
                module._buffers[name] = buf.to(device)


def _manifest(path: Path) -> dict | None:
    import json

    from compress.artifact import MANIFEST

    f = Path(path) / MANIFEST
    return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else None


def _packed_specs(path: Path, manifest: dict) -> dict:
    """The module specs of a packed (quantized) artifact; other artifact formats change structure and are read
    whole instead."""
    from compress.artifact import FORMAT
    from compress.artifact_formats import STRUCTURE
    from compress.errors import UserError
    from compress.quantize.spec import QuantSpec

    if manifest.get("format") != FORMAT or any(k in manifest for k in STRUCTURE):
        raise UserError(f"{path}: a {manifest.get('format')} artifact cannot be streamed (only quantized artifacts "
                        "of unchanged structure can); pass --stream off")
    return {n: QuantSpec(**d) for n, d in manifest["modules"].items()}


def _state_names(model: nn.Module, skip: str | None = None) -> list[str]:
    """Persistent state names (but those starting with `skip`), a tensor shared under two names (tied head)
    listed once, by its first name."""
    seen: set[int] = set()
    out = []
    for name, t in model.state_dict(keep_vars=True).items():
        if (skip and name.startswith(skip)) or id(t) in seen:
            continue
        seen.add(id(t))
        out.append(name)
    return out


def _tensor(model: nn.Module, name: str) -> torch.Tensor:
    owner, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(owner) if owner else model, attr)
