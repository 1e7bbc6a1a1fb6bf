"""GGUF export for llama.cpp on tiny random llamas: names, types, shapes and metadata; blocks bit-exact from the
artifact's codes; the q/k row permutation; approximations reported; atomic output; and llama.cpp itself running the
file (the real check of names, permutation and metadata)."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tiny_models import quantized_artifact

import exporters.gguf as eg
from compress.errors import UserError
from compress.models.hf import LoadedModel
from compress.quantize.modules import PackedWeight
from compress.quantize.rtn import quantize_rtn
from compress.quantize.spec import QuantSpec
from exporters.gguf import export_gguf, permute_rows, unpermute_rows
from exporters.gguf_blocks import type_for, unpack_codes
from exporters.ort_quant import codes_of, dequantized_copy

needs_llamacpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                    reason="llama-cpp-python not installed (pip install 'compress[llamacpp]')")
TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
        "want of a wife. However little known the feelings or views of such a man may be on his first entering.")
VOCAB = 320
# sym 4/5/8 g32 (exact by type), exact in a wider type (3, 6, g64, per channel, asym 2 and 6), approximated
MENU = [QuantSpec(4), QuantSpec(5), QuantSpec(8), QuantSpec(3), QuantSpec(6), QuantSpec(4, 64), QuantSpec(2, 32, False),
        QuantSpec(4, 32, False), QuantSpec(5, 32, False), QuantSpec(4, 16), QuantSpec(4, 32, False, "hqq"),
        QuantSpec(8, 32, False), QuantSpec(6, 32, False), QuantSpec(4, 0)]
EXACT_BY_TYPE = {"q4g32s": "Q4_0", "q5g32s": "Q5_0", "q8g32s": "Q8_0"}


def _tokenizer():
    """A byte-level BPE trained on one sentence: a real GPT-2-style tokenizer llama.cpp can load."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT] * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _tiny(tokenizer, tied: bool = True, family: str = "llama", hidden: int = 64) -> LoadedModel:
    """2 layers, hidden 64 (or `hidden`), 4 heads (2 KV heads); weights large enough that a wrong layout shows in
    logits."""
    import transformers as tf

    torch.manual_seed(0)
    cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config}[family]
    cfg = cls(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
              num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2, bos_token_id=1,
              eos_token_id=2, pad_token_id=0, tie_word_embeddings=tied)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    return LoadedModel(model, tokenizer, "decoder", family, f"tiny-{family}")


def _artifact(tmp: Path, loaded: LoadedModel, menu: list[QuantSpec], embedding: QuantSpec | None) -> LoadedModel:
    """`menu` cycled over the block Linears (and `embedding` on the tied embedding), saved and loaded back."""
    copied = LoadedModel(copy.deepcopy(loaded.module), loaded.tokenizer, "decoder", "llama", loaded.spec)
    return quantized_artifact(copied, tmp, menu, embedding)


@pytest.fixture(scope="module")
def tok():
    return _tokenizer()


@pytest.fixture(scope="module")
def float_model(tok):
    return _tiny(tok)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, float_model):
    tmp = tmp_path_factory.mktemp("gguf_mixed")
    art = _artifact(tmp / "art", float_model, MENU, QuantSpec(8))
    report = export_gguf(art, tmp / "mixed.gguf")
    return art, report, tmp / "mixed.gguf"


@pytest.fixture(scope="module")
def exact(tmp_path_factory, float_model):
    tmp = tmp_path_factory.mktemp("gguf_exact")
    art = _artifact(tmp / "art", float_model, [QuantSpec(4), QuantSpec(5), QuantSpec(8)], QuantSpec(4))
    report = export_gguf(art, tmp / "exact.gguf")
    return art, report, tmp / "exact.gguf"


def _weight_of(art: LoadedModel, hf_name: str) -> np.ndarray:
    return art.module.get_submodule(hf_name).packed.dequantize().numpy()


