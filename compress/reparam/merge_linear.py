"""merge-linear: two Linear layers with nothing between them (Identity / eval-mode Dropout aside) become one.

y = W2 (W1 x + b1) + b2  ==>  W = W2 W1, b = W2 b1 + b2. Edges come from torch.fx: the first layer's output is read
only by the second, each is called once and shares no weights. The second layer's path holds the merged Linear, the
first becomes nn.Identity. A merge that would add parameters (a low-rank pair W2 W1, e.g. a factorised layer) is
skipped unless `allow_growth=True`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compress.reparam.graph import call_graph, set_module
from compress.reparam.record import PassSession, Record, _few

NAME = "merge-linear"


def _lin(m: nn.Module | None) -> bool:
    return type(m) is nn.Linear


def apply(model: nn.Module, sample_inputs: Any = None, allow_growth: bool = False, tol: float | None = None) -> Record:
    """Merge every Linear -> Linear pair of `model` (see the module docstring)."""
    session = PassSession(NAME, model, sample_inputs)
    rec = session.record
    modules = dict(model.named_modules())
    if sum(_lin(m) for m in modules.values()) < 2:
        rec.notes.append("fewer than two Linear layers: nothing to merge")
        return session.finish(tol)
    cg = call_graph(model, relevant=_lin)
    pairs, grew = [], []
    for first in cg.calls:
        second = cg.sole_user(first)
        if not (_lin(modules.get(first)) and _lin(modules.get(second))) or not cg.safe(first, second):
            continue
        if cg.calls[second].source != first:
            continue
        a, b = modules[first], modules[second]
        old = a.weight.numel() + b.weight.numel() + sum(x.bias.numel() for x in (a, b) if x.bias is not None)
        new = a.in_features * b.out_features + (b.out_features if a.bias is not None or b.bias is not None else 0)
        if new > old and not allow_growth:
            grew.append(f"{first} -> {second} ({old:,} -> {new:,} params)")
            continue
        pairs.append((first, second))
    if grew:
        rec.notes.append(f"{len(grew)} pair(s) not merged because the merged layer is larger (allow_growth=True "
                         f"merges them): {_few(grew)}")
    if not pairs:
        if not grew:
            rec.notes.append("no Linear -> Linear pairs with nothing between them")
        return session.finish(tol)
    session.run_reference()
    for first, second in pairs:
        a, b = model.get_submodule(first), model.get_submodule(second)
        w1, w2 = a.weight.detach().double(), b.weight.detach().double()
        b1 = a.bias.detach().double() if a.bias is not None else None
        bias = None
        if b1 is not None:
            bias = w2 @ b1
        if b.bias is not None:
            bias = b.bias.detach().double() if bias is None else bias + b.bias.detach().double()
        merged = nn.Linear(a.in_features, b.out_features, bias=bias is not None,
                           dtype=b.weight.dtype, device=b.weight.device)
        with torch.no_grad():
            merged.weight.copy_((w2 @ w1).to(merged.weight.dtype))
            if bias is not None:
                merged.bias.copy_(bias.to(merged.bias.dtype))
        set_module(model, second, merged)
        set_module(model, first, nn.Identity())
        rec.changes.append(f"{first} + {second}")
        rec.edits.append({"op": "merge_linear", "first": first, "second": second, "bias": bias is not None})
    return session.finish(tol)


def replay(model: nn.Module, edit: dict) -> None:
    """Rebuild the skeleton of a merged pair: the second path gets an (empty) merged Linear, the first an Identity."""
    a, b = model.get_submodule(edit["first"]), model.get_submodule(edit["second"])
    set_module(model, edit["second"], nn.Linear(a.in_features, b.out_features, bias=edit["bias"],
                                                dtype=b.weight.dtype))
    set_module(model, edit["first"], nn.Identity())
