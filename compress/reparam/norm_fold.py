"""fold-norm: the affine part of LayerNorm/RMSNorm folded into the Linear layers that read the norm's output.

norm(x) = g * n(x) + beta feeding y = W h + b   ==>   W' = W diag(g), b' = b + W beta; the norm keeps only n(x)
(weight set to its neutral value, bias to zeros). g is the weight for LayerNorm / torch RMSNorm / LlamaRMSNorm
(`weight * normalized`), and 1 + weight for Gemma's RMSNorm (`normalized * (1 + weight)`, neutral weight 0). Which
form a norm uses is measured, not guessed from its name: it is run with weight 0 and weight -1 (bias 0).

Where the norm's output goes:
  * transformers decoders: per family (blocks from compress.models.layers.layer_map): llama-style input_layernorm ->
    q/k/v_proj and post_attention_layernorm -> gate/up_proj (llama, qwen2/3, mistral, granite, smollm3, gemma);
    gemma2/3 pre_feedforward_layernorm -> gate/up (their post_*_layernorm normalise sublayer outputs into the
    residual stream: nothing to fold); phi3 fused qkv_proj / gate_up_proj; gpt2 ln_1 -> c_attn, ln_2 -> c_fc.
    Post-norm families (bert & co, olmo2) are refused: each norm's output also feeds the residual stream.
  * the final norm before the LM head: folded when the head is untied; when the head shares the embedding matrix it
    is skipped (noted) unless `untie=True`, which clones the head weight, sets config.tie_word_embeddings = False
    and folds.
  * any other nn.Module: torch.fx finds norms whose output is read only by Linear layers (each called once).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compress.reparam.graph import call_graph
from compress.reparam.record import PassSession, Record, _few, refuse

NAME = "fold-norm"
LLAMA = (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
         ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")))
GEMMA2 = (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
          ("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")))
FAMILY_TARGETS: dict[str, tuple] = {
    **{f: LLAMA for f in ("llama", "qwen2", "qwen3", "mistral", "granite", "smollm3", "gemma", "olmo")},
    **{f: GEMMA2 for f in ("gemma2", "gemma3", "gemma3_text")},
    "phi3": (("input_layernorm", ("self_attn.qkv_proj",)), ("post_attention_layernorm", ("mlp.gate_up_proj",))),
    "gpt2": (("ln_1", ("attn.c_attn",)), ("ln_2", ("mlp.c_fc",))),
}
FAMILY_NOTES = {f: "post_attention_layernorm/post_feedforward_layernorm normalise sublayer outputs into the residual "
                   "stream: nothing to fold there" for f in ("gemma2", "gemma3", "gemma3_text")}
POST_NORM = {"bert", "roberta", "xlm-roberta", "camembert", "electra", "distilbert", "mpnet", "olmo2"}


def is_norm(m: nn.Module) -> bool:
    """LayerNorm/RMSNorm-like: torch's, or a class named *LayerNorm / *RMSNorm (transformers' LlamaRMSNorm, ...)."""
    name = type(m).__name__
    return isinstance(m, (nn.LayerNorm, nn.RMSNorm)) or name.endswith(("RMSNorm", "LayerNorm"))


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"


def affine_style(norm: nn.Module) -> str | None:
    """'scale' (out = n(x) * w + b), 'offset' (out = n(x) * (1 + w) + b) or None when the norm has no weight.

    Raises ValueError when neither form fits."""
    w = getattr(norm, "weight", None)
    if not isinstance(w, torch.Tensor) or w.ndim != 1:
        return None
    b = getattr(norm, "bias", None)
    saved_w = w.detach().clone()
    saved_b = b.detach().clone() if isinstance(b, torch.Tensor) else None
    x = torch.randn(3, w.numel(), generator=torch.Generator().manual_seed(0), dtype=w.dtype)
    try:
        with torch.no_grad():
            if saved_b is not None:
                b.zero_()
            w.zero_()
            y0 = norm(x)
            w.fill_(-1.0)
            y1 = norm(x)
    finally:
        with torch.no_grad():
            w.copy_(saved_w)
            if saved_b is not None:
                b.copy_(saved_b)
    if float(y0.abs().max()) < 1e-6:
        return "scale"
    if float(y1.abs().max()) < 1e-6 and float(y0.abs().max()) > 1e-3:
        return "offset"
    raise ValueError(f"{type(norm).__name__}: its output is neither normalized*weight nor normalized*(1+weight)")


def _gain_bias(norm: nn.Module, style: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    g = norm.weight.detach().double()
    if style == "offset":
        g = 1.0 + g
    b = getattr(norm, "bias", None)
    return g, (b.detach().double() if isinstance(b, torch.Tensor) else None)


def _fold_into(layer: nn.Module, g: torch.Tensor, beta: torch.Tensor | None) -> None:
    """layer(g * h + beta) == layer'(h)."""
    conv1d = type(layer).__name__ == "Conv1D"  # transformers GPT-2 Conv1D: y = x @ W + b, W [in, out]
    w = layer.weight.detach().double()
    w_in_last = w.t() if conv1d else w  # [out, in]
    new_w = w_in_last * g.view(1, -1)
    with torch.no_grad():
        if beta is not None and bool((beta != 0).any()):
            shift = w_in_last @ beta
            if layer.bias is None:
                layer.bias = nn.Parameter(shift.to(layer.weight.dtype))
            else:
                layer.bias.copy_((layer.bias.detach().double() + shift).to(layer.bias.dtype))
        layer.weight.copy_((new_w.t() if conv1d else new_w).to(layer.weight.dtype))


