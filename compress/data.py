"""Calibration and evaluation data: text files, directories, globs or the model's own samples, cut into
fixed-length token windows with a seeded split so calibration and evaluation never overlap."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from compress.errors import UserError
from compress.inputs import SPLITS, resolve_text_files, split_sources  # noqa: F401  (data specs are checked there)
from compress.models.hf import LoadedModel
from compress.progress import phase

DEFAULT_TOKENS = 2048


@dataclass
class Windows:
    """Token windows [n, seq_len] of one split, with where they came from and a hash of their tokens."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    split: str
    source: str
    seed: int

    @property
    def num_tokens(self) -> int:
        """Tokens in all windows."""
        return int(self.attention_mask.sum())

    @property
    def seq_len(self) -> int:
        """Tokens per window."""
        return int(self.input_ids.shape[1])

    @property
    def data_hash(self) -> str:
        """sha256 of the token ids: two runs on the same windows share it."""
        return hashlib.sha256(self.input_ids.to(torch.int64).numpy().tobytes()).hexdigest()

    def describe(self) -> dict:
        """Provenance for reports."""
        return {"source": self.source, "split": self.split, "seed": self.seed, "windows": len(self.input_ids),
                "seq_len": self.seq_len, "tokens": self.num_tokens, "sha256": self.data_hash}


def default_seq_len(loaded: LoadedModel) -> int:
    """512 tokens for decoders; 256 for encoders (their training length), capped by position embeddings."""
    limit = getattr(loaded.module.config, "max_position_embeddings", None) or 512
    return min(512 if loaded.kind == "decoder" else 256, limit)


