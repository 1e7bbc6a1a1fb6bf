"""Run a GGUF in llama.cpp (llama-cpp-python): per-token logits on evaluation windows, KL/top-1 against a torch
reference with the metrics `compress eval` reports, greedy generation and batch-1 decode speed.

Models load with llama.cpp's extra weight buffer types off (`use_extra_bufts = False`, no AMX/repacked copies):
with them, llama-cpp-python 0.3.36 built here segfaults on any multi-token batch on this AMX-capable CPU, even for
the zoo's own source GGUF. Pass `extra_buffers=True` to measure with them where they work.
"""

from __future__ import annotations

import contextlib
import io
import os
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from compress.data import Windows
from compress.errors import UserError
from compress.metrics import kl_per_token, log_softmax_chunked, summarize, top1_agreement
from compress.models.hf import LoadedModel


@dataclass
class LlamaCppComparison:
    """KL(reference ‖ llama.cpp) and top-1 agreement over every position of the windows."""

    gguf: str
    reference: str
    kl_mean: float
    kl_median: float
    kl_p99: float
    top1_agreement: float
    windows: int
    tokens: int
    llamacpp_seconds: float
    reference_seconds: float

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return asdict(self)


def llamacpp_logits(gguf_path: Path | str, windows: Windows | torch.Tensor | Sequence[Sequence[int]],
                    n_threads: int = 2, extra_buffers: bool = False) -> list[torch.Tensor]:
    """Logits [L, vocab] of each window, each run as one sequence from an empty cache."""
    rows = _rows(windows)
    n = max(len(r) for r in rows)
    llm = _open(gguf_path, n_ctx=n, n_batch=n, logits_all=True, n_threads=n_threads, extra_buffers=extra_buffers)
    out = []
    try:
        with quiet_stderr():
            for ids in rows:
                llm.reset()
                llm.eval(ids)
                out.append(torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32)))
    finally:
        _close(llm)
    return out


@torch.inference_mode()
def reference_logits(reference: LoadedModel, windows: Windows | torch.Tensor | Sequence[Sequence[int]]) -> list[
        torch.Tensor]:
    """Logits [L, vocab] of a torch model on the same windows (one sequence each, no cache)."""
    return [reference.module(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()
            for ids in _rows(windows)]


def compare_with_reference(gguf_path: Path | str, reference: LoadedModel,
                           windows: Windows | torch.Tensor | Sequence[Sequence[int]], n_threads: int = 2,
                           ref_logits: list[torch.Tensor] | None = None,
                           extra_buffers: bool = False) -> LlamaCppComparison:
    """KL(reference ‖ llama.cpp) mean/median/p99 and top-1 agreement per token (pass `ref_logits` to reuse them)."""
    t0 = time.perf_counter()
    if ref_logits is None:
        ref_logits = reference_logits(reference, windows)
    t1 = time.perf_counter()
    cand = llamacpp_logits(gguf_path, windows, n_threads=n_threads, extra_buffers=extra_buffers)
    t2 = time.perf_counter()
    kl, top1 = [], []
    for r, c in zip(ref_logits, cand, strict=True):
        if r.shape != c.shape:
            raise UserError(f"{gguf_path}: llama.cpp logits {tuple(c.shape)} vs reference {tuple(r.shape)}; compare "
                            "a GGUF with the model it was exported from (same vocabulary)")
        kl.append(kl_per_token(log_softmax_chunked(r), c).reshape(-1))
        top1.append(top1_agreement(r, c).reshape(-1))
    stats = summarize(torch.cat(kl))
    return LlamaCppComparison(str(gguf_path), str(reference.spec), stats["mean"], stats["median"], stats["p99"],
                              float(torch.cat(top1).mean()), len(cand), sum(len(c) for c in cand),
                              round(t2 - t1, 2), round(t1 - t0, 2))


def llamacpp_generate(gguf_path: Path | str, prompt: str, max_tokens: int = 16, n_threads: int = 2,
                      extra_buffers: bool = False) -> str:
    """Greedy continuation of `prompt` by llama.cpp (its own tokenizer)."""
    llm = _open(gguf_path, n_ctx=512, n_batch=512, logits_all=False, n_threads=n_threads, extra_buffers=extra_buffers)
    try:
        with quiet_stderr():
            out = llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, top_k=1)
    finally:
        _close(llm)
    return out["choices"][0]["text"]


def llamacpp_decode_speed(gguf_path: Path | str, n_tokens: int = 32, n_threads: int = 2,
                          prompt: Sequence[int] | None = None, warmup: int = 4, extra_buffers: bool = False) -> float:
    """Median ms per greedy single-token decode step (batch 1, KV cache) after a short prompt and `warmup` steps."""
    import llama_cpp

    llm = _open(gguf_path, n_ctx=512, n_batch=512, logits_all=False, n_threads=n_threads, extra_buffers=extra_buffers)
    try:
        ids = list(prompt) if prompt else [llm.token_bos() if llm.token_bos() >= 0 else 0] * 16
        if len(ids) + warmup + n_tokens > llm.n_ctx():
            raise UserError(f"prompt of {len(ids)} tokens + {warmup + n_tokens} steps exceeds the context of "
                            f"{llm.n_ctx()}; use a shorter prompt or fewer tokens")
        times = []
        with quiet_stderr():
            llm.reset()
            llm.eval(ids)
            for step in range(warmup + n_tokens):
                logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(llm.n_vocab(),))
                nxt = int(logits.argmax())
                t0 = time.perf_counter()
                llm.eval([nxt])
                if step >= warmup:
                    times.append(time.perf_counter() - t0)
    finally:
        _close(llm)
    return 1000 * statistics.median(times)


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silence stderr, Python's and file descriptor 2 (llama.cpp logs from C and through a Python callback)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _import():
    try:
        import llama_cpp
    except ImportError as exc:
        raise UserError("llama.cpp runs need llama-cpp-python: pip install 'compress[llamacpp]'") from exc
    return llama_cpp


def _open(gguf_path: Path | str, *, n_ctx: int, n_batch: int, logits_all: bool, n_threads: int,
          extra_buffers: bool = False):
    """A llama_cpp.Llama on the CPU, logging silenced; UserError when the file is missing or unloadable."""
    llama_cpp = _import()
    path = Path(gguf_path).expanduser()
    if not path.is_file():
        raise UserError(f"GGUF not found: {gguf_path}; pass the path of a .gguf file")
    with quiet_stderr(), _model_params(llama_cpp, extra_buffers):
        try:
            return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch,
                                   n_threads=n_threads, n_threads_batch=n_threads, logits_all=logits_all,
                                   n_gpu_layers=0, verbose=False)
        except ValueError as exc:
            raise UserError(f"llama.cpp cannot load {gguf_path}: {str(exc).splitlines()[0]}") from exc


@contextlib.contextmanager
def _model_params(llama_cpp, extra_buffers: bool) -> Iterator[None]:
    """Make Llama() start from default model params with `use_extra_bufts` set (it has no argument for it)."""
    low = llama_cpp.llama_cpp
    default = low.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = extra_buffers
        return p

    low.llama_model_default_params = params
    try:
        yield
    finally:
        low.llama_model_default_params = default


def _close(llm) -> None:
    with quiet_stderr():
        llm.close()


def _rows(windows: Windows | torch.Tensor | Sequence[Sequence[int]]) -> list[list[int]]:
    """Token ids per window as plain lists."""
    ids = windows.input_ids if isinstance(windows, Windows) else windows
    rows = [list(map(int, r)) for r in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
    if not rows or not all(rows):
        raise UserError("no token windows to evaluate: pass at least one non-empty window")
    return rows
