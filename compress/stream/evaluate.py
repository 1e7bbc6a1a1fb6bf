"""`compress eval` for models that are not held whole: candidate and reference advance block by block in lockstep
over the evaluation windows (one block of each in memory at a time), then the final norm and the LM head give the
same per-token NLL, KL and top-1 as compress.evaluate, computed 128 tokens at a time."""

from __future__ import annotations

import hashlib

import torch

from compress import distributed
from compress.data import Windows
from compress.errors import UserError
from compress.evaluate import EvalReport, window_metrics
from compress.metrics import kl_per_token, log_softmax_chunked, weight_footprint
from compress.stream.lazy import Calls, LazyModel
from compress.stream.quantize import Footprint, trunk_footprint
from compress.version import __version__

TOKEN_ROWS = 128  # hidden-state rows per LM-head chunk: bounds the logits to 128 × vocabulary floats per model


def evaluate_streaming(candidate: LazyModel, reference: LazyModel | None, windows: Windows,
                       progress=None) -> EvalReport:
    """The EvalReport of compress.evaluate.evaluate (decoders), each model read block by block from disk."""
    if candidate.loaded.kind != "decoder":
        raise UserError(f"{candidate.loaded.spec}: streaming evaluation is for decoders (encoders fit in memory); "
                        "pass --stream off")
    models = [candidate] + ([reference] if reference is not None else [])
    task = progress.add_task("eval blocks", total=len(candidate.blocks) + 1) if progress is not None else None
    mine = distributed.mine(len(windows.input_ids))  # under torchrun, this rank's share of the windows
    calls = [_capture(m, windows, mine) for m in models]
    hidden = [[c.hidden for c in cs] for cs in calls]
    foot = Footprint()
    with torch.inference_mode():
        for i in range(len(candidate.blocks)):
            for k, m in enumerate(models):
                m.load_block_narrow(i)
                if k == 0:
                    foot.add(weight_footprint(candidate.blocks[i]))
                hidden[k] = [m.run_block(i, c, h) for c, h in zip(calls[k], hidden[k], strict=True)]
                m.drop_block(i)
            if progress is not None:
                read = sum(m.checkpoint.bytes_read for m in models) / 1e9
                progress.update(task, advance=1, description=f"eval blocks ({read:.1f} GB read)")
        per_window = _head_metrics(models, hidden, windows, mine, foot)
    metrics = window_metrics(distributed.gather(len(windows.input_ids), dict(zip(mine, per_window, strict=True))),
                             reference is not None)
    if progress is not None:
        progress.advance(task)
    provenance = {"tool_version": __version__, "data": windows.describe(), "windows_sha256": windows.data_hash,
                  "model_sha256": None, "reference_sha256": None, "streamed": True,
                  "model_files_sha256": files_hash(candidate),
                  "reference_files_sha256": files_hash(reference) if reference is not None else None}
    return EvalReport(model=candidate.loaded.spec, reference=reference.loaded.spec if reference else None,
                      size_bytes=foot.size_bytes, bpw=round(foot.bpw, 4), tokens=windows.num_tokens,
                      provenance=provenance, **metrics)


def logits_streaming(lazy: LazyModel, windows: Windows) -> list[torch.Tensor]:
    """Logits [seq, vocab] (float32) of each window, the model read block by block: what
    `model(input_ids=window).logits[0]` gives for a model held whole."""
    calls = _capture(lazy, windows)
    hidden = [c.hidden for c in calls]
    with torch.inference_mode():
        for i in range(len(lazy.blocks)):
            lazy.load_block_narrow(i)
            hidden = [lazy.run_block(i, c, h) for c, h in zip(calls, hidden, strict=True)]
            lazy.drop_block(i)
        lazy.load_trunk()
        try:
            out = []
            for h in hidden:
                final = lazy.final_hidden(h).reshape(-1, h.shape[-1])
                out.append(torch.cat([lazy.logits(final[s:s + TOKEN_ROWS]) for s in range(0, len(final), TOKEN_ROWS)])
                           .float().cpu())
        finally:
            lazy.drop_trunk()
    return out


