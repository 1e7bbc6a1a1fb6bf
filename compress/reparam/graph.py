"""Which module feeds which: torch.fx call graphs of a model, with fallbacks for code fx cannot trace.

The passes need facts like "the output of conv `a` goes only to BatchNorm `b`". `call_graph` traces the model with
torch.fx (chosen module types kept as leaves); when the whole model does not trace (data-dependent control flow,
transformers models, ...), it traces each child instead, descending only into subtrees that contain a module the
pass cares about. A plain nn.Sequential that cannot be traced is read as a chain of its children. Modules that are
called more than once, registered under two names, or whose parameters are read directly (fx get_attr) are marked
unsafe: a fold would change their other uses too.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import fx, nn

# In eval mode these return their input unchanged: edges are followed through them.
PASSTHROUGH = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


@dataclass
class Call:
    """One call of a module in the traced graph."""

    path: str
    source: str | None = None  # module whose output is this call's sole tensor input (None: not a module / many)
    # modules reading this output as their sole input; None stands for any other use (functions, output, ...)
    users: list[str | None] = field(default_factory=list)


@dataclass
class CallGraph:
    """Module-level call facts for the traced parts of a model."""

    calls: dict[str, Call] = field(default_factory=dict)
    unsafe: set[str] = field(default_factory=set)
    untraced: list[str] = field(default_factory=list)  # "path (Type): reason" for subtrees fx could not trace
    how: list[str] = field(default_factory=list)

    def sole_user(self, path: str) -> str | None:
        """The module that is the only user of `path`'s output, when there is exactly one and it is a module."""
        call = self.calls.get(path)
        if call is None or len(call.users) != 1:
            return None
        return call.users[0]

    def safe(self, *paths: str) -> bool:
        """All `paths` were called exactly once in traced code and share nothing with other modules."""
        return all(p in self.calls and p not in self.unsafe for p in paths)


class _Tracer(fx.Tracer):
    def __init__(self, leaf: Callable[[nn.Module], bool]):
        super().__init__()
        self._leaf = leaf

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return self._leaf(m) or super().is_leaf_module(m, qualname)


def call_graph(model: nn.Module, relevant: Callable[[nn.Module], bool],
               leaf: Callable[[nn.Module], bool] = lambda m: False) -> CallGraph:
    """Trace `model` (falling back to its children where fx fails) and collect module call facts."""
    cg = CallGraph()
    counts: Counter[str] = Counter()
    _visit(model, "", relevant, leaf, cg, counts)
    cg.unsafe |= {p for p, n in counts.items() if n > 1}
    cg.unsafe |= _shared(model)
    return cg


def _visit(mod: nn.Module, prefix: str, relevant, leaf, cg: CallGraph, counts: Counter) -> None:
    if not any(relevant(m) for m in mod.modules()) or relevant(mod) and not list(mod.children()):
        return
    try:
        graph = _Tracer(leaf).trace(mod)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means: look inside instead
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        if type(mod).forward is nn.Sequential.forward:
            _sequence(mod, prefix, cg, counts)
            cg.how.append(f"{prefix or '<root>'}: read as a module sequence (fx: {reason})")
            for name, child in mod.named_children():
                _visit(child, _join(prefix, name), relevant, leaf, cg, counts)
            return
        children = list(mod.named_children())
        if not children:
            cg.untraced.append(f"{prefix or '<root>'} ({type(mod).__name__}): {reason}")
            return
        cg.how.append(f"{prefix or '<root>'} ({type(mod).__name__}) not traceable by fx ({reason}): traced its "
                      "children instead")
        for name, child in children:
            _visit(child, _join(prefix, name), relevant, leaf, cg, counts)
        return
    cg.how.append(f"{prefix or '<root>'}: traced with torch.fx")
    _read_graph(graph, mod, prefix, cg, counts)


def _read_graph(graph: fx.Graph, root: nn.Module, prefix: str, cg: CallGraph, counts: Counter) -> None:
    nodes = list(graph.nodes)
    mod_of = {n: _join(prefix, n.target) for n in nodes if n.op == "call_module"}
    for n in mod_of:
        m = root.get_submodule(n.target)
        n.meta["reparam_passthrough"] = isinstance(m, PASSTHROUGH) and not m.training
    for n in nodes:
        if n.op == "get_attr":  # a parameter read directly: its module must not change
            owner = str(n.target).rsplit(".", 1)[0] if "." in str(n.target) else ""
            if owner:
                cg.unsafe.add(_join(prefix, owner))
    for n, path in mod_of.items():
        counts[path] += 1
        if counts[path] > 1:
            continue
        call = Call(path)
        src = _sole_tensor_arg(n)
        src = _through(src, mod_of)
        call.source = mod_of.get(src) if src is not None else None
        call.users = _effective_users(n, mod_of)
        cg.calls[path] = call


def _sole_tensor_arg(n: fx.Node) -> fx.Node | None:
    if len(n.args) == 1 and not n.kwargs and isinstance(n.args[0], fx.Node):
        return n.args[0]
    return None


def _is_pass(n: fx.Node, mod_of) -> bool:
    return n in mod_of and n.meta.get("reparam_passthrough", False)


def _through(src: fx.Node | None, mod_of) -> fx.Node | None:
    """Follow a producer up through pass-through modules (Identity, Dropout in eval) that have one user."""
    while src is not None and _is_pass(src, mod_of) and len(src.users) == 1:
        src = _sole_tensor_arg(src)
    return src


def _effective_users(n: fx.Node, mod_of) -> list[str | None]:
    out: list[str | None] = []
    for u in n.users:
        if u in mod_of and _sole_tensor_arg(u) is n:
            if _is_pass(u, mod_of):
                out.extend(_effective_users(u, mod_of))
            else:
                out.append(mod_of[u])
        else:
            out.append(None)
    return out


def _sequence(seq: nn.Module, prefix: str, cg: CallGraph, counts: Counter) -> None:
    """An untraceable nn.Sequential: child i's output is child i+1's only input."""
    names = [n for n, c in seq.named_children() if not isinstance(c, PASSTHROUGH)]
    for i, name in enumerate(names):
        path = _join(prefix, name)
        counts[path] += 1
        cg.calls[path] = Call(path, _join(prefix, names[i - 1]) if i else None,
                              [_join(prefix, names[i + 1])] if i + 1 < len(names) else [None])


def _shared(model: nn.Module) -> set[str]:
    """Modules registered under two names, or holding a parameter another module also holds (tied weights)."""
    names: dict[int, list[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), []).append(n)
    out = {n for ns in names.values() if len(ns) > 1 for n in ns}
    owners: dict[int, list[str]] = {}
    for mn, m in model.named_modules(remove_duplicate=False):
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), []).append(mn)
    out |= {n for ns in owners.values() if len(set(ns)) > 1 for n in ns}
    return out


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else str(name)


def set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Replace the submodule at `path` (e.g. 'features.0.1') with `new`."""
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, new)
