"""fold-bn: BatchNorm folded into the Conv/Linear next to it, using the BN's running statistics.

After a conv/linear:  y = s * (W x + b - mean) + beta, s = gamma / sqrt(var + eps)
                      -> W' = s[:, None...] * W, b' = s * (b - mean) + beta.
Before a conv/linear: conv(s * x + t) with t = beta - s * mean
                      -> W'[o, j] = W[o, j] * s[c(o, j)], b'[o] = b[o] + sum_{j,k} W[o, j, k] * t[c(o, j)],
                      exact only when the conv does not zero-pad (padding 0, or a replicate/reflect/circular
                      padding_mode, which commutes with a per-channel affine map).

Edges are found with torch.fx (`graph.call_graph`): conv -> bn where the conv output has no other user (bn -> conv
where the bn output has no other user). Folded BNs become nn.Identity, so the module tree and its forward stay as
they were. Linear <-> BatchNorm1d folds only when the BN saw 2-D (N, C) inputs on the sample inputs: on (N, C, L)
inputs BN normalises dim 1 while Linear acts on the last dim.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from compress.reparam.graph import call_graph, set_module
from compress.reparam.record import PassSession, Record, _few

NAME = "fold-bn"


def is_bn(m: nn.Module) -> bool:
    """A BatchNorm of any dimension (SyncBatchNorm included)."""
    return isinstance(m, _BatchNorm)


def _is_conv(m: nn.Module) -> bool:
    return isinstance(m, _ConvNd) and not isinstance(m, _ConvTransposeNd)


def _bn_affine(bn: _BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, t) in float64 with bn(x) = s * x + t per channel, from the running statistics."""
    var = bn.running_var.double()
    mean = bn.running_mean.double()
    s = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        s = s * bn.weight.detach().double()
    t = -mean * s
    if bn.bias is not None:
        t = t + bn.bias.detach().double()
    return s, t


def _set_weight_bias(layer: nn.Module, w: torch.Tensor, b: torch.Tensor) -> None:
    dtype = layer.weight.dtype
    with torch.no_grad():
        layer.weight.copy_(w.to(dtype))
        if layer.bias is None:
            layer.bias = nn.Parameter(b.to(dtype=dtype, device=layer.weight.device))
        else:
            layer.bias.copy_(b.to(dtype))


def fold_after(layer: nn.Module, bn: _BatchNorm) -> None:
    """layer (Conv/Linear) -> bn  ==>  layer'."""
    s, t = _bn_affine(bn)
    w = layer.weight.detach().double()
    b = layer.bias.detach().double() if layer.bias is not None else torch.zeros_like(s)
    _set_weight_bias(layer, w * s.view(-1, *([1] * (w.ndim - 1))), b * s + t)