def _field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def test_reader_sees_llama_names_types_shapes_and_metadata(mixed):
    art, report, path = mixed
    reader = gguf.GGUFReader(str(path))
    names = [t.name for t in reader.tensors]
    per_block = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "ffn_norm"]
    blocks = [f"blk.{i}.{p}.weight" for i in range(2) for p in per_block]
    expected = ["token_embd.weight", *blocks, "output_norm.weight"]
    assert sorted(names) == sorted(expected)  # tied: no output.weight
    specs = art.extra["manifest"]["modules"]
    by_name = {t.name: t for t in reader.tensors}
    for row in report.tensors:
        t = by_name[row.name]
        assert t.tensor_type.name == row.type
        assert list(t.shape[::-1]) == row.shape  # GGUF lists ne0 (the input axis) first
        if row.source in specs:
            assert row.type == type_for(QuantSpec(**specs[row.source])).name
        else:
            assert row.type == "F32" and row.spec == "norm"
    cfg = art.module.config
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "llama.block_count") == 2
    assert _field(reader, "llama.embedding_length") == 64
    assert _field(reader, "llama.feed_forward_length") == 128
    assert _field(reader, "llama.attention.head_count") == 4
    assert _field(reader, "llama.attention.head_count_kv") == 2
    assert _field(reader, "llama.rope.dimension_count") == 16
    assert _field(reader, "llama.context_length") == 128
    assert _field(reader, "llama.vocab_size") == VOCAB
    assert _field(reader, "llama.rope.freq_base") == pytest.approx(cfg.rope_theta)
    assert _field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.rms_norm_eps)
    assert _field(reader, "general.file_type") == int(gguf.LlamaFileType[f"MOSTLY_{report.file_type}"])
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert _field(reader, "tokenizer.ggml.pre") == "gpt-2"
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == VOCAB and tokens[1] == "<s>" and tokens[-1] == f"[PAD{VOCAB - 1}]"
    assert _field(reader, "tokenizer.ggml.bos_token_id") == 1 and _field(reader, "tokenizer.ggml.eos_token_id") == 2
    assert len(_field(reader, "tokenizer.ggml.merges")) > 0
    assert report.bpw == pytest.approx(report.file_bytes * 8 / report.params, abs=1e-4)
    assert report.file_bytes == path.stat().st_size


def test_exact_tensors_are_bit_exact_after_unpermuting(mixed):
    art, report, path = mixed
    reader = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    heads = {"attn_q": 4, "attn_k": 2}
    exact = [r for r in report.tensors if r.exact and r.spec != "norm"]
    assert {r.spec for r in exact} >= set(EXACT_BY_TYPE) | {"q3g32s", "q6g32s", "q4g64s", "q2g32a", "q6g32a", "q4gchs"}
    for row in exact:
        t = reader[row.name]
        back = gguf.quants.dequantize(t.data, t.tensor_type).reshape(row.shape)
        n = heads.get(row.name.split(".")[-2])
        if n:
            back = unpermute_rows(back, n)
        assert np.array_equal(back, _weight_of(art, row.source)), row.name
        assert row.how == "codes" and row.max_abs_err == 0.0
    for row in report.tensors:
        if row.spec in EXACT_BY_TYPE:
            assert row.exact and row.type == EXACT_BY_TYPE[row.spec]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_unpack_codes_matches_the_generic_unpack(bits):
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(bits))
    p = PackedWeight.from_quantized(quantize_rtn(w, QuantSpec(bits)))
    assert np.array_equal(unpack_codes(p), codes_of(p))


