"""Train a small fp32 Llama-style decoder on Austen (persuasion.txt held out): a model with truly float weights.

SmolLM2's weights lie on a 4-bit grid (dequantized from Q4_1), so quantization conclusions drawn on it alone can
mislead; this model is the float check. Deterministic for a seed (single process, fixed data order).

    python benchmarks/train_tiny_lm.py --out ~/.cache/compress/models/tiny-austen-lm [--steps 1200]
    python benchmarks/train_tiny_lm.py --moe --out ~/.cache/compress/models/tiny-austen-moe

`--moe` trains a Mixtral-style model (8 experts, top-2) with the auxiliary balance loss turned low
(`--aux-coef`, default 0.001) so that real load imbalance remains for the MoE tools to work on.

Writes an HF model directory (config, safetensors, tokenizer) atomically, plus train_log.json.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
AUSTEN = REPO.parent / "shared" / "data" / "text" / "austen"
HELD_OUT = "persuasion.txt"


def train_tokenizer(texts: list[str], vocab: int):
    """Byte-level BPE trained on the training novels only."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=AUSTEN)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default); 1 is faster on a "
                                                             "busy machine")
    ap.add_argument("--moe", action="store_true", help="Mixtral-style sparse MoE FFNs instead of dense ones")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--expert-ffn", type=int, default=384, help="hidden width of one expert")
    ap.add_argument("--aux-coef", type=float, default=0.001, help="router load-balance loss weight (kept low)")
    a = ap.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    from compress.atomic import atomic_dir

    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    files = sorted(p for p in a.data.glob("*.txt") if p.name != HELD_OUT)
    texts = [p.read_text(encoding="utf-8") for p in files]
    tokenizer = train_tokenizer(texts, a.vocab)
    ids = torch.tensor([t for text in texts for t in tokenizer(text)["input_ids"]])
    n = (len(ids) - 1) // a.seq_len
    windows = ids[: n * a.seq_len].reshape(n, a.seq_len)
    ffn = int(a.hidden * 8 / 3) // 64 * 64
    common = dict(vocab_size=len(tokenizer), hidden_size=a.hidden, num_hidden_layers=a.layers,
                  num_attention_heads=a.hidden // 64, num_key_value_heads=2, max_position_embeddings=1024,
                  tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0, rms_norm_eps=1e-5)
    if a.moe:
        config = MixtralConfig(**common, intermediate_size=a.expert_ffn, num_local_experts=a.experts,
                               num_experts_per_tok=a.top_k, router_aux_loss_coef=a.aux_coef,
                               output_router_logits=True, sliding_window=None)
        model = MixtralForCausalLM(config)
    else:
        model = LlamaForCausalLM(LlamaConfig(**common, intermediate_size=ffn))
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warm = max(1, a.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / a.steps))))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(a.seed))
    log, t0 = [], time.perf_counter()
    model.train()
    for step in range(a.steps):
        idx = order[(torch.arange(a.batch) + step * a.batch) % n]
        batch = windows[idx]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == a.steps - 1:
            log.append({"step": step, "loss": round(loss.item(), 4), "seconds": round(time.perf_counter() - t0, 1)})
            print(log[-1], flush=True)
    model.eval()
    model.config.output_router_logits = False  # inference default; training needed it for the balance loss
    with atomic_dir(a.out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "train_log.json").write_text(json.dumps({
            "args": {k: str(v) for k, v in vars(a).items()}, "train_files": [f.name for f in files],
            "train_tokens": int(ids.numel()), "params": sum(p.numel() for p in model.parameters()),
            "epochs": round(a.steps * a.batch / n, 3), "log": log}, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