def files_hash(lazy: LazyModel) -> str:
    """sha256 over the sha256s of the model's safetensors files in order: which stored weights were evaluated.
    An output this tool wrote has them in its file records, already checked when it was opened."""
    from compress.integrity import recorded, sha256

    records = recorded(lazy.checkpoint.path) or {}
    h = hashlib.sha256()
    for f in lazy.checkpoint.files:
        digest = records.get(f.name, {}).get("sha256") or sha256(f)
        h.update(bytes.fromhex(digest))
    return h.hexdigest()


def _capture(lazy: LazyModel, windows: Windows, which: list[int] | None = None) -> list[Calls]:
    """Block 0's input and each block's arguments, one window at a time (as compress.evaluate runs them): the
    windows `which` lists, else all."""
    which = range(len(windows.input_ids)) if which is None else which
    lazy.load_trunk()
    try:
        return [lazy.capture(windows.input_ids[w].unsqueeze(0), windows.attention_mask[w].unsqueeze(0))
                for w in which]
    finally:
        lazy.drop_trunk()


def _head_metrics(models: list[LazyModel], hidden: list[list[torch.Tensor]], windows: Windows, which: list[int],
                  foot: Footprint) -> list[tuple[torch.Tensor, ...]]:
    """Each window's per-token NLL (and the reference's NLL, KL(reference ‖ candidate) and top-1 agreement) from
    the final hidden states, for the windows `which` lists; the candidate's modules outside the stack added to `foot`
    while they are loaded. One model's trunk is held at a time: per window, the reference's log-probabilities are
    computed and kept (one window's worth) while the candidate's trunk is dropped, then compared with the
    candidate's."""
    cand = models[0]
    cand.load_trunk()
    try:
        foot.add(trunk_footprint(cand, cand.big_tables()))
        out = []
        for k_win, w in enumerate(which):
            ids = windows.input_ids[w]
            starts = range(0, len(ids), TOKEN_ROWS)
            ref = None
            if len(models) > 1:
                cand.drop_trunk()
                ref = _reference_side(models[1], hidden[1][k_win], ids, starts)
                cand.load_trunk()
            final = cand.final_hidden(hidden[0][k_win]).reshape(-1, hidden[0][k_win].shape[-1])
            nll, kl, top1 = [], [], []
            for c, s in enumerate(starts):
                rows = slice(s, min(s + TOKEN_ROWS, len(ids)))
                lg = cand.logits(final[rows])
                nll.append(_nll(lg, ids[rows.start + 1:rows.stop + 1]))
                if ref is not None:
                    lp, top = ref["lp"][c], ref["top"][c]
                    if lp.shape[-1] != lg.shape[-1]:
                        raise UserError(f"--reference {models[1].loaded.spec} and {cand.loaded.spec} have "
                                        "different vocabularies: KL needs the same vocabulary")
                    kl.append(kl_per_token(lp, lg))
                    top1.append((top == lg.argmax(-1)).float())
            cols = [torch.cat(nll)]
            if ref is not None:
                cols += [torch.cat(ref["nll"]), torch.cat(kl), torch.cat(top1)]
            out.append(tuple(cols))
        return out
    finally:
        cand.drop_trunk()


def _reference_side(ref: LazyModel, hidden: torch.Tensor, ids: torch.Tensor, starts: range) -> dict:
    """The reference's per-token NLL, log-probabilities and top-1 token of one window, TOKEN_ROWS rows at a time,
    its trunk loaded for them and dropped after."""
    ref.load_trunk()
    try:
        final = ref.final_hidden(hidden).reshape(-1, hidden.shape[-1])
        side: dict[str, list[torch.Tensor]] = {"nll": [], "lp": [], "top": []}
        for s in starts:
            rows = slice(s, min(s + TOKEN_ROWS, len(ids)))
            lg = ref.logits(final[rows])
            side["nll"].append(_nll(lg, ids[rows.start + 1:rows.stop + 1]))
            side["lp"].append(log_softmax_chunked(lg))
            side["top"].append(lg.argmax(-1))
        return side
    finally:
        ref.drop_trunk()


def _nll(logits: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
    """Per-token NLL of the next tokens `nxt` under the logits of the positions that have one."""
    return -log_softmax_chunked(logits[:len(nxt)]).gather(-1, nxt.unsqueeze(-1)).squeeze(-1)
