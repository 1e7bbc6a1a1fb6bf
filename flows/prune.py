"""`compress prune` as a function: validate the request, choose what to remove, remove it, evaluate, save."""

from __future__ import annotations

import copy
import math
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from compress.errors import UserError
from compress.inputs import check_data
from compress.prune.choices import BLOCK_METHOD, SPARSITY_GRANULARITY, WIDTH_IMPORTANCE, parse_pattern
from flows.options import DataOptions, ModelOptions, OutputOptions

AMOUNT = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*(%?)\s*$")
DEFAULT_TOKENS = {"blocks": 2048, "sublayers": 1024, "width": 1024, "sparsity": 1024}
SHARE_MODES = ("width", "sparsity")  # amounts are a share of every block, not a count of units
ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json", "1_Pooling")


@dataclass(kw_only=True)
class PruneRequest(OutputOptions, DataOptions, ModelOptions):
    """Everything `compress prune` was asked to do."""

    blocks: str | None = None  # "8" or "25%"
    sublayers: str | None = None
    width: str | None = None  # "25%": attention KV groups and FFN channels of every block
    sparsity: str | None = None  # "50%": weights of the block Linears zeroed (Wanda score)
    pattern: str = "unstructured"  # sparsity: unstructured | 2:4 (N:M)
    granularity: str = "block"  # sparsity --adaptive: one ratio per block or per Linear
    adaptive: bool = False  # width: per-block ratios by DP on measured distortion (same parameter count)
    importance: str = "activation"  # width: activation | taylor
    heal: int = 0  # distillation steps toward the original after pruning (0: none)
    heal_lr: float = 5e-5
    method: str | None = None  # blocks: bi | ablation | greedy (default); sublayers: greedy (FinerCut) only
    tokens: int | None = None  # calibration tokens; None: 2048 for blocks, 1024 for sublayers
    eval_tokens: int = 2048
    eval_data: str | None = None  # held-out text for the metrics (its evaluation split); None: the split of data
    evaluate: bool = True


def parse_amount(text: str, flag: str) -> tuple[float, bool]:
    """'8' -> (8, False); '25%' -> (25.0, True); refuses other forms and percentages outside (0, 100)."""
    m = AMOUNT.match(str(text))
    if not m:
        raise UserError(f"{flag} {text}: write a count (e.g. 8) or a percentage (e.g. 25%)")
    value, pct = float(m.group(1)), bool(m.group(2))
    if pct and not 0 < value < 100:
        raise UserError(f"{flag} {text}: a percentage must be inside (0, 100)")
    if not pct and (value != int(value) or value < 1):
        raise UserError(f"{flag} {text}: a count must be a whole number ≥ 1")
    return value, pct


def resolve_amount(text: str, flag: str, total: int, what: str) -> int:
    """How many of `total` units `text` removes (percentages rounded half up); at least one must stay."""
    value, pct = parse_amount(text, flag)
    count = math.floor(value / 100 * total + 0.5) if pct else int(value)
    if count < 1:
        raise UserError(f"{flag} {text}: {value:g}% of {total} {what} rounds to 0; ask for more")
    if count >= total:
        raise UserError(f"{flag} {text}: would remove {count} of the model's {total} {what}; at least one must stay")
    return count


def _amount(req: PruneRequest, mode: str) -> str:
    return {"blocks": req.blocks, "sublayers": req.sublayers, "width": req.width, "sparsity": req.sparsity}[mode]


def width_fraction(text: str, flag: str = "--width") -> float:
    """'25%' -> 0.25: the share of every block's width (or of its weights, for --sparsity) to remove."""
    value, pct = parse_amount(text, flag)
    if not pct:
        raise UserError(f"{flag} {text}: give a percentage of each block, e.g. 25%")
    return value / 100


def check_request(req: PruneRequest) -> str:
    """Check everything that needs no model; return the mode ('blocks', 'sublayers' or 'width')."""
    given = [m for m in MODES if _amount(req, m) is not None]
    if len(given) != 1:
        raise UserError("choose one: --blocks N|P% (whole blocks), --sublayers N|P% (FinerCut), --width P% "
                        "(heads and FFN channels) or --sparsity P% (weights)")
    mode = given[0]
    parse_amount(_amount(req, mode), f"--{mode}")
    if mode == "width":
        width_fraction(req.width)
        WIDTH_IMPORTANCE.check(req.importance)
    elif mode == "sparsity":
        width_fraction(req.sparsity, "--sparsity")
        parse_pattern(req.pattern)
        SPARSITY_GRANULARITY.check(req.granularity)
        if req.adaptive and req.pattern != "unstructured":
            raise UserError(f"--adaptive with --pattern {req.pattern}: N:M sparsity has one fixed ratio; drop "
                            "--adaptive or use --pattern unstructured")
    elif req.adaptive:
        raise UserError("--adaptive applies to --width and --sparsity (per-block ratios by DP)")
    BLOCK_METHOD.check(req.method, allow_none=True)
    if mode != "blocks" and req.method is not None and not (mode == "sublayers" and req.method == "greedy"):
        raise UserError(f"--method {req.method} applies to --blocks; --{mode} has its own search")
    if req.heal < 0:
        raise UserError(f"--heal {req.heal}: give a number of distillation steps ≥ 1 (or leave it out)")
    if not req.heal_lr > 0:
        raise UserError(f"--heal-lr {req.heal_lr}: give a positive learning rate, e.g. 5e-5")
    for flag, n in (("--tokens", req.tokens), ("--eval-tokens", req.eval_tokens)):
        if n is not None and n <= 0:
            raise UserError(f"{flag} {n}: must be a positive number of tokens")
    req.check_data()
    check_data(req.eval_data, "--eval-data")
    if req.out is not None and Path(req.out).exists() and not Path(req.out).is_dir():
        raise UserError(f"--out {req.out}: exists and is not a directory")
    return mode


