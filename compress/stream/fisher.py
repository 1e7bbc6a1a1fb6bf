"""`--measure fisher` block by block: one forward over the calibration windows keeps each block's input, one backward
from the loss down to the embedding recomputes each block from its kept input and hands the gradient to the block
below. Each Linear squares its per-window weight gradient into the diagonal Fisher as the gradient passes, and
every unit × candidate is predicted as ½ Σ F ΔW² before the block is freed, so memory holds one block, its Fisher
and the hidden states (spilled to files when large). The same code runs on a model whole in memory
(`LazyModel.resident`), so both paths predict the same table.

F is the per-token empirical Fisher: Σ over windows of the squared gradient of the window's summed next-token NLL,
divided by the number of predicted tokens, so ½ Σ F ΔW² is on the scale of the per-token KL it predicts.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from compress.data import Windows
from compress.errors import EnvironmentFault, UserError
from compress.quantize.apply import weight_matrix
from compress.quantize.distortion import DistortionTable, Unit, _fake_quant, importance_of, unit_bytes
from compress.quantize.modules import TABLE_ROWS
from compress.quantize.spec import QuantSpec
from compress.stream.lazy import Calls, LazyModel, linear_cast, release_freed_memory

FISHER_GROUP_BYTES = 256 * 2**20  # fp32 squares held at a time in a block's backward (one pass per group)
GRAD_ELEMENTS = 1 << 22  # weight-gradient elements computed at a time in a Linear's backward (16 MB in fp32)
IN_MEMORY_BYTES = 256 * 2**20  # block inputs kept in memory up to this, in files beyond
MEASURE = "predicted kl (½ Σ F ΔW², diagonal Fisher of the calibration NLL per token)"


def predict_blockwise(lazy: LazyModel, windows: Windows, units: list[Unit], candidates: list[QuantSpec],
                      allowed: list[list[bool]] | None = None, progress=None,
                      offload_dir: Path | None = None, imatrix=None) -> DistortionTable:
    """The predicted distortion table of `units` × `candidates` (a disallowed cell is inf, not computed); with
    `imatrix`, each candidate's error is that of importance-weighted RTN, as the plan will quantize."""
    if lazy.loaded.kind != "decoder":
        raise UserError("--measure fisher needs a language-model loss: decoders only; use full or fast")
    allowed = allowed or [[True] * len(candidates) for _ in units]
    wanted = {m for u in units for m in u.modules}
    per_module: dict[str, list[float]] = {}
    tokens = _predicted(windows)
    n_win, n_blocks = len(windows.input_ids), len(lazy.lmap.blocks)
    task = progress.add_task("fisher", total=2 * n_blocks + 3) if progress is not None else None

    def step(phase: str) -> None:
        if progress is not None:
            progress.update(task, advance=1, description=f"fisher: {phase}{_read(lazy)}")

    hidden_bytes = n_win * windows.seq_len * _width(lazy) * torch.empty((), dtype=lazy.dtype).element_size()
    store = _Store(hidden_bytes * n_blocks, offload_dir, lazy.device)
    try:
        lazy.load_trunk()
        calls = [_for_autograd(lazy.capture(windows.input_ids[w:w + 1], windows.attention_mask[w:w + 1]))
                 for w in range(n_win)]
        hidden = [c.hidden for c in calls]
        lazy.drop_trunk()
        step("embedding")
        for blk in lazy.lmap.blocks:  # forward: keep each block's input
            for w in range(n_win):
                store.put(blk.index, w, hidden[w])
            hidden = _forward_block(lazy, blk.index, calls, hidden)
            step(f"forward block {blk.index}")
        lazy.load_trunk()
        normed, lse, d_hidden = zip(*[_head_backward(lazy, calls[w], hidden[w]) for w in range(n_win)], strict=True)
        d_hidden = list(d_hidden)
        lazy.drop_trunk()
        step("loss")
        for blk in reversed(lazy.lmap.blocks):  # backward: each block recomputed from its input
            names = [n for n in blk.linears if n in wanted]
            d_hidden = _backward_block(lazy, blk.index, calls, store, d_hidden, names,
                                       lambda sq: per_module.update(_predict(lazy, sq, candidates, tokens, imatrix)))
            lazy.drop_block(blk.index)
            step(f"backward block {blk.index}")
        lazy.load_trunk()
        d_embed = [lazy.embedding_grad(c.input_ids, c.attention_mask, d) for c, d in zip(calls, d_hidden, strict=True)]
        per_module.update(_predict_tables(lazy, wanted, calls, normed, lse, d_embed, candidates, tokens,
                                          imatrix))
        lazy.drop_trunk()
        step("embedding and head")
    finally:
        store.close()
    table = [[sum(per_module[m][c] for m in u.modules) if allowed[i][c] else float("inf")
              for c in range(len(candidates))] for i, u in enumerate(units)]
    sizes = [[unit_bytes(lazy.model, u, c) for c in candidates] for u in units]
    measure = MEASURE + (", importance-weighted RTN" if imatrix is not None else "")
    return DistortionTable(units, candidates, table, sizes, measure, windows.describe())


