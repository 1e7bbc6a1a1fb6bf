"""The repeated block stack of a model and parameter counts: the two structural facts both the LayerMap and the MoE
layout start from (a module of its own so neither has to import the other)."""

from __future__ import annotations

from torch import nn

from compress.errors import UserError


def find_block_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The largest nn.ModuleList (by parameters) whose entries are all of one class: the repeated blocks."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) >= 1 and len({type(m) for m in mod}) == 1:
            size = count_params(mod)
            if size > 0 and (best is None or size > best[0]):
                best = (size, name, mod)
    if best is None:
        raise UserError(f"{type(model).__name__}: no repeated block stack (nn.ModuleList of identical blocks) "
                        "found; this architecture is not supported yet")
    return best[1], best[2]


def count_params(module: nn.Module) -> int:
    """Parameters of `module`, tied (shared) tensors counted once."""
    seen: set[int] = set()
    total = 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
