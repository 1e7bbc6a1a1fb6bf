"""Metrics against independent computations and closed forms."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import build
from torch import nn

from compress.metrics import (
    cosine_distance,
    kl_per_token,
    log_softmax_chunked,
    next_token_nll,
    perplexity,
    summarize,
    top1_agreement,
    weight_footprint,
)


def test_kl_matches_torch_kl_div_and_closed_form():
    g = torch.Generator().manual_seed(0)
    ref, cand = torch.randn(3, 700, 50, generator=g), torch.randn(3, 700, 50, generator=g)
    ours = kl_per_token(log_softmax_chunked(ref), cand, chunk=97)
    want = F.kl_div(F.log_softmax(cand, -1), F.log_softmax(ref, -1), log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-5)
    assert kl_per_token(log_softmax_chunked(ref), ref).abs().max() < 1e-6
    p, q = torch.tensor([[0.5, 0.5]]), torch.tensor([[0.9, 0.1]])
    closed = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert kl_per_token(p.log(), q.log()).item() == pytest.approx(closed, rel=1e-6)


def test_perplexity_of_uniform_model_is_vocab_size():
    logits = torch.zeros(2, 9, 37)
    ids = torch.randint(0, 37, (2, 9))
    assert perplexity(next_token_nll(logits, ids)) == pytest.approx(37.0, rel=1e-6)


def test_summary_top1_cosine():
    s = summarize(torch.arange(1, 101, dtype=torch.float32))
    assert s["mean"] == pytest.approx(50.5) and s["median"] == 50 and s["p99"] == pytest.approx(99.01)
    a = torch.tensor([[1.0, 0.0, 3.0], [0.0, 2.0, 1.0]])
    b = torch.tensor([[0.0, 0.0, 9.0], [5.0, 0.0, 1.0]])
    assert top1_agreement(a, b).tolist() == [1.0, 0.0]
    assert cosine_distance(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 3.0])).item() == pytest.approx(1.0)
    assert cosine_distance(torch.tensor([1.0, 1.0]), torch.tensor([2.0, 2.0])).item() == pytest.approx(0.0, abs=1e-7)


def test_footprint_counts_tied_weights_once_and_norms_as_non_weights():
    loaded = build("llama")
    m = loaded.module
    m.lm_head.weight = m.model.embed_tokens.weight
    foot = weight_footprint(m)
    matrices = {id(p): p for p in m.parameters() if p.ndim >= 2}
    assert foot["weight_params"] == sum(p.numel() for p in matrices.values())
    assert foot["bpw"] == pytest.approx(32.0)
    params = {id(p): p for p in m.parameters()}.values()
    buffers = [b for n, b in m.named_buffers() if "inv_freq" not in n]  # rotary inv_freq is not persistent
    assert foot["size_bytes"] == 4 * (sum(p.numel() for p in params) + sum(b.numel() for b in buffers))
    assert weight_footprint(m.half())["bpw"] == pytest.approx(16.0)


def test_footprint_uses_what_quantized_modules_report():
    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("codes", torch.zeros(64 * 32 // 2, dtype=torch.uint8))  # 4-bit codes
            self.register_buffer("scales", torch.zeros(64, 1, dtype=torch.float16))  # one per group of 32

        def weight_numel(self):
            return 64 * 32

        def stored_weight_bytes(self):
            return self.codes.numel() + 2 * self.scales.numel()

    foot = weight_footprint(nn.Sequential(Packed()))
    assert foot["bpw"] == pytest.approx(4.5)
