"""merge-branches: RepVGG-style blocks (output = sum of parallel linear branches) become one kxk conv.

Convention (as in the official RepVGG code, github.com/DingXiaoH/RepVGG): a block exposes its branches as
attributes and its forward uses `self.rbr_reparam` when that attribute exists:

  rbr_dense     kxk conv + BN: an nn.Sequential with `conv` and `bn` (the BN may already be an nn.Identity after
                fold-bn), or a bare Conv2d (with bias)
  rbr_1x1       1x1 conv + BN, same form, padding 0 (optional, None allowed)
  rbr_identity  BatchNorm2d over the input channels, or nn.Identity (optional, None allowed; needs in == out and
                stride 1)

Merge: each branch becomes a kxk kernel and a bias (the 1x1 kernel zero-padded to kxk; the identity a kxk kernel
with a 1 at the centre of each channel's own in-group slot, groups respected), their sum becomes `rbr_reparam`, and
the branch attributes are deleted (as the official `switch_to_deploy` does). Whatever follows the sum
(nonlinearity, SE) is left alone. Blocks whose forward does not mention `rbr_reparam` are refused: the merge would
be ignored by their forward. MobileOne-style blocks (several kxk branches, `rbr_scale`) are not handled.

`RepVGGBlock` and `TinyRepVGG` are a small model in this convention to test and benchmark the pass.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from compress.reparam.bn_fold import _bn_affine
from compress.reparam.record import PassSession, Record, refuse

NAME = "merge-branches"
BRANCHES = ("rbr_dense", "rbr_1x1", "rbr_identity")


def conv_bn(inp: int, out: int, kernel: int, stride: int, padding: int, groups: int = 1) -> nn.Sequential:
    """Conv2d (no bias) + BatchNorm2d as an nn.Sequential with children `conv` and `bn` (official RepVGG layout)."""
    return nn.Sequential(OrderedDict([
        ("conv", nn.Conv2d(inp, out, kernel, stride, padding, groups=groups, bias=False)),
        ("bn", nn.BatchNorm2d(out)),
    ]))


class RepVGGBlock(nn.Module):
    """relu(3x3 conv+BN  +  1x1 conv+BN  +  identity BN); after the merge: relu(rbr_reparam(x))."""

    def __init__(self, inp: int, out: int, stride: int = 1, groups: int = 1):
        super().__init__()
        self.in_channels, self.out_channels, self.stride, self.groups = inp, out, stride, groups
        self.rbr_dense = conv_bn(inp, out, 3, stride, 1, groups)
        self.rbr_1x1 = conv_bn(inp, out, 1, stride, 0, groups)
        self.rbr_identity = nn.BatchNorm2d(inp) if inp == out and stride == 1 else None
        self.nonlinearity = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "rbr_reparam"):
            return self.nonlinearity(self.rbr_reparam(x))
        y = self.rbr_dense(x) + self.rbr_1x1(x)
        if self.rbr_identity is not None:
            y = y + self.rbr_identity(x)
        return self.nonlinearity(y)


class TinyRepVGG(nn.Module):
    """A small RepVGG-style classifier: stages of RepVGGBlocks (first of each stride 2) -> global pool -> Linear."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, ...] = (16, 32, 64),
                 depths: tuple[int, ...] = (1, 2, 2), in_channels: int = 3, groups: int = 1):
        super().__init__()
        self.arch_config = {"num_classes": num_classes, "widths": list(widths), "depths": list(depths),
                            "in_channels": in_channels, "groups": groups}
        blocks: list[nn.Module] = []
        ch = in_channels
        for w, d in zip(widths, depths, strict=True):
            for i in range(d):
                g = groups if (i > 0 and ch % groups == 0 and w % groups == 0) else 1
                blocks.append(RepVGGBlock(ch, w, stride=2 if i == 0 else 1, groups=g))
                ch = w
        self.stages = nn.Sequential(*blocks)
        self.head = nn.Linear(ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.stages(x), 1)
        return self.head(torch.flatten(x, 1))


def is_branchy(m: nn.Module) -> bool:
    """A module exposing RepVGG branches by the convention above (not yet merged)."""
    return "rbr_dense" in m._modules and any(b in m.__dict__ or b in m._modules for b in ("rbr_1x1", "rbr_identity"))


def _branch_conv(branch: nn.Module, what: str) -> tuple[nn.Conv2d, nn.Module | None]:
    if isinstance(branch, nn.Conv2d):
        return branch, None
    if isinstance(branch, nn.Sequential) and "conv" in branch._modules:
        kids = list(branch._modules.items())
        conv = branch._modules["conv"]
        bn = branch._modules.get("bn")
        extra = [n for n, _ in kids if n not in ("conv", "bn")]
        if isinstance(conv, nn.Conv2d) and not extra and (bn is None or isinstance(bn, (nn.BatchNorm2d, nn.Identity))):
            return conv, bn
    raise ValueError(f"{what} is {type(branch).__name__}: expected a Conv2d or an nn.Sequential(conv, bn)")