def _neutralize(norm: nn.Module, style: str) -> None:
    with torch.no_grad():
        norm.weight.fill_(1.0 if style == "scale" else 0.0)
        b = getattr(norm, "bias", None)
        if isinstance(b, torch.Tensor):
            b.zero_()


def apply(model: nn.Module, sample_inputs: Any = None, untie: bool = False, tol: float | None = None) -> Record:
    """Fold every foldable norm's affine into the Linear layers after it (see the module docstring)."""
    session = PassSession(NAME, model, sample_inputs)
    rec = session.record
    norms = {n: m for n, m in model.named_modules() if n and is_norm(m)}
    if not norms:
        rec.notes.append("no LayerNorm/RMSNorm modules: nothing to fold")
        return session.finish(tol)
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", None)
    if family is not None:
        plan, final = _hf_plan(model, family, norms, rec, untie)
    else:
        plan, final = _fx_plan(model, norms, rec), None
    styles: dict[str, str] = {}
    todo = []
    no_weight = []
    for norm_name, targets in plan:
        norm = norms[norm_name]
        try:
            style = affine_style(norm)
        except ValueError as exc:
            raise refuse(f"{NAME}: {norm_name}: {exc}; cannot fold it") from exc
        if style is None:
            no_weight.append(norm_name)
            continue
        styles[norm_name] = style
        todo.append((norm_name, targets))
    if no_weight:
        rec.notes.append(f"{len(no_weight)} norm(s) have no affine weight: nothing to fold ({_few(no_weight)})")
    if any(s == "offset" for s in styles.values()):
        rec.notes.append("Gemma-style RMSNorm (normalized * (1 + weight)): folded 1 + weight, weight set to zeros")
    is_hf = family is not None
    modules = dict(model.named_modules())
    ready = []
    for norm_name, targets in todo:
        _, beta = _gain_bias(norms[norm_name], styles[norm_name])
        needs_bias = beta is not None and bool((beta != 0).any())
        missing = [t for t in targets if modules[t].bias is None] if needs_bias else []
        if missing and is_hf:
            rec.notes.append(f"{norm_name} not folded: it has a bias and {_few(missing)} has none (adding one would "
                             "not survive save_pretrained/from_pretrained)")
            continue
        ready.append((norm_name, targets, missing))
    if not ready:
        return session.finish(tol)
    session.run_reference()
    if final is not None and final.get("untie") and any(n == final["norm"] for n, _, _ in ready):
        _untie(model, final, rec)
    for norm_name, targets, missing in ready:
        g, beta = _gain_bias(norms[norm_name], styles[norm_name])
        for t in targets:
            _fold_into(modules[t], g, beta)
        _neutralize(norms[norm_name], styles[norm_name])
        rec.changes.append(f"{norm_name} -> {', '.join(targets)}")
        rec.edits.extend({"op": "add_bias", "module": t, "shape": [modules[t].bias.shape[0]]} for t in missing)
    return session.finish(tol)