def test_q_k_permutation_matches_llama_cpp_rotary_layout():
    w = np.random.default_rng(0).standard_normal((4 * 16, 8)).astype(np.float32)
    # convert_hf_to_gguf LlamaModel.permute, written out independently
    ref = w.reshape(4, 2, 16 // 2, 8).swapaxes(1, 2).reshape(w.shape)
    assert np.array_equal(permute_rows(w, 4), ref)
    assert np.array_equal(unpermute_rows(permute_rows(w, 4), 4), w)
    # HF rotates (i, i + d/2) within a head; llama.cpp adjacent (2i, 2i + 1)
    p = permute_rows(w, 4)
    assert np.array_equal(p[16 + 2 * 3], w[16 + 3]) and np.array_equal(p[16 + 2 * 3 + 1], w[16 + 3 + 8])


def test_approximated_entries_are_reported(mixed):
    _, report, _ = mixed
    rows = {r.spec: r for r in report.tensors if r.planned}
    assert rows["q4g16s"].how == "requantized" and rows["q4g16s"].type == "Q4_0" and not rows["q4g16s"].exact
    assert "group 16" in rows["q4g16s"].note
    assert rows["q4g32a"].type == "Q4_1" and rows["q5g32a"].type == "Q5_1"
    assert rows["q4g32a-hqq"].type == "Q4_1" and rows["q8g32a"].type == "Q8_0"
    approx = report.approximated_plan_entries
    assert {r.spec for r in approx} == {"q4g16s", "q4g32a", "q5g32a", "q4g32a-hqq", "q8g32a"}
    assert all(0 < r.max_abs_err < 0.1 for r in approx)
    assert report.approximation_note().startswith(f"{len(approx)} plan entries could not be represented exactly: ")
    assert report.n_approximated == len(approx) and report.n_exact == len(report.tensors) - len(approx)


def test_exact_plan_has_nothing_to_report(exact):
    _, report, _ = exact
    assert report.n_approximated == 0 and report.approximation_note() == ""
    assert report.to_dict()["n_exact"] == len(report.tensors)


def test_float_model_types_and_untied_head(tmp_path, tok):
    loaded = _tiny(tok, tied=False)
    report = export_gguf(loaded, tmp_path / "q8.gguf", float_type="Q8_0")
    types = {r.name: r.type for r in report.tensors}
    assert types["output.weight"] == "Q8_0" and types["blk.1.ffn_down.weight"] == "Q8_0"
    assert types["blk.0.attn_norm.weight"] == "F32" and types["output_norm.weight"] == "F32"
    assert report.file_type == "Q8_0" and not report.approximated_plan_entries
    f16 = export_gguf(_tiny(tok), tmp_path / "f16.gguf")
    assert "output.weight" not in {r.name for r in f16.tensors} and f16.file_type == "F16"


def test_tokenizer_fields_copied_from_a_matching_gguf(tmp_path, mixed, float_model):
    _, report, path = mixed
    assert report.tokenizer == "HF tokenizer"
    copied = export_gguf(float_model, tmp_path / "copied.gguf", tokenizer_gguf=path)
    assert copied.tokenizer == f"copied from {path}"
    a, b = gguf.GGUFReader(str(path)), gguf.GGUFReader(str(tmp_path / "copied.gguf"))
    keys = [k for k in a.fields if k.startswith("tokenizer.")]
    assert keys == [k for k in b.fields if k.startswith("tokenizer.")]
    assert all(a.fields[k].contents() == b.fields[k].contents() for k in keys)
    with pytest.raises(UserError, match="not found"):
        export_gguf(float_model, tmp_path / "x.gguf", tokenizer_gguf=tmp_path / "missing.gguf")


def test_output_is_atomic(tmp_path, float_model, monkeypatch):
    out = tmp_path / "model.gguf"
    out.write_bytes(b"old, written by compress")  # an earlier output of ours: it may be replaced, not lost

    def boom(self, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export_gguf(float_model, out)
    assert out.read_bytes() == b"old, written by compress"
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]


def test_bad_input_raises_user_error(tmp_path, tok, float_model):
    with pytest.raises(UserError, match="llama decoders only"):
        export_gguf(_tiny(tok, family="qwen2"), tmp_path / "q.gguf")
    with pytest.raises(UserError, match="float type Q3_K"):
        export_gguf(float_model, tmp_path / "q.gguf", float_type="Q3_K")
    with pytest.raises(UserError, match="is a directory"):
        export_gguf(float_model, tmp_path)
    no_tok = LoadedModel(float_model.module, None, "decoder", "llama", "no-tokenizer")
    with pytest.raises(UserError, match="no tokenizer"):
        export_gguf(no_tok, tmp_path / "q.gguf")
    assert not list(tmp_path.iterdir())


@needs_llamacpp
def test_llamacpp_runs_the_export_like_torch(tmp_path, tok, float_model, exact, monkeypatch):
    from exporters.llamacpp import _open, compare_with_reference, llamacpp_decode_speed

    ids = torch.randint(3, 300, (2, 48), generator=torch.Generator().manual_seed(0))
    export_gguf(float_model, tmp_path / "f32.gguf", float_type="F32")
    f32 = compare_with_reference(tmp_path / "f32.gguf", float_model, ids)
    assert f32.kl_mean < 1e-4 and f32.top1_agreement > 0.95  # llama.cpp's fp16 KV cache: near-ties may flip
    art, _, path = exact
    q = compare_with_reference(path, dequantized_copy(art), ids)
    assert q.kl_mean < 1e-2 and q.top1_agreement > 0.9  # llama.cpp quantizes activations to 8 bits in these matmuls
    monkeypatch.setattr(eg, "permute_rows", lambda x, n: x)
    export_gguf(float_model, tmp_path / "unpermuted.gguf", float_type="F32")
    wrong = compare_with_reference(tmp_path / "unpermuted.gguf", float_model, ids)
    assert wrong.kl_mean > 100 * max(f32.kl_mean, 1e-4)  # the check is sensitive to the layout
    llm = _open(tmp_path / "f32.gguf", n_ctx=64, n_batch=64, logits_all=False, n_threads=2)
    assert llm.tokenize(TEXT.encode(), add_bos=True) == tok(TEXT)["input_ids"]
    assert llamacpp_decode_speed(tmp_path / "f32.gguf", n_tokens=4, warmup=1) > 0


@needs_llamacpp
def test_hf_model_directory_with_its_tokenizer_in_llamacpp(tmp_path, tok):
    """A float decoder saved as an HF directory with its own tokenizer (no source GGUF): the vocabulary is built
    from the HF tokenizer and llama.cpp tokenizes and predicts as torch does."""
    from compress.models import load_model
    from exporters.llamacpp import _open, compare_with_reference

    saved = _tiny(tok)
    saved.module.save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    loaded = load_model(str(tmp_path / "hf"))
    report = export_gguf(loaded, tmp_path / "austen.gguf", float_type="Q8_0")
    assert report.tokenizer == "HF tokenizer" and report.file_type == "Q8_0"
    ids = torch.tensor([loaded.tokenizer(TEXT)["input_ids"]])
    cmp = compare_with_reference(tmp_path / "austen.gguf", loaded, ids)
    assert cmp.kl_mean < 0.01 and cmp.top1_agreement > 0.9
    llm = _open(tmp_path / "austen.gguf", n_ctx=128, n_batch=128, logits_all=False, n_threads=2)
    assert llm.tokenize(TEXT.encode(), add_bos=True) == ids[0].tolist()