def _kernel_bias(conv: nn.Conv2d, bn: nn.Module | None, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = conv.weight.detach().double()
    b = conv.bias.detach().double() if conv.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    if isinstance(bn, nn.BatchNorm2d):
        s, t = _bn_affine(bn)
        w, b = w * s.view(-1, 1, 1, 1), b * s + t
    pad = (k - w.shape[-1]) // 2
    return nn.functional.pad(w, [pad] * 4), b


def _identity_kernel(ident: nn.Module, channels: int, groups: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    ipg = channels // groups
    w = torch.zeros(channels, ipg, k, k, dtype=torch.float64)
    w[torch.arange(channels), torch.arange(channels) % ipg, k // 2, k // 2] = 1.0
    b = torch.zeros(channels, dtype=torch.float64)
    if isinstance(ident, nn.BatchNorm2d):
        s, t = _bn_affine(ident)
        w, b = w * s.view(-1, 1, 1, 1), t
    return w, b


def _plan(block: nn.Module, path: str) -> tuple[nn.Conv2d, list]:
    """Validate one block; return its dense conv and the branch list [(kind, conv, bn)]."""
    def bad(why: str) -> Exception:
        return refuse(f"{NAME}: cannot merge {path} ({type(block).__name__}): {why}")

    try:
        src = inspect.getsource(type(block).forward)
    except (OSError, TypeError):
        src = ""
    if "rbr_reparam" not in src:
        raise bad("its forward does not use `rbr_reparam`, so a merged conv would be ignored (RepVGG convention: "
                  "forward returns from self.rbr_reparam when it exists)")
    try:
        dense, dense_bn = _branch_conv(block.rbr_dense, "rbr_dense")
        one = getattr(block, "rbr_1x1", None)
        one_conv, one_bn = _branch_conv(one, "rbr_1x1") if one is not None else (None, None)
    except ValueError as exc:
        raise bad(str(exc)) from exc
    k = dense.kernel_size[0]
    if dense.kernel_size != (k, k) or k % 2 == 0:
        raise bad(f"rbr_dense kernel {dense.kernel_size} is not square and odd")
    if dense.dilation != (1, 1) or dense.padding != (k // 2, k // 2) or dense.padding_mode != "zeros":
        raise bad(f"rbr_dense needs dilation 1 and zero padding {k // 2} (has dilation {dense.dilation}, padding "
                  f"{dense.padding}, mode {dense.padding_mode})")
    branches: list = [("dense", dense, dense_bn)]
    if one_conv is not None:
        same = (one_conv.in_channels, one_conv.out_channels, one_conv.stride, one_conv.groups) == \
               (dense.in_channels, dense.out_channels, dense.stride, dense.groups)
        if one_conv.kernel_size != (1, 1) or one_conv.padding != (0, 0) or one_conv.dilation != (1, 1) or not same:
            raise bad("rbr_1x1 must be a 1x1 conv with padding 0 and the dense conv's channels, stride and groups")
        branches.append(("1x1", one_conv, one_bn))
    ident = getattr(block, "rbr_identity", None)
    if ident is not None:
        if not isinstance(ident, (nn.BatchNorm2d, nn.Identity)):
            raise bad(f"rbr_identity is {type(ident).__name__}: expected BatchNorm2d, nn.Identity or None")
        if dense.in_channels != dense.out_channels or dense.stride != (1, 1):
            raise bad("rbr_identity needs in_channels == out_channels and stride 1")
        branches.append(("identity", ident, None))
    for kind, _, bn in branches:
        bn = bn if kind != "identity" else branches[-1][1]
        if isinstance(bn, nn.BatchNorm2d) and (not bn.track_running_stats or bn.running_var is None):
            raise bad(f"the {kind} branch BatchNorm has no running statistics")
    return dense, branches


def merge_block(block: nn.Module, path: str = "block", compute: bool = True) -> nn.Conv2d:
    """Replace the branches of one RepVGG-style block by `rbr_reparam` (a kxk conv); returns the new conv."""
    dense, branches = _plan(block, path)
    k = dense.kernel_size[0]
    conv = nn.Conv2d(dense.in_channels, dense.out_channels, k, dense.stride, k // 2, groups=dense.groups, bias=True)
    conv = conv.to(dtype=dense.weight.dtype, device=dense.weight.device)
    if compute:
        w = torch.zeros(conv.weight.shape, dtype=torch.float64)
        b = torch.zeros(conv.out_channels, dtype=torch.float64)
        for kind, mod, bn in branches:
            if kind == "identity":
                kw, kb = _identity_kernel(mod, dense.in_channels, dense.groups, k)
            else:
                kw, kb = _kernel_bias(mod, bn, k)
            w, b = w + kw, b + kb
        with torch.no_grad():
            conv.weight.copy_(w.to(conv.weight.dtype))
            conv.bias.copy_(b.to(conv.bias.dtype))
    for name in (*BRANCHES, "id_tensor"):
        if name in block._modules or name in block.__dict__:
            delattr(block, name)
    block.rbr_reparam = conv
    if hasattr(block, "deploy"):
        block.deploy = True
    return conv


def apply(model: nn.Module, sample_inputs: Any = None, tol: float | None = None) -> Record:
    """Merge every RepVGG-style block of `model` into a single conv (see the module docstring)."""
    session = PassSession(NAME, model, sample_inputs)
    rec = session.record
    blocks = [(n, m) for n, m in model.named_modules() if is_branchy(m)]
    merged = [n for n, m in model.named_modules() if "rbr_reparam" in m._modules]
    if merged:
        rec.notes.append(f"{len(merged)} block(s) already merged (have rbr_reparam): left alone")
    if not blocks:
        rec.notes.append("no RepVGG-style blocks (modules with rbr_dense plus rbr_1x1/rbr_identity): nothing to merge")
        return session.finish(tol)
    for path, block in blocks:
        _plan(block, path or "<root>")  # refuse before changing anything
    session.run_reference()
    for path, block in blocks:
        n_branches = len(_plan(block, path)[1])
        conv = merge_block(block, path)
        rec.changes.append(path)
        rec.edits.append({"op": "merge_branches", "block": path})
        if n_branches == 1:
            rec.notes.append(f"{path}: only rbr_dense present")
        del conv
    return session.finish(tol)


def replay(model: nn.Module, edit: dict) -> None:
    """Rebuild the skeleton of a merged model: the block gets an (empty) rbr_reparam, its branches go."""
    merge_block(model.get_submodule(edit["block"]), edit["block"], compute=False)
