"""Model specs: HF directory, bare weights file with a config beside it or --arch, pickles refused by default."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build

from compress.errors import UserError
from compress.models import load_model


@pytest.fixture
def tiny_dir(tmp_path):
    m = build("llama").module
    m.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny", m


def _same(a, b):
    ids = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(a(ids).logits, b(ids).logits)


def test_hf_directory_and_weights_file_with_config_beside(tiny_dir):
    path, ref = tiny_dir
    loaded = load_model(str(path))
    assert loaded.kind == "decoder" and loaded.family == "llama" and loaded.tokenizer is None
    _same(loaded.module, ref)
    _same(load_model(str(path / "model.safetensors")).module, ref)


def test_weights_file_with_arch_and_pickle_policy(tiny_dir, tmp_path):
    path, ref = tiny_dir
    lone = tmp_path / "lone"
    lone.mkdir()
    torch.save(ref.state_dict(), lone / "w.pt")
    with pytest.raises(UserError, match="has no architecture"):
        load_model(str(lone / "w.pt"))
    _same(load_model(str(lone / "w.pt"), arch=str(path)).module, ref)

    class Evil:
        def __reduce__(self):
            return (print, ("pickle code ran",))

    torch.save({"x": Evil()}, lone / "evil.pt")
    with pytest.raises(UserError, match="--trust-pickle"):
        load_model(str(lone / "evil.pt"), arch=str(path))


def test_weights_that_do_not_match_the_architecture(tiny_dir, tmp_path):
    path, _ = tiny_dir
    from safetensors.torch import save_file

    save_file({"nope": torch.zeros(3)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(UserError, match="does not match"):
        load_model(str(tmp_path / "bad.safetensors"), arch=str(path))