def run_prune(req: PruneRequest, progress=None) -> dict:
    """Choose the units to remove on calibration windows, remove them, evaluate against the original on held-out
    windows and save: blocks as a plain transformers model, sublayers as an artifact dir `compress load` reads."""
    mode = check_request(req)
    from compress.data import load_split, load_windows
    from compress.evaluate import evaluate
    from compress.importance.context import ScoringContext
    from compress.models import layer_map, load_model

    t0 = time.perf_counter()
    loaded = load_model(req.model, arch=req.arch, trust_pickle=req.trust_pickle)
    if loaded.kind not in ("decoder", "encoder"):
        raise UserError(f"{req.model} is a {loaded.kind} model: pruning needs a transformer block stack")
    if "manifest" in loaded.extra:
        raise UserError(f"{req.model} is already a compress artifact: prune the float model, then quantize the "
                        "pruned one")
    lmap = layer_map(loaded.module)
    if mode == "width":
        from compress.prune.width import layout_of

        layout_of(loaded.module, lmap)  # refuses families without a known head/FFN layout before any work
    total_units = lmap.num_sublayers if mode == "sublayers" else lmap.num_blocks
    if total_units == 0:
        raise UserError(f"{req.model}: no attention/FFN sublayers found in its blocks; use --blocks")
    count = (resolve_amount(_amount(req, mode), f"--{mode}", total_units, mode) if mode not in SHARE_MODES
             else width_fraction(_amount(req, mode), f"--{mode}"))
    method = ("adaptive" if req.adaptive else "uniform") if mode in SHARE_MODES else req.method or "greedy"
    tokens = req.tokens or DEFAULT_TOKENS[mode]
    if req.eval_data is None:
        calib, heldout = load_split(req.data, loaded, tokens, req.eval_tokens, req.seq_len, req.seed)
    else:  # the held-out windows come from the other text: none are drawn from --data
        calib = load_windows(req.data, loaded, split="calibration", tokens=tokens, seq_len=req.seq_len, seed=req.seed)
        heldout = load_windows(req.eval_data, loaded, split="evaluation", tokens=req.eval_tokens, seq_len=req.seq_len,
                               seed=req.seed)
    reference = copy.deepcopy(loaded) if req.evaluate or req.heal else None
    params_before = _params(loaded.module)
    ctx = ScoringContext(loaded, lmap, calib, progress)
    result: dict = {"model": req.model, "mode": mode, "method": "finercut" if mode == "sublayers" else method,
                    "requested": _amount(req, mode), "count": count, "of": total_units,
                    "num_blocks": lmap.num_blocks, "sublayer_names": sorted({n for b in lmap.blocks
                                                                              for n in b.sublayers}),
                    "divergence": ctx.divergence_name, "calibration": calib.describe(), "notes": []}
    sel, rules, removed_modules = PRUNERS[mode](ctx, count, method, req, result)
    del ctx
    result["plan"] = {"rules": rules, "meta": {"mode": mode, "method": result["method"], "count": count,
                                               "calibration": calib.describe()}}
    result["selection"] = sel.to_dict()
    result["select_seconds"] = round(sel.seconds, 2)
    result["params_before"], result["params_after"] = params_before, _params(loaded.module)
    if req.heal:
        from compress.prune.heal import heal

        before = evaluate(loaded, reference, heldout, progress).to_dict()
        result["heal"] = {**heal(loaded, reference, calib, req.heal, req.heal_lr, progress), "metrics_before": before}
        result["notes"].append(f"healed {req.heal} steps (lr {req.heal_lr:g}) in {result['heal']['seconds']} s on "
                               "the calibration windows; metrics before healing: heal.metrics_before")
    if reference is not None:
        result["metrics"] = evaluate(loaded, reference, heldout, progress).to_dict()
        result["evaluation"] = heldout.describe()
        result["generalization"] = generalization(sel.divergence[-1], result["metrics"], result["divergence"])
    result["seconds"] = round(time.perf_counter() - t0, 2)
    if req.out is not None:
        _save(loaded, mode, removed_modules, Path(req.out), result)
        result["out"] = str(req.out)
    return result


