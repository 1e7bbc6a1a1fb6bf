"""Data windows: files, directories, globs, seeded non-overlapping split, caps and bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import FakeTokenizer

from compress.data import load_windows
from compress.errors import UserError
from compress.models.hf import LoadedModel


def _loaded(kind: str = "decoder") -> LoadedModel:
    module = torch.nn.Linear(1, 1)
    module.config = type("C", (), {"max_position_embeddings": 512})()
    return LoadedModel(module, FakeTokenizer(), kind, "fake", "fake")


def _rows(w) -> set[tuple[int, ...]]:
    return {tuple(r.tolist()) for r in w.input_ids}


@pytest.fixture
def corpus(tmp_path):
    import random

    for i in range(3):
        rng = random.Random(i)
        (tmp_path / f"doc{i}.txt").write_text("".join(rng.choice("abcdefghijklmnopqrstuvwxyz .,") for _ in range(2000)))
    (tmp_path / "ignored.bin").write_bytes(b"\x00" * 10)
    return tmp_path


def test_calibration_and_evaluation_never_overlap_and_are_seeded(corpus):
    lm = _loaded()
    cal = load_windows(str(corpus), lm, split="calibration", tokens=10**6, seq_len=50)
    ev = load_windows(str(corpus), lm, split="evaluation", tokens=10**6, seq_len=50)
    assert cal.input_ids.shape[1] == 50 and len(cal.input_ids) + len(ev.input_ids) == 3 * (2001 // 50)
    assert not _rows(cal) & _rows(ev)
    again = load_windows(str(corpus), lm, split="calibration", tokens=10**6, seq_len=50)
    assert torch.equal(again.input_ids, cal.input_ids) and again.data_hash == cal.data_hash
    other = load_windows(str(corpus), lm, split="calibration", tokens=10**6, seq_len=50, seed=1)
    assert other.data_hash != cal.data_hash


def test_tokens_cap_glob_and_sequential_order(corpus):
    lm = _loaded()
    w = load_windows(str(corpus), lm, tokens=120, seq_len=50)
    assert w.input_ids.shape == (2, 50) and w.num_tokens == 100
    g = load_windows(str(corpus / "doc1*.txt"), lm, split="all", tokens=10**6, seq_len=50, sequential=True)
    first = FakeTokenizer()((corpus / "doc1.txt").read_text())["input_ids"]
    assert g.input_ids[0].tolist() == first[:50] and g.input_ids[0, 0] == FakeTokenizer.bos_token_id
    assert g.input_ids[1].tolist() == first[50:100]


def test_encoder_windows_are_wrapped_in_cls_sep(corpus):
    w = load_windows(str(corpus / "doc0.txt"), _loaded("encoder"), split="all", tokens=10**6, seq_len=20,
                     sequential=True)
    assert (w.input_ids[:, 0] == 2).all() and (w.input_ids[:, -1] == 3).all()


@pytest.mark.parametrize("spec, kind, message", [
    ("missing.txt", "decoder", "no such file"),
    ("self", "encoder", "cannot generate"),
    (None, "encoder", "cannot generate"),
    ("EMPTYDIR", "decoder", "no text files"),
    ("SHORT", "decoder", "too short"),
])
def test_bad_data_is_a_user_error(tmp_path, spec, kind, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "short.txt").write_text("tiny")
    spec = {"EMPTYDIR": str(tmp_path / "empty"), "SHORT": str(tmp_path / "short.txt"),
            "missing.txt": str(tmp_path / "missing.txt")}.get(spec, spec)
    with pytest.raises(UserError, match=message):
        load_windows(spec, _loaded(kind), seq_len=50)


def test_comma_separated_specs(corpus):
    from compress.data import resolve_text_files

    files = resolve_text_files(f"{corpus / 'doc0.txt'},{corpus / 'doc2.txt'}")
    assert [f.name for f in files] == ["doc0.txt", "doc2.txt"]


def test_self_sampled_calibration_and_evaluation_come_from_one_generation_and_differ():
    from tiny_models import build

    from compress.data import load_split

    loaded = build("llama")
    cal, ev = load_split("self", loaded, 48, 64, seq_len=16, seed=3)
    assert cal.input_ids.shape == (3, 16) and ev.input_ids.shape == (4, 16)
    assert (cal.split, ev.split) == ("calibration", "evaluation")
    assert not any(torch.equal(a, b) for a in cal.input_ids for b in ev.input_ids)
    again = load_split("self", loaded, 48, 64, seq_len=16, seed=3)
    assert torch.equal(again[0].input_ids, cal.input_ids)


def _cut_rows(lm, path, seq_len=50) -> set[tuple[int, ...]]:
    from compress.data import _cut, _tokenize

    return {tuple(t.tolist()) for t in _cut(_tokenize(lm, path.read_text()), lm, seq_len)}


def test_several_sources_get_equal_shares_each_split_on_its_own(corpus):
    """A long and a short source: the short one still gives half of the windows (until it runs out), and each
    source's calibration and evaluation windows stay apart."""
    lm = _loaded()
    long = corpus / "long.txt"
    import random

    rng = random.Random(7)
    long.write_text("".join(rng.choice("abcdefghijklmnopqrstuvwxyz .,") for _ in range(10000)))  # 5× doc0
    spec = f"{corpus / 'doc0.txt'},{long}"
    short_rows, long_rows = _cut_rows(lm, corpus / "doc0.txt"), _cut_rows(lm, long)
    cal = load_windows(spec, lm, split="calibration", tokens=8 * 50, seq_len=50)
    rows = [tuple(r.tolist()) for r in cal.input_ids]
    assert [r in short_rows for r in rows] == [True, False] * 4  # one from each in turn
    everything = load_windows(spec, lm, split="calibration", tokens=10**6, seq_len=50)
    n_short = sum(tuple(r.tolist()) in short_rows for r in everything.input_ids)
    assert n_short == len(short_rows) // 2 and len(everything.input_ids) == n_short + len(long_rows) // 2
    ev = load_windows(spec, lm, split="evaluation", tokens=10**6, seq_len=50)
    assert not _rows(everything) & _rows(ev)
    assert _rows(load_windows(str(long), lm, split="calibration", tokens=10**6, seq_len=50)) <= long_rows


def test_self_mixes_with_text_and_data_checks_skip_it(corpus):
    from tiny_models import build

    from compress.inputs import check_data

    check_data(f"self,{corpus / 'doc0.txt'}")
    with pytest.raises(UserError, match="no such file"):
        check_data(f"self,{corpus / 'missing.txt'}")
    loaded = build("llama")
    loaded.tokenizer = FakeTokenizer()
    w = load_windows(f"self,{corpus / 'doc0.txt'}", loaded, split="calibration", tokens=4 * 16, seq_len=16)
    text_rows = _cut_rows(loaded, corpus / "doc0.txt", 16)
    assert [tuple(r.tolist()) in text_rows for r in w.input_ids] == [False, True] * 2


def test_fingerprint_of_several_sources_differs_from_their_pooled_files(corpus):
    from flows.cache import data_fingerprint

    a, b = corpus / "doc0.txt", corpus / "doc1.txt"
    mixed = data_fingerprint(f"{a},{b}")
    assert mixed["mix"] == "equal" and [s["files"][0][0] for s in mixed["sources"]] == ["doc0.txt", "doc1.txt"]
    assert data_fingerprint(str(a))["files"][0][0] == "doc0.txt"