def _hf_plan(model: nn.Module, family: str, norms: dict, rec: Record, untie: bool):
    from compress.models.layers import layer_map

    if family in POST_NORM:
        raise refuse(f"{NAME}: {family} is post-norm: every {type(next(iter(norms.values()))).__name__} output also "
                     "feeds the residual stream, so its affine cannot fold into the next Linear")
    if family not in FAMILY_TARGETS:
        raise refuse(f"{NAME}: no norm -> Linear layout known for model type '{family}' "
                     f"({type(next(iter(norms.values()))).__name__}); supported: {', '.join(sorted(FAMILY_TARGETS))}")
    lmap = layer_map(model)
    modules = dict(model.named_modules())
    plan = []
    for blk in lmap.blocks:
        for norm_child, targets in FAMILY_TARGETS[family]:
            n = f"{blk.path}.{norm_child}"
            ts = [f"{blk.path}.{t}" for t in targets]
            absent = [p for p in [n, *ts] if p not in modules]
            if absent:
                raise refuse(f"{NAME}: {family} block {blk.path} lacks {absent[0]}; its layout is not the one known "
                             "for this family")
            if not all(_is_linear(modules[t]) for t in ts):
                raise refuse(f"{NAME}: {ts} in {blk.path} are not all Linear layers (quantized or already "
                             "transformed?); fold norms on the float model")
            plan.append((n, ts))
    if family in FAMILY_NOTES:
        rec.notes.append(FAMILY_NOTES[family])
    final = None
    fn, head_name = lmap.final_norm, lmap.head
    if fn is None or fn not in norms:
        rec.notes.append("no final norm found")
    elif head_name is None or not _is_linear(modules.get(head_name)):
        rec.notes.append(f"final norm {fn}: no Linear LM head after it (encoder or base model): not folded")
    else:
        head = modules[head_name]
        emb = modules.get(lmap.embeddings) if lmap.embeddings else None
        tied = emb is not None and getattr(emb, "weight", None) is head.weight
        if tied and not untie:
            rec.notes.append(f"final norm {fn} skipped: the LM head {head_name} shares its weight with the embedding "
                             f"{lmap.embeddings} (tied); pass untie=True to clone the head and fold it "
                             f"(+{head.weight.numel():,} parameters)")
        else:
            plan.append((fn, [head_name]))
            final = {"norm": fn, "head": head_name, "embeddings": lmap.embeddings, "untie": tied}
            rec.notes.append(f"final norm {fn} folded into {head_name}: logits are unchanged, but the last hidden "
                             "state (output_hidden_states) is now the un-scaled normalized state")
    return plan, final


def _untie(model: nn.Module, final: dict, rec: Record) -> None:
    head = model.get_submodule(final["head"])
    head.weight = nn.Parameter(head.weight.detach().clone())
    config = model.config
    for cfg in {id(c): c for c in (config, _text_config(config))}.values():
        cfg.tie_word_embeddings = False
    rec.notes.append(f"untied {final['head']} from {final['embeddings']} (cloned the weight, "
                     f"+{head.weight.numel():,} parameters; config.tie_word_embeddings = False)")
    rec.edits.append({"op": "untie", "head": final["head"]})


def _text_config(config):
    try:
        return config.get_text_config(decoder=True)
    except (AttributeError, TypeError):
        return config


def _fx_plan(model: nn.Module, norms: dict, rec: Record) -> list:
    cg = call_graph(model, relevant=is_norm, leaf=is_norm)
    modules = dict(model.named_modules())
    plan, skipped = [], []
    for name, norm in norms.items():
        call = cg.calls.get(name)
        users = call.users if call else []
        ok = (call is not None and users and all(u is not None and _is_linear(modules[u]) for u in users)
              and cg.safe(name, *[u for u in users if u]) and len(set(users)) == len(users))
        shape = getattr(norm, "normalized_shape", None)
        if ok and shape is not None and len(tuple(shape)) != 1:
            ok = False
        if ok:
            plan.append((name, list(users)))
        else:
            skipped.append(name)
    if skipped:
        rec.notes.append(f"{len(skipped)} norm(s) not folded: their output is not read only by Linear layers (or "
                         f"they sit in code fx could not trace): {_few(skipped)}")
    return plan