# ---- the block stack

def _for_autograd(calls: Calls) -> Calls:
    """The recorded arguments as normal tensors (capture runs in inference mode, whose tensors autograd refuses to
    save for the backward)."""
    def normal(v):
        if isinstance(v, torch.Tensor):
            return v.clone()
        if isinstance(v, tuple | list):
            return type(v)(normal(x) for x in v)
        if isinstance(v, dict):
            return {k: normal(x) for k, x in v.items()}
        return v

    calls.args = [(normal(a), normal(k)) for a, k in calls.args]
    calls.hidden = calls.hidden.clone()
    return calls


def _forward_block(lazy: LazyModel, i: int, calls: list[Calls], hidden: list[torch.Tensor]) -> list[torch.Tensor]:
    """Block i's output for every window (no autograd), the block read and freed around it."""
    lazy.load_block(i, _linear_weights(lazy, i))
    patched = _patch(lazy.blocks[i], None)
    try:
        with torch.inference_mode():
            out = [lazy.run_block(i, c, h) for c, h in zip(calls, hidden, strict=True)]
    finally:
        _unpatch(patched)
        lazy.drop_block(i)
    return out


def _backward_block(lazy: LazyModel, i: int, calls: list[Calls], store: _Store, d_out: list[torch.Tensor],
                    names: list[str], predict) -> list[torch.Tensor]:
    """Block i recomputed from each window's kept input: the gradient at its input. Σ over windows of each named
    Linear's squared weight gradient is handed to `predict` (which frees it) a group of Linears at a time, one
    backward pass per group (_groups), so at most FISHER_GROUP_BYTES of squares are held; every pass computes the
    same gradients, whatever the grouping. The block stays loaded for the prediction."""
    lazy.load_block(i, _linear_weights(lazy, i))
    prefix = f"{lazy.lmap.blocks_path}.{i}."
    shapes = {n: weight_matrix(lazy.model.get_submodule(n)).shape for n in names}
    groups = _groups(shapes)
    d_in: list[torch.Tensor] = []
    for g, group in enumerate(groups):
        sq = {n: torch.zeros(shapes[n], device=lazy.device) for n in group}
        fisher = {n.removeprefix(prefix): sq.get(n) for n in names}
        patched = _patch(lazy.blocks[i], fisher)
        try:
            for w, (c, d) in enumerate(zip(calls, d_out, strict=True)):
                dx = _window_backward(lazy, i, c, store.get(i, w, release=g == len(groups) - 1), d)
                if g == 0:
                    d_in.append(dx)
        finally:
            _unpatch(patched)
        del fisher
        predict(sq)  # frees the group's squares before the next group's are made
    return d_in


def _window_backward(lazy: LazyModel, i: int, calls: Calls, x: torch.Tensor, d_out: torch.Tensor) -> torch.Tensor:
    """One window through block i and back: the gradient at the block's input (the graph, and the squares its
    Fisher Linears point to, let go on return)."""
    x.requires_grad_(True)
    with torch.enable_grad():
        out = lazy.run_block(i, calls, x)
        (dx,) = torch.autograd.grad(out, x, d_out)
    return dx


