"""The tokenizer.* fields of a GGUF for llama.cpp: a byte-level BPE ("gpt2") vocabulary from the HF tokenizer, or
copied from a source GGUF whose token list is the same."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import gguf
from gguf import GGUFValueType, TokenType

from compress.errors import UserError

PREFIX = "tokenizer."


def token_list(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens by id and their llama.cpp types (ids the tokenizer lacks become unused `[PADi]` entries)."""
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer: Any, config: Any, vocab_size: int,
                  source: Path | None = None) -> str:
    """Write the tokenizer fields; returns where they came from (the source GGUF when its tokens match)."""
    if tokenizer is None:
        raise UserError("the model has no tokenizer beside its weights, and llama.cpp needs one: save the "
                        "tokenizer into the model directory (tokenizer.save_pretrained)")
    tokens, types = token_list(tokenizer, vocab_size)
    if source is not None and _copy_from(writer, source, tokens):
        return f"copied from {source}"
    origin = "HF tokenizer" if source is None else f"HF tokenizer ({source} lists other tokens)"
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        config.to_json_file(str(Path(tmp) / "config.json"))
        tj = Path(tmp) / "tokenizer.json"
        if not tj.is_file():
            raise UserError("the tokenizer has no tokenizer.json (a slow tokenizer): llama.cpp's BPE needs the fast "
                            "tokenizer's vocabulary and merges; save the model with a fast tokenizer")
        spec = json.loads(tj.read_text(encoding="utf-8"))
        if spec.get("model", {}).get("type") != "BPE" or not _has_byte_level(spec.get("pre_tokenizer")):
            raise UserError("only byte-level BPE tokenizers (GPT-2 style, llama.cpp tokenizer model 'gpt2') are "
                            "exported; this tokenizer is not one")
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre_type(spec.get("pre_tokenizer")))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        log = logging.getLogger("gguf.vocab")
        level = log.level
        log.setLevel(logging.ERROR)  # its TemplateProcessing heuristics warn about harmless templates
        try:
            gguf.SpecialVocab(tmp, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)
        finally:
            log.setLevel(level)
    return origin


def pre_type(pre: dict | None) -> str:
    """llama.cpp's pre-tokenizer name for a tokenizer.json pre_tokenizer: GPT-2's regex, SmolLM's (digits split
    one by one first), else 'default'."""
    if _is_gpt2_regex(pre):
        return "gpt-2"
    if pre and pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers", [])
        if (len(parts) == 2 and parts[0].get("type") == "Digits" and parts[0].get("individual_digits")
                and _is_gpt2_regex(parts[1])):
            return "smollm"
    return "default"


def _is_gpt2_regex(pre: dict | None) -> bool:
    return bool(pre) and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)


def _has_byte_level(pre: dict | None) -> bool:
    if not pre:
        return False
    return pre.get("type") == "ByteLevel" or any(_has_byte_level(p) for p in pre.get("pretokenizers", []))


def _copy_from(writer: gguf.GGUFWriter, source: Path, tokens: list[str]) -> bool:
    """Copy every tokenizer.* field of `source` when its token list equals `tokens`; False (nothing written) else."""
    reader = gguf.GGUFReader(str(source))
    fields = {k: f for k, f in reader.fields.items() if k.startswith(PREFIX)}
    listed = fields.get(f"{PREFIX}ggml.tokens")
    if listed is None or listed.contents() != tokens:
        return False
    for key, field in fields.items():
        main = field.types[0]
        sub = field.types[-1] if main == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), main, sub_type=sub)
    return True
