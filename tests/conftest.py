"""Shared fixtures: tiny random models for unit tests, real zoo models (pulled on first use) for slow tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)

REPO = Path(__file__).resolve().parents[1]
# Test data: the public-domain Austen novels in shared/ beside the checkout (CI has it there), or $COMPRESS_TEST_TEXT.
AUSTEN = Path(os.environ.get("COMPRESS_TEST_TEXT") or REPO.parent / "shared" / "data" / "text" / "austen")


class FakeTokenizer:
    """Character-level tokenizer: enough of the HF tokenizer interface for data.py."""

    bos_token_id = 1
    cls_token_id = 2
    sep_token_id = 3

    def __init__(self, add_bos: bool = True):
        self.add_bos = add_bos

    def __call__(self, text, add_special_tokens=True, verbose=False):
        ids = [4 + (ord(c) % 60) for c in text]
        if add_special_tokens and self.add_bos:
            ids = [self.bos_token_id, *ids]
        return {"input_ids": ids}


@pytest.fixture
def fake_tokenizer() -> FakeTokenizer:
    return FakeTokenizer()


@pytest.fixture(scope="session")
def austen() -> Path:
    if not AUSTEN.is_dir():
        pytest.fail(f"test data missing: {AUSTEN} (shared/ beside the checkout, or set COMPRESS_TEST_TEXT)")
    return AUSTEN


@pytest.fixture(scope="session")
def smollm2():
    from compress.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def minilm():
    from compress.models import load_model

    return load_model("minilm-l6")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    """TEXT (tiny_models) repeated 40 times in a file: calibration and evaluation text for the tiny models."""
    from tiny_models import TEXT

    path = tmp_path_factory.mktemp("text") / "austen.txt"
    path.write_text(TEXT * 40)
    return path
