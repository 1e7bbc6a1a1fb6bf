"""Synthesize a Llama of about 3 B parameters (random weights from a fixed seed, bf16 safetensors shards, ~6 GB)
to measure what streaming does with a model larger than the memory a verb may use. Never committed.

    python benchmarks/make_big_model.py [--out ~/.cache/compress/bench/llama-3b-synth] [--layers 28]

The shape is Llama-3.2-3B's (hidden 3072, 24 heads of 128, 8 KV heads, FFN 8192, tied embedding) with SmolLM2's
tokenizer and vocabulary (49,152), so the project's text data tokenizes as for SmolLM2. Each tensor is drawn from
its own generator (seed + crc32 of its name): the same file whatever the order or the machine. Memory: one
block (~200 MB) at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import zlib
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
DEFAULT_OUT = Path("~/.cache/compress/bench/llama-3b-synth").expanduser()
SHAPE = dict(hidden_size=3072, intermediate_size=8192, num_attention_heads=24, num_key_value_heads=8, head_dim=128,
             vocab_size=49152, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
             tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2, initializer_range=0.02)


def tensor(name: str, shape: tuple[int, ...], seed: int, std: float) -> torch.Tensor:
    """A bf16 tensor of N(0, std²) from the generator of (seed, name); norms are ones."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return (torch.randn(shape, generator=g) * std).to(torch.bfloat16)


def block_shapes(i: int, c: dict) -> dict[str, tuple[int, ...]]:
    h, f, kv = c["hidden_size"], c["intermediate_size"], c["num_key_value_heads"] * c["head_dim"]
    p = f"model.layers.{i}."
    return {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h), p + "mlp.down_proj.weight": (h, f)}


def make(out: Path, layers: int, seed: int) -> Path:
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    from compress.models import zoo

    out.mkdir(parents=True, exist_ok=True)
    c = {**SHAPE, "num_hidden_layers": layers}
    config = LlamaConfig(**c, architectures=["LlamaForCausalLM"], dtype="bfloat16")
    config.save_pretrained(out)
    AutoTokenizer.from_pretrained(zoo.pull("smollm2-135m")).save_pretrained(out)
    groups = [block_shapes(i, c) for i in range(layers)]
    groups.append({"model.embed_tokens.weight": (c["vocab_size"], c["hidden_size"]), "model.norm.weight":
                   (c["hidden_size"],)})
    n, weight_map, total = len(groups), {}, 0
    for k, shapes in enumerate(groups, start=1):
        name = f"model-{k:05d}-of-{n:05d}.safetensors"
        state = {t: tensor(t, s, seed, c["initializer_range"]) for t, s in shapes.items()}
        save_file(state, str(out / name), metadata={"format": "pt"})
        total += sum(v.numel() * 2 for v in state.values())
        weight_map.update(dict.fromkeys(state, name))
        print(f"{name}: {sum(v.numel() for v in state.values()) / 1e6:.1f} M parameters", flush=True)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    print(f"{out}: {total / 2 / 1e9:.2f} B parameters, {total / 1e9:.2f} GB bf16")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    make(args.out.expanduser(), args.layers, args.seed)


if __name__ == "__main__":
    main()