def _groups(shapes: dict[str, torch.Size]) -> list[list[str]]:
    """The Linears in order, cut into runs whose fp32 squares fit FISHER_GROUP_BYTES (a Linear larger than that is
    a run alone); one run (one backward pass) when the whole block fits, as on models that fit in memory."""
    groups: list[list[str]] = [[]]
    held = 0
    for n, shape in shapes.items():
        size = 4 * shape[0] * shape[1]
        if groups[-1] and held + size > FISHER_GROUP_BYTES:
            groups.append([])
            held = 0
        groups[-1].append(n)
        held += size
    return groups


class _FisherLinear(torch.autograd.Function):
    """y = x Wᵀ + b, W cast to x's dtype where it is used; the backward adds the window's squared weight gradient
    to `sq` (unless None) and returns only the input's gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, sq, transposed):
        ctx.save_for_backward(x, weight)
        ctx.sq, ctx.transposed = sq, transposed
        return linear_cast(x, weight, bias, transposed)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        w = _matrix(weight, ctx.transposed)  # [out, in], in the stored dtype
        xs, dys = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
        dx = torch.zeros(xs.shape, dtype=dy.dtype, device=dy.device)
        step = max(1, GRAD_ELEMENTS // w.shape[1])
        for r in range(0, w.shape[0], step):  # output rows a slice at a time: no whole fp32 gradient or weight
            d = dys[:, r:r + step]
            if ctx.sq is not None:  # None: a Linear of another group of this pass (its gradient flows the same)
                ctx.sq[r:r + step].add_((d.T @ xs).square_())
            dx.addmm_(d, w[r:r + step].to(dy.dtype))
        ctx.sq = None  # the graph may outlive this backward: it must not keep the squares alive
        return dx.reshape(*dy.shape[:-1], xs.shape[-1]), None, None, None, None


def _matrix(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    return weight.t() if transposed else weight


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"


def _patch(block: nn.Module, sq: dict[str, torch.Tensor | None] | None) -> list[nn.Module]:
    """Every Linear of the block computes with its weight cast where used (so it may stay in the stored dtype);
    those named in `sq` (names relative to the block) take the Fisher backward, squaring their weight gradients
    into their tensor there (None: not in this pass)."""
    patched = []
    for name, m in block.named_modules():
        if not _is_linear(m):
            continue
        t = type(m).__name__ == "Conv1D"
        if name not in (sq or {}):
            m.forward = lambda x, m=m, t=t: linear_cast(x, m.weight, m.bias, t)
        else:
            m.forward = lambda x, m=m, t=t, a=sq[name]: _FisherLinear.apply(x, m.weight, m.bias, a, t)
        patched.append(m)
    return patched


def _unpatch(patched: list[nn.Module]) -> None:
    for m in patched:
        del m.forward


def _linear_weights(lazy: LazyModel, i: int) -> tuple[str, ...]:
    """Block i's Linear weights: read in the checkpoint's dtype and cast where used, so the block costs its stored
    bytes plus its Fisher."""
    prefix = f"{lazy.lmap.blocks_path}.{i}."
    return tuple(f"{prefix}{n}.weight" for n, m in lazy.blocks[i].named_modules() if _is_linear(m))


# ---- loss, head and embedding

def _labels(calls: Calls) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions that predict a next token (both it and the next one real) and the tokens they predict."""
    ids, mask = calls.input_ids[0], calls.attention_mask[0].bool()
    keep = torch.zeros_like(mask)
    keep[:-1] = mask[:-1] & mask[1:]
    labels = torch.zeros_like(ids)
    labels[:-1] = ids[1:]
    return keep, labels


def _predicted(windows: Windows) -> int:
    m = windows.attention_mask.bool()
    return int((m[:, :-1] & m[:, 1:]).sum())


def _chunks(rows: int) -> list[tuple[int, int]]:
    """(start, end) of TABLE_ROWS-row slices of a table with `rows` rows."""
    return [(s, min(s + TABLE_ROWS, rows)) for s in range(0, rows, TABLE_ROWS)]