def fold_before(bn: _BatchNorm, layer: nn.Module) -> None:
    """bn -> layer (Conv without zero padding / Linear)  ==>  layer'."""
    s, t = _bn_affine(bn)
    w = layer.weight.detach().double()
    b = layer.bias.detach().double() if layer.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    if isinstance(layer, nn.Linear):
        _set_weight_bias(layer, w * s.view(1, -1), b + w @ t)
        return
    out_ch, ipg = w.shape[:2]
    opg = out_ch // layer.groups
    idx = (torch.arange(out_ch) // opg).view(-1, 1) * ipg + torch.arange(ipg).view(1, -1)  # [out, in/groups]
    shape = (out_ch, ipg, *([1] * (w.ndim - 2)))
    new_b = b + (w * t[idx].view(shape)).flatten(1).sum(1)
    _set_weight_bias(layer, w * s[idx].view(shape), new_b)


def _pads(conv: _ConvNd) -> bool:
    """True when the conv zero-pads its input (then a BN before it does not fold exactly)."""
    if conv.padding_mode != "zeros":
        return False
    if isinstance(conv.padding, str):
        reach = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
        return conv.padding == "same" and any(r > 0 for r in reach)
    return any(p != 0 for p in conv.padding)


def _bn_problem(bn: _BatchNorm) -> str | None:
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        return "has no running statistics (track_running_stats=False): it always normalises by batch statistics"
    return None


def apply(model: nn.Module, sample_inputs: Any = None, before: bool = True, tol: float | None = None) -> Record:
    """Fold every BatchNorm that sits right after (or, with `before`, right before) a Conv/Linear into it."""
    session = PassSession(NAME, model, sample_inputs)
    rec = session.record
    bns = {n: m for n, m in model.named_modules() if is_bn(m)}
    odd = sorted({type(m).__name__ for m in model.modules() if "BatchNorm" in type(m).__name__ and not is_bn(m)})
    if odd:
        rec.notes.append(f"not handled (not a torch BatchNorm): {', '.join(odd)}")
    if not bns:
        rec.notes.append("no BatchNorm modules: nothing to fold")
        return session.finish(tol)
    modules = dict(model.named_modules())
    cg = call_graph(model, relevant=is_bn)
    session.run_reference(watch=list(bns.values()))
    ndim = {n: session.input_ndims.get(id(m)) for n, m in bns.items()}
    skipped: dict[str, str] = {}
    after_why: dict[str, str] = {}  # why a BN did not fold into the layer before it (it may still fold forward)
    done: set[str] = set()

    # 1. layer -> bn
    for name, bn in bns.items():
        problem = _bn_problem(bn)
        if problem:
            skipped[name] = problem
            continue
        call = cg.calls.get(name)
        if call is None:
            continue  # reported below
        if ndim[name] is None:
            skipped[name] = "not run by the sample inputs"
            continue
        src = call.source
        layer = modules.get(src) if src else None
        if isinstance(layer, _ConvTransposeNd):
            after_why[name] = f"after {type(layer).__name__} {src}: transposed convs are not folded"
            continue
        if layer is None or not (_is_conv(layer) or isinstance(layer, nn.Linear)):
            continue
        if cg.sole_user(src) != name or not cg.safe(src, name):
            after_why[name] = f"{src}'s output has other users, or one of them is shared/called more than once"
            continue
        if isinstance(layer, nn.Linear) and ndim[name] != 2:
            after_why[name] = (f"BatchNorm1d on {ndim[name]}-D input after Linear {src}: BN normalises dim 1, "
                               "the Linear acts on the last dim")
            continue
        if _is_conv(layer) and ndim[name] != len(layer.kernel_size) + 2:
            after_why[name] = f"unbatched input ({ndim[name]}-D) after {src}"
            continue
        fold_after(layer, bn)
        _replace(model, rec, name, src, "after", layer)
        done.add(name)

    # 2. bn -> layer (where exact)
    for name, bn in bns.items():
        if name in done or name in skipped or name not in cg.calls:
            continue
        user = cg.sole_user(name)
        layer = modules.get(user) if user else None
        if layer is None or not (_is_conv(layer) or isinstance(layer, nn.Linear)):
            skipped[name] = after_why.get(name) or ("not next to a Conv/Linear (e.g. on an identity/residual "
                                                    "branch, or between an activation and a non-linear user)")
            continue
        if not cg.safe(user, name):
            skipped[name] = f"{user} is shared or called more than once"
            continue
        if isinstance(layer, nn.Linear) and ndim[name] != 2:
            skipped[name] = f"BatchNorm1d on {ndim[name]}-D input before Linear {user}"
            continue
        if _is_conv(layer) and _pads(layer):
            skipped[name] = (f"before conv {user}, which zero-pads (padding={layer.padding}): padded zeros are "
                             "not BN outputs, so folding would change the border")
            continue
        if _is_conv(layer) and ndim[name] != len(layer.kernel_size) + 2:
            skipped[name] = f"unbatched input ({ndim[name]}-D) before {user}"
            continue
        if not before:
            skipped[name] = f"before {user}: not folded (before=False)"
            continue
        fold_before(bn, layer)
        _replace(model, rec, name, user, "before", layer)
        done.add(name)

    untraced = [n for n in bns if n not in cg.calls and n not in skipped]
    for n in untraced:
        skipped[n] = "called from code torch.fx could not trace"
    if skipped:
        rec.notes.append(f"{len(skipped)} of {len(bns)} BatchNorm modules not folded: "
                         + "; ".join(f"{n}: {why}" for n, why in list(skipped.items())[:8])
                         + ("; ..." if len(skipped) > 8 else ""))
    failed = [h for h in cg.how if "not traceable" in h] + cg.untraced
    if untraced and failed:
        rec.notes.append("fx could not trace: " + _few(failed))
    return session.finish(tol)


def _replace(model: nn.Module, rec: Record, bn_name: str, layer_name: str, where: str, layer: nn.Module) -> None:
    set_module(model, bn_name, nn.Identity())
    rec.changes.append(f"{bn_name} -> {layer_name}")
    rec.edits.append({"op": "fold_bn", "bn": bn_name, "into": layer_name, "where": where,
                      "bias": list(layer.bias.shape)})


def replay(model: nn.Module, edit: dict) -> None:
    """Rebuild the skeleton of a folded model: BN -> Identity, the layer gets a bias (values come from the file)."""
    layer = model.get_submodule(edit["into"])
    if layer.bias is None:
        layer.bias = nn.Parameter(torch.zeros(edit["bias"], dtype=layer.weight.dtype))
    set_module(model, edit["bn"], nn.Identity())
