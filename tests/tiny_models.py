"""Tiny random-init models of every supported family, built from their transformers config classes."""

from __future__ import annotations

import torch
from torch import nn

from compress.models.hf import LoadedModel

VOCAB = 64
# a sentence of Pride and Prejudice: the text tiny tokenizers are trained on and tiny tests calibrate on
TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
        "want of a wife. However little known the feelings or views of such a man may be on his first entering a "
        "neighbourhood, this truth is so well fixed in the minds of the surrounding families.")
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128)


def _decoder(config) -> nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config._attn_implementation = "eager"
    return AutoModelForCausalLM.from_config(config).eval()


def build(family: str) -> LoadedModel:
    """A LoadedModel with random weights for `family`; no download."""
    import transformers as tf

    if family == "llama":
        m = _decoder(tf.LlamaConfig(**COMMON))
    elif family == "llama-hd16":  # head_dim 16: what ONNX Runtime's GroupQueryAttention needs at least
        m = _decoder(tf.LlamaConfig(**{**COMMON, "hidden_size": 64}))
    elif family == "qwen2":
        m = _decoder(tf.Qwen2Config(**COMMON))
    elif family == "qwen3":
        m = _decoder(tf.Qwen3Config(**COMMON, head_dim=8))
    elif family == "mistral":
        m = _decoder(tf.MistralConfig(**COMMON))
    elif family == "gemma":
        m = _decoder(tf.GemmaConfig(**COMMON, head_dim=8))
    elif family == "gemma2":
        m = _decoder(tf.Gemma2Config(**COMMON, head_dim=8, final_logit_softcapping=5.0, sliding_window=8))
    elif family == "gemma3_text":
        m = _decoder(tf.Gemma3TextConfig(**COMMON, head_dim=8, sliding_window=8, final_logit_softcapping=5.0))
    elif family == "gpt2":
        m = _decoder(tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=128))
    elif family == "bert":
        torch.manual_seed(0)
        cfg = tf.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=128)
        m = tf.BertModel(cfg).eval()
        return LoadedModel(m, None, "encoder", "bert", f"tiny-{family}")
    else:
        raise ValueError(family)
    return LoadedModel(m, None, "decoder", m.config.model_type, f"tiny-{family}")


def tied(family: str = "llama") -> LoadedModel:
    """`build(family)` with the LM head tied to the embedding."""
    loaded = build(family)
    loaded.module.config.tie_word_embeddings = True
    loaded.module.tie_weights()
    return loaded


def quantized_artifact(loaded: LoadedModel, out, menu: list, embedding=None) -> LoadedModel:
    """`loaded` quantized with the QuantSpecs of `menu` cycled over its Linears (and `embedding` on the embedding),
    saved as an artifact in `out` and loaded back."""
    from compress.artifact import save_artifact
    from compress.artifact_formats import load_artifact
    from compress.models import layer_map
    from compress.quantize.apply import apply_plan, quantizable, weight_matrix
    from compress.quantize.hqq import hqq_quantize
    from compress.quantize.rtn import quantize_rtn

    model = loaded.module
    lmap = layer_map(model)
    names = [n for n in quantizable(model, lmap) if n != lmap.embeddings]
    specs = {n: menu[i % len(menu)] for i, n in enumerate(names)}
    if embedding is not None:
        specs[lmap.embeddings] = embedding
    quantized = {n: (hqq_quantize if s.method == "hqq" else quantize_rtn)(weight_matrix(model.get_submodule(n)), s)
                 for n, s in specs.items() if not s.is_float}
    apply_plan(model, lmap, specs, quantized)
    save_artifact(loaded, specs, out, {"plan": {}})
    return load_artifact(out)


FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text", "gpt2", "bert"]


class ToyBlock(nn.Module):
    """x -> x @ M.T: a rotation, a rescale or the identity, chosen by M."""

    def __init__(self, matrix: torch.Tensor):
        super().__init__()
        self.lin = nn.Linear(matrix.shape[1], matrix.shape[0], bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(matrix)

    def forward(self, hidden_states, **kwargs):
        return self.lin(hidden_states)


class ToyLM(nn.Module):
    """Embedding -> a stack of ToyBlocks -> LM head: known-answer tests for scorers."""

    def __init__(self, matrices: list[torch.Tensor], vocab: int = 16, seed: int = 0):
        super().__init__()
        dim = matrices[0].shape[0]
        g = torch.Generator().manual_seed(seed)
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList([ToyBlock(m) for m in matrices])
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(vocab, dim, generator=g))
            self.lm_head.weight.copy_(torch.randn(vocab, dim, generator=g))

    def get_output_embeddings(self):
        return self.lm_head

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        h = self.embed(input_ids)
        for blk in self.layers:
            h = blk(h)
        return self.lm_head(h)


def rotation(theta: float, dim: int = 2) -> torch.Tensor:
    """Rotation by theta in the plane of the first two axes (identity elsewhere)."""
    import math

    m = torch.eye(dim)
    c, s = math.cos(theta), math.sin(theta)
    m[0, 0], m[0, 1], m[1, 0], m[1, 1] = c, -s, s, c
    return m


def bpe_tokenizer(text: str, vocab_size: int = 300):
    """A byte-level BPE trained on `text`: a real tokenizer that saves beside a model, ids below `vocab_size`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text] * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def hf_dir(path, text: str, dtype=torch.bfloat16, tied: bool = False, layers: int = 3, shard: str | None = None):
    """A tiny llama saved as an HF directory in `dtype` with a BPE tokenizer trained on `text` (optionally in
    safetensors shards of `shard` size, e.g. "40KB"); returns the path."""
    import transformers as tf

    tok = bpe_tokenizer(text)
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         tie_word_embeddings=tied)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval().to(dtype)
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    tok.save_pretrained(path)
    return path