def _logits(lazy: LazyModel, normed: torch.Tensor, s: int, e: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Head rows s:e applied to `normed` (softcapped if the family caps), and tanh's derivative where capped."""
    head = lazy.model.get_submodule(lazy.lmap.head)
    z = normed @ head.weight[s:e].to(normed.dtype).T
    if getattr(head, "bias", None) is not None:
        z = z + head.bias[s:e].to(normed.dtype)
    cap = lazy.lmap.logit_softcap
    if not cap:
        return z, None
    t = torch.tanh(z / cap)
    return t * cap, 1 - t * t


def _dlogits(lazy: LazyModel, normed: torch.Tensor, lse: torch.Tensor, keep: torch.Tensor, labels: torch.Tensor,
             s: int, e: int) -> torch.Tensor:
    """d(summed NLL)/d(raw logits) for head rows s:e: softmax − one-hot at the predicting positions, 0 elsewhere."""
    z, slope = _logits(lazy, normed, s, e)
    g = torch.exp(z - lse[:, None])
    hit = keep & (labels >= s) & (labels < e)
    g[hit.nonzero(as_tuple=True)[0], labels[hit] - s] -= 1
    g[~keep] = 0
    return g * slope if slope is not None else g


def _head_backward(lazy: LazyModel, calls: Calls, last: torch.Tensor):
    """For one window: the final-normed hidden states, each position's log-sum-exp over the vocabulary, and the
    gradient of the window's summed NLL at the last block's output (the head taken TABLE_ROWS rows at a time)."""
    keep, labels = _labels(calls)
    head = lazy.model.get_submodule(lazy.lmap.head)
    x = last[0].clone().requires_grad_(True)  # a normal tensor (the forward ran in inference mode)
    with torch.enable_grad():
        normed = lazy.final_hidden(x)
    flat = normed.detach()
    with torch.inference_mode():
        lse = torch.logsumexp(torch.stack([torch.logsumexp(_logits(lazy, flat, s, e)[0], dim=-1)
                                           for s, e in _chunks(head.weight.shape[0])]), dim=0)
        d_normed = torch.zeros_like(flat)
        for s, e in _chunks(head.weight.shape[0]):
            d_normed += _dlogits(lazy, flat, lse, keep, labels, s, e) @ head.weight[s:e].to(flat.dtype)
    with torch.enable_grad():
        (dx,) = torch.autograd.grad(normed, x, d_normed.clone())
    return flat, lse, dx[None]


def _predict_tables(lazy: LazyModel, wanted: set[str], calls: list[Calls], normed, lse, d_embed,
                    candidates: list[QuantSpec], tokens: int, imatrix=None) -> dict[str, list[float]]:
    """½ Σ F ΔW² of the embedding and head tables, TABLE_ROWS rows at a time: the head's gradient is
    dlogitsᵀ · normed, the embedding's the output gradient added at each token's row, summed first when tied."""
    emb, head = lazy.lmap.embeddings, lazy.lmap.head
    tied = bool(emb and head) and lazy.model.get_submodule(emb).weight is lazy.model.get_submodule(head).weight
    out: dict[str, list[float]] = {}
    for name in (n for n in (emb, head) if n in wanted):
        if name == head and tied:
            continue
        with_head, with_embed = name == head or tied, name == emb
        table = weight_matrix(lazy.model.get_submodule(name))
        total = [0.0] * len(candidates)
        for s, e in _chunks(table.shape[0]):
            sq = torch.zeros(e - s, table.shape[1], device=lazy.device)
            with torch.inference_mode():
                for w, c in enumerate(calls):
                    g = torch.zeros_like(sq)
                    if with_head:
                        keep, labels = _labels(c)
                        g += _dlogits(lazy, normed[w], lse[w], keep, labels, s, e).T @ normed[w]
                    if with_embed:
                        ids = c.input_ids[0]
                        inside = (ids >= s) & (ids < e)
                        g.index_add_(0, ids[inside] - s, d_embed[w][0][inside].to(g.dtype))
                    sq += g.square_()
                imp = importance_of(imatrix, name)
                for k, val in enumerate(_errors(table[s:e], sq, candidates, tokens, imp)):
                    total[k] += val
        out[name] = total
    return out


# ---- the prediction

def _errors(weight: torch.Tensor, sq: torch.Tensor, candidates: list[QuantSpec], tokens: int,
            importance: torch.Tensor | None = None, rows: int | None = None) -> list[float]:
    """½ Σ (sq / tokens) (Q(W) − W)² for each candidate, `rows` rows at a time (default: RTN's cache-sized chunk;
    rows are quantized independently, so a slice of rows is predicted on its own, and the fp32 copies stay small),
    summed in float64. Under torchrun each rank predicts the candidates whose index ≡ its rank and all receive
    every value (the same numbers as one process)."""
    from compress import distributed
    from compress.quantize.rtn import CHUNK_ELEMENTS

    rows = rows or max(1, CHUNK_ELEMENTS // weight.shape[1])

    if distributed.world() > 1 and len(candidates) > 1:
        return distributed.map_split(candidates, lambda c: _errors_alone(weight, sq, [c], tokens, importance,
                                                                         rows)[0])
    return _errors_alone(weight, sq, candidates, tokens, importance, rows)


def _errors_alone(weight: torch.Tensor, sq: torch.Tensor, candidates: list[QuantSpec], tokens: int,
                  importance: torch.Tensor | None, rows: int) -> list[float]:
    total = [0.0] * len(candidates)
    for s in range(0, weight.shape[0], rows):
        w = weight[s:s + rows].detach().float()
        for k, c in enumerate(candidates):
            total[k] += float((sq[s:s + rows] * (_fake_quant(w, c, importance) - w).square_()).sum(dtype=torch.float64))
    return [0.5 * t / tokens for t in total]


def _predict(lazy: LazyModel, sq: dict[str, torch.Tensor], candidates: list[QuantSpec],
             tokens: int, imatrix=None) -> dict[str, list[float]]:
    """Each module's predicted errors; its Fisher is freed as soon as it is used."""
    out = {}
    with torch.inference_mode():
        for n in list(sq):
            out[n] = _errors(weight_matrix(lazy.model.get_submodule(n)), sq.pop(n), candidates, tokens,
                             importance_of(imatrix, n))
    release_freed_memory()
    return out


def _width(lazy: LazyModel) -> int:
    cfg = lazy.model.config
    return int(getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 0) or 1)


def _read(lazy: LazyModel) -> str:
    return f" ({lazy.checkpoint.bytes_read / 1e9:.1f} GB read)" if lazy.streamed else ""


class _Store:
    """Each block's input per window: in memory while all of them fit in IN_MEMORY_BYTES, else one file each in a
    scratch directory (under `offload_dir`, else the system's temporary directory), removed at the end."""

    def __init__(self, total_bytes: int, offload_dir: Path | None, device: torch.device | None = None):
        self.mem: dict[tuple[int, int], torch.Tensor] = {}
        self.device = device or torch.device("cpu")
        self.where = offload_dir
        self.dir = None
        if total_bytes > IN_MEMORY_BYTES:
            try:
                self.dir = Path(tempfile.mkdtemp(prefix="compress-fisher-", dir=offload_dir))
            except OSError as exc:
                raise self._fault(exc) from exc

    def put(self, i: int, w: int, t: torch.Tensor) -> None:
        """Keep block i's input of window w."""
        if self.dir is None:
            self.mem[i, w] = t
            return
        try:
            torch.save(t.detach().cpu().contiguous(), self.dir / f"{i}-{w}.pt")
        except (OSError, RuntimeError) as exc:
            raise self._fault(exc) from exc

    def get(self, i: int, w: int, release: bool = True) -> torch.Tensor:
        """Block i's input of window w, a copy; with `release`, the kept one is let go (its last use)."""
        if self.dir is None:
            return (self.mem.pop((i, w)) if release else self.mem[i, w]).clone()
        f = self.dir / f"{i}-{w}.pt"
        t = torch.load(f, weights_only=True).to(self.device)
        if release:
            f.unlink()
        return t

    def close(self) -> None:
        """Remove the scratch directory."""
        self.mem.clear()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _fault(self, exc: Exception) -> EnvironmentFault:
        where = self.where or Path(tempfile.gettempdir())
        return EnvironmentFault(f"--offload-dir {where}: cannot write the hidden states there ({exc}); free space "
                                "or pass --offload-dir DIR on a disk with room")