def load_windows(
    spec: str | None,
    loaded: LoadedModel,
    *,
    split: str = "calibration",
    tokens: int = DEFAULT_TOKENS,
    seq_len: int | None = None,
    seed: int = 0,
    sequential: bool = False,
) -> Windows:
    """Windows for `spec` (a text file, directory, glob or "self", or several of them comma-separated, mixed in
    equal shares by `mix_equal`, each split on its own); `sequential` keeps document order, no split."""
    if split not in SPLITS:
        raise UserError(f"unknown split '{split}': use one of {', '.join(SPLITS)}")
    if tokens <= 0:
        raise UserError(f"--tokens {tokens}: must be a positive number of tokens")
    if loaded.kind not in ("decoder", "encoder"):
        raise UserError(f"{loaded.spec} is a {loaded.kind} model: text windows need a language model (this verb "
                        "does not support image models yet)")
    seq_len = seq_len or default_seq_len(loaded)
    n_windows = max(1, tokens // seq_len)
    if spec is None:
        if not loaded.can_generate:
            raise UserError(f"{loaded.spec} is an encoder and cannot generate its own data: pass --data "
                            "(a text file, a directory or a glob of text files)")
        spec = "self"
    sources = split_sources(spec)
    if len(sources) == 1 and sources[0] == "self":
        ids = _self_windows(loaded, n_windows, seq_len, seed, split)
        return Windows(ids, torch.ones_like(ids), split, "self", seed)
    share = -(-n_windows // len(sources))  # what a model-sampled source is asked for
    per_source = [_source_windows(src, loaded, seq_len, seed, split, sequential, share) for src in sources]
    ids = torch.stack(mix_equal(per_source)[:n_windows])
    return Windows(ids, torch.ones_like(ids), split if not sequential else "all", spec, seed)


def mix_equal(per_source: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Windows of several sources, one from each in turn: every source gets an equal share of any prefix, and a
    source that runs out leaves its turns to the others (so a long novel does not drown a short text)."""
    mixed = []
    for k in range(max(map(len, per_source), default=0)):
        mixed.extend(ws[k] for ws in per_source if k < len(ws))
    return mixed


def _self_windows(loaded: LoadedModel, n: int, seq_len: int, seed: int, split: str) -> torch.Tensor:
    if not loaded.can_generate:
        raise UserError(f"--data self: {loaded.spec} is an encoder and cannot generate text; pass --data "
                        "a text file, a directory or a glob of text files")
    return sample_self(loaded, n, seq_len, seed + (1 if split == "evaluation" else 0))


def _source_windows(src: str, loaded: LoadedModel, seq_len: int, seed: int, split: str, sequential: bool,
                    share: int) -> list[torch.Tensor]:
    """One source's windows of `split`: its files cut in order, then (unless `sequential`) shuffled with `seed`
    and halved, the first half calibration, the second evaluation; 'self' samples `share` windows."""
    if src == "self":
        return list(_self_windows(loaded, share, seq_len, seed, split))
    if loaded.tokenizer is None:
        raise UserError(f"{loaded.spec} has no tokenizer beside its weights: text data cannot be tokenized")
    windows = []
    for f in resolve_text_files(src):
        windows.extend(_cut(_tokenize(loaded, f.read_text(encoding="utf-8", errors="replace")), loaded, seq_len))
    if not windows:
        raise UserError(f"--data {src}: too short for one window of {seq_len} tokens; give more text or a "
                        "smaller --seq-len")
    order = list(range(len(windows)))
    if not sequential:
        order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed)).tolist()
        if split != "all":
            if len(order) < 2:
                raise UserError(f"--data {src}: only one window of {seq_len} tokens, too little to split into "
                                "calibration and evaluation; give more text or a smaller --seq-len")
            half = len(order) // 2
            order = order[:half] if split == "calibration" else order[half:]
    return [windows[i] for i in order]


def _tokenize(loaded: LoadedModel, text: str) -> list[int]:
    """Decoders: the tokenizer's own convention (BOS if it adds one). Encoders: no specials (added per window)."""
    tok = loaded.tokenizer
    add_special = loaded.kind == "decoder"
    return tok(text, add_special_tokens=add_special, verbose=False)["input_ids"]


def _cut(ids: list[int], loaded: LoadedModel, seq_len: int) -> list[torch.Tensor]:
    """Consecutive non-overlapping windows; encoder windows get [CLS] ... [SEP] around seq_len-2 tokens."""
    tok = loaded.tokenizer
    if loaded.kind == "encoder" and tok.cls_token_id is not None and tok.sep_token_id is not None:
        body = seq_len - 2
        return [torch.tensor([tok.cls_token_id, *ids[s:s + body], tok.sep_token_id])
                for s in range(0, len(ids) - body + 1, body)]
    return [torch.tensor(ids[s:s + seq_len]) for s in range(0, len(ids) - seq_len + 1, seq_len)]


@torch.inference_mode()
def load_split(spec: str | None, loaded: LoadedModel, calibration_tokens: int, evaluation_tokens: int,
               seq_len: int | None = None, seed: int = 0) -> tuple[Windows, Windows]:
    """Calibration and evaluation windows together; self-sampling draws both in one batched generation (about
    half the time of two), rows split between the two, so they never overlap."""
    if spec not in (None, "self") or not loaded.can_generate:
        return (load_windows(spec, loaded, split="calibration", tokens=calibration_tokens, seq_len=seq_len,
                             seed=seed),
                load_windows(spec, loaded, split="evaluation", tokens=evaluation_tokens, seq_len=seq_len, seed=seed))
    for t in (calibration_tokens, evaluation_tokens):
        if t <= 0:
            raise UserError(f"--tokens {t}: must be a positive number of tokens")
    seq_len = seq_len or default_seq_len(loaded)
    n_cal, n_eval = max(1, calibration_tokens // seq_len), max(1, evaluation_tokens // seq_len)
    ids = sample_self(loaded, n_cal + n_eval, seq_len, seed, batch=min(n_cal + n_eval, 16))
    cal, ev = ids[:n_cal], ids[n_cal:]
    return (Windows(cal, torch.ones_like(cal), "calibration", "self", seed),
            Windows(ev, torch.ones_like(ev), "evaluation", "self", seed))


@torch.inference_mode()
def _sample_batch(model, bos: int, b: int, seq_len: int, gen: torch.Generator, top_p: float = 0.95) -> torch.Tensor:
    """Nucleus sampling with the KV cache, written out: a plain loop is about twice as fast on CPU as
    `generate`, whose per-step bookkeeping dominates at batch sizes this small."""
    ids = torch.full((b, 1), bos, dtype=torch.long)
    out = model(input_ids=ids, use_cache=True)
    tokens = [ids]
    for _ in range(seq_len - 1):
        probs = torch.softmax(out.logits[:, -1].float(), dim=-1)
        p_sorted, order = probs.sort(dim=-1, descending=True)
        p_sorted = p_sorted * ((p_sorted.cumsum(-1) - p_sorted) < top_p)  # the nucleus: mass before < top_p
        nxt = order.gather(-1, torch.multinomial(p_sorted, 1, generator=gen))
        tokens.append(nxt)
        out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
    return torch.cat(tokens, dim=1)


def sample_self(loaded: LoadedModel, n: int, seq_len: int, seed: int, batch: int = 8) -> torch.Tensor:
    """Sample `n` sequences of `seq_len` tokens from the model itself (temperature 1, top-p 0.95), seeded."""
    model, tok = loaded.module, loaded.tokenizer
    bos = getattr(tok, "bos_token_id", None) if tok is not None else None
    if bos is None:
        bos = getattr(model.config, "bos_token_id", None)
    if bos is None:
        raise UserError(f"--data self: {loaded.spec} has no BOS token to start sampling from; pass --data")
    gen = torch.Generator().manual_seed(seed)
    out = []
    with phase("sample text", total=n) as advance:  # minutes on a real model: --data FILE skips it
        for start in range(0, n, batch):
            out.append(_sample_batch(model, bos, min(batch, n - start), seq_len, gen))
            advance(len(out[-1]))
    return torch.cat(out)