def _prune_blocks(ctx, count: int, method: str, req: PruneRequest, result: dict) -> tuple:
    """--blocks: choose `count` whole blocks by `method`, drop them (renumbered, config trimmed)."""
    from compress.prune.blocks import remove_blocks, select_blocks

    lmap = ctx.lmap
    sel = select_blocks(ctx, count, method)
    record = remove_blocks(ctx.loaded.module, lmap, sel.removed)
    result["removed"] = sorted(sel.removed)
    result["blocks_after"] = record["num_blocks"]
    if record["config_lists_trimmed"]:
        result["notes"].append("per-layer config lists trimmed: " + ", ".join(record["config_lists_trimmed"]))
    return sel, {lmap.blocks[u].path: {"action": "remove"} for u in sel.removed}, None


def _prune_sublayers(ctx, count: int, method: str, req: PruneRequest, result: dict) -> tuple:
    """--sublayers: FinerCut's greedy removal of attention / FFN sublayers, replaced by their skip."""
    from compress.prune.sublayers import finercut, remove_sublayers

    lmap = ctx.lmap
    sel = finercut(ctx, count)
    removed_modules = remove_sublayers(ctx.loaded.module, lmap, sel.removed, ctx.loaded.kind)
    result["removed"] = [{"block": i, "sublayer": n, "params": lmap.blocks[i].sublayers[n].params}
                         for i, n in sel.removed]
    rules = {p: {"action": "remove"} for i, n in sel.removed for p in lmap.blocks[i].sublayers[n].paths}
    return sel, rules, removed_modules


def _prune_sparsity(ctx, fraction: float, method: str, req: PruneRequest, result: dict) -> tuple:
    """--sparsity: Wanda-scored weights zeroed, uniform or adaptive ratios, unstructured or N:M."""
    from compress.prune.sparsity_apply import prune_sparsity_request

    sel, record, rules = prune_sparsity_request(ctx, fraction, req.pattern, req.adaptive, req.granularity)
    result["removed"] = [{"block": int(i), **b} for i, b in record["blocks"].items()]
    result["sparsity"] = record
    return sel, rules, None


def _prune_width(ctx, fraction: float, method: str, req: PruneRequest, result: dict) -> tuple:
    """--width: KV groups and FFN channels of every block by importance, uniform or adaptive ratios."""
    from compress.prune.width_apply import prune_width_request

    sel, record, rules = prune_width_request(ctx, fraction, req.adaptive, req.importance)
    single = sel.scores[0]
    result["removed"] = [{"block": i, "attention_ratio": a, "ffn_ratio": f,
                          "kept_heads": len(record["layers"][i]["kept_heads"]),
                          "kept_channels": len(record["layers"][i]["kept_channels"]),
                          "distortion_alone": single.get((i, "distortion"))}
                         for i, (a, f) in ((i, record["ratios"][i]) for i in sorted(record["ratios"]))]
    result["width"] = record
    return sel, rules, None


# mode -> handler(ctx, amount, method, request, result) -> (Selection, rules per module, removed modules or None):
# chooses on calibration windows and changes the model in place; the flow around it loads, evaluates and saves
PRUNERS = {"blocks": _prune_blocks, "sublayers": _prune_sublayers, "width": _prune_width,
           "sparsity": _prune_sparsity}
MODES = tuple(PRUNERS)


def _save(loaded, mode: str, removed_modules: dict | None, out: Path, result: dict) -> None:
    """Blocks: save_pretrained + tokenizer + prune.json (no compress.json: it is a plain model). Sublayers: an
    artifact dir whose compress.json lists the Removed modules."""
    from compress.atomic import atomic_dir

    if mode == "sublayers":
        from compress.prune.artifact import save_pruned

        save_pruned(loaded, removed_modules or {}, out, {"prune": result, "metrics": result.get("metrics")})
        return
    if mode == "width":
        from compress.prune.width import save_width_pruned

        save_width_pruned(loaded, result["width"], out, {"prune": result, "metrics": result.get("metrics")})
        return
    import json

    with atomic_dir(out) as tmp:
        loaded.module.save_pretrained(tmp)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(tmp)
        src = loaded.path
        for name in ST_FILES if src is not None else ():
            p = Path(src) / name
            if p.is_dir():
                shutil.copytree(p, tmp / name)
            elif p.is_file():
                shutil.copy(p, tmp / name)
        (tmp / "prune.json").write_text(json.dumps(result, indent=2) + "\n")


def generalization(selection: float | None, metrics: dict, divergence: str) -> dict:
    """The divergence the choice reached on its own calibration windows beside the same measure on the held-out
    windows, and their ratio: well above 1 means the choice fitted its calibration text (overfitting)."""
    if divergence == "kl":
        heldout = metrics.get("kl_mean")
    else:  # encoders: 1 − cosine of pooled embeddings, the mean of which is 1 − the mean cosine
        heldout = None if metrics.get("emb_cosine") is None else 1.0 - metrics["emb_cosine"]
    ratio = heldout / selection if heldout is not None and selection else None
    return {"divergence": divergence, "selection": selection, "heldout": heldout,
            "heldout_over_selection": None if ratio is None else round(ratio, 4)}


def _params(module) -> int:
    """Parameters, tied tensors once."""
    return sum(p.numel() for p in module.parameters())
