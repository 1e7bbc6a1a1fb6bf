"""A Mixtral-style MoE upcycled from SmolLM2-135M with deliberately skewed routers (issue 20), for checking that
load balancing holds on text it was not fitted on. Never committed; rebuild it with

    python benchmarks/make_skewed_moe.py [--out ~/.cache/compress/bench/smollm2-moe-skewed]

Recipe (seed 0): SmolLM2's attention, norms, embeddings and tokenizer unchanged; every block's MLP copied into 8
experts (gate/up/down → w1/w3/w2), each weight multiplied by (1 + 0.05·N(0, 1)) so the experts differ; top-2
routing. Each layer's router is random, N(0, 1) logits per expert on a typical token, plus a skew along the mean
direction μ of that layer's router input (measured on 4 windows of 512 tokens of the model's own samples, seed 0):
expert 0 gets +`--skew` and expert 1 +`--skew`·0.6 times (μ̂·h)/(mean μ̂·h) — the kind of bias a router learns
toward the average token, which moves when the text's style moves.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

EXPERTS, TOP_K, NOISE = 8, 2, 0.05


def build(base: str, out: Path, skew: float, seed: int = 0) -> Path:
    """Write the skewed MoE as an HF directory (fp32 safetensors + SmolLM2's tokenizer); returns `out`."""
    import transformers as tf

    from compress.atomic import atomic_dir
    from compress.data import sample_self
    from compress.models import load_model

    dense = load_model(base)
    cfg = dense.module.config
    torch.manual_seed(seed)
    probe = sample_self(dense, 4, 512, seed)
    normed = _router_inputs(dense.module, probe)
    mcfg = tf.MixtralConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                            intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
                            num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
                            head_dim=getattr(cfg, "head_dim", None),
                            max_position_embeddings=cfg.max_position_embeddings,
                            rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
                            tie_word_embeddings=cfg.tie_word_embeddings, bos_token_id=cfg.bos_token_id,
                            eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
                            num_local_experts=EXPERTS, num_experts_per_tok=TOP_K, router_jitter_noise=0.0,
                            sliding_window=None)
    moe = tf.MixtralForCausalLM(mcfg).eval()
    state = {k: v for k, v in dense.module.state_dict().items() if ".mlp." not in k}
    missing = moe.load_state_dict(state, strict=False)
    gen = torch.Generator().manual_seed(seed)
    boost = torch.zeros(EXPERTS)
    boost[0], boost[1] = skew, 0.6 * skew
    with torch.no_grad():
        for i, layer in enumerate(moe.model.layers):
            mlp = dense.module.model.layers[i].mlp
            for expert in layer.block_sparse_moe.experts:
                for dst, src in ((expert.w1, mlp.gate_proj), (expert.w3, mlp.up_proj), (expert.w2, mlp.down_proj)):
                    dst.weight.copy_(src.weight * (1 + NOISE * torch.randn(src.weight.shape, generator=gen)))
            h = normed[i]
            mu = h.mean(0)
            mu_hat = mu / mu.norm()
            along = float((h @ mu_hat).mean())
            rand = torch.randn(EXPERTS, h.shape[1], generator=gen)
            rand -= (rand @ mu_hat)[:, None] * mu_hat[None, :]  # no skew of its own: that is the boost's
            rand /= (h @ rand.T).std(0, keepdim=True).T  # N(0, 1) logits per expert on these tokens
            layer.block_sparse_moe.gate.weight.copy_(rand + boost[:, None] * mu_hat[None, :] / along)
    left = [k for k in missing.missing_keys if "block_sparse_moe" not in k and k != "lm_head.weight"]
    if left:
        raise RuntimeError(f"weights not carried over from {base}: {left[:5]}")
    with atomic_dir(out) as tmp:
        moe.save_pretrained(tmp)
        dense.tokenizer.save_pretrained(tmp)
        (tmp / "recipe.json").write_text(json.dumps({"base": base, "experts": EXPERTS, "top_k": TOP_K,
                                                     "noise": NOISE, "skew": skew, "seed": seed}, indent=1))
    return out


@torch.inference_mode()
def _router_inputs(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Per block, the normed hidden states its MLP (the future router) receives, [tokens, hidden]."""
    got: dict[int, torch.Tensor] = {}
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, args, i=i: got.__setitem__(i, args[0].reshape(
        -1, args[0].shape[-1]).float())) for i, layer in enumerate(model.model.layers)]
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return [got[i] for i in range(len(got))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--out", type=Path, default=Path("~/.cache/compress/bench/smollm2-moe-skewed").expanduser())
    ap.add_argument("--skew", type=float, default=3.0, help="logit boost of expert 0 on the average token")
    a = ap.parse_args()
    print(build(a.base, a.out.expanduser(), a.skew))


if __name__ == "__main__":
    main()
