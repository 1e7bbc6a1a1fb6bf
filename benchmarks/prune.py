"""Block and sublayer pruning figures (issue 5), written to the `## Pruning` section of BENCHMARKS.md.

One run, one process: calibration windows from the Austen novels except persuasion.txt; 25% of blocks removed
(rounded half up: 8 of SmolLM2's 30) by one-shot Block Influence, one-shot skip KL and greedy re-measured KL; then
FinerCut (greedy over attention/FFN sublayers) until the model has no more parameters than the block-pruned ones.
Every pruned model is evaluated against the original on the ANCHORS.md windows (persuasion.txt, first 6 × 512).

    python benchmarks/prune.py --model smollm2-135m
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
AUSTEN = REPO.parent / "shared" / "data" / "text" / "austen"
CALIB = ",".join(str(p) for p in sorted(AUSTEN.glob("*.txt")) if p.name != "persuasion.txt")
HEADING = "Pruning: blocks and FinerCut sublayers (issue 5)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--blocks", default="25%")
    ap.add_argument("--calib-tokens", type=int, default=2048)
    ap.add_argument("--finercut-tokens", type=int, default=512)
    ap.add_argument("--methods", default="bi,ablation,greedy")
    ap.add_argument("--encoder", default="minilm-l6", help="Encoder pruned by 2 blocks first ('' to skip)")
    ap.add_argument("--only", choices=("all", "blocks", "width", "finercut"), default="all",
                    help="finercut / width: keep the other rows of the last run (results JSON), rerun that part only")
    ap.add_argument("--width", default="25%", help="Width pruning share (uniform and adaptive)")
    ap.add_argument("--sparsity", default="50%", help="Weight sparsity rows (uniform, adaptive, 2:4); '' to skip")
    ap.add_argument("--heal", type=int, default=48, help="Distillation steps on the best block-pruned model (0: skip)")
    ap.add_argument("--heal-lr", type=float, default=5e-5)
    ap.add_argument("--heal-tokens", type=int, default=8192, help="Calibration tokens the healing cycles over")
    ap.add_argument("--merge", action="store_true", help="Add this run's rows to the last run's (results JSON)")
    ap.add_argument("--out", type=Path, default=None, help="Markdown file (default BENCHMARKS.md)")
    a = ap.parse_args()

    from compress.data import load_windows
    from compress.evaluate import evaluate
    from compress.importance.context import ScoringContext
    from compress.models import layer_map, load_model
    from compress.prune.blocks import remove_blocks, select_blocks
    from compress.prune.sublayers import finercut, remove_sublayers
    from flows.prune import resolve_amount

    sys.path.insert(0, str(REPO / "benchmarks"))
    from export_quant import torch_decode_ms

    torch.set_num_threads(2)
    t_start = time.perf_counter()
    ref = load_model(a.model)
    lmap = layer_map(ref.module)
    calib = load_windows(CALIB, ref, split="calibration", tokens=a.calib_tokens)
    anchors = load_windows(str(AUSTEN / "persuasion.txt"), ref, split="all", tokens=3072, seq_len=512,
                           sequential=True)
    count = resolve_amount(a.blocks, "--blocks", lmap.num_blocks, "blocks")
    params0 = sum(p.numel() for p in ref.module.parameters())
    name = Path(a.model).name if Path(a.model).exists() else a.model
    raw = REPO / "benchmarks" / "results" / f"prune-{name}.json"
    raw.parent.mkdir(parents=True, exist_ok=True)
    state: dict = {"model": a.model, "count": count, "num_blocks": lmap.num_blocks, "params": params0, "rows": [],
                   "calibration": calib.describe(), "finercut": None}

    prompt = anchors.input_ids[:1, :64].numpy()

    def measure(label: str, cand, sel, extra: dict | None = None) -> dict:
        r = evaluate(cand, ref, anchors)
        row = {"label": label, "params": sum(p.numel() for p in cand.module.parameters()), "kl_mean": r.kl_mean,
               "decode_ms": round(torch_decode_ms(cand.module, prompt, 4, 24), 2),
               "kl_p99": r.kl_p99, "top1": r.top1_agreement, "ppl": r.ppl, "ppl_ref": r.ppl_ref,
               "select_s": round(sel.seconds, 1), "removed": sel.to_dict()["removed"],
               "calib_divergence": sel.divergence[-1], **(extra or {})}
        print(json.dumps(row), flush=True)
        state["rows"].append(row)
        return row

    def publish() -> None:
        command = "python benchmarks/prune.py " + " ".join(sys.argv[1:])
        state["commands"] = [c for c in state.get("commands", []) if c != command] + [command]
        state["seconds"] = round(state.get("seconds_before", 0) + time.perf_counter() - t_start, 1)
        raw.write_text(json.dumps(state, indent=1))
        _write_section(a, state, anchors)

    if a.only in ("finercut", "width") or a.merge:
        state = {**json.loads(raw.read_text())}
        state["seconds_before"] = state.get("seconds", 0)  # the part of the run this one adds to
        if a.only == "finercut":
            state["rows"] = [r for r in state["rows"] if r["kind"] != "sublayers"]
            state["finercut"] = None
        if a.only == "width":
            state["rows"] = [r for r in state["rows"] if r["kind"] != "width"]
    elif a.encoder:
        state["encoder"] = _encoder(a.encoder, a.methods.split(","), a.calib_tokens)
        publish()
    state["original_decode_ms"] = round(torch_decode_ms(ref.module, prompt, 4, 24), 2)
    ctx = ScoringContext(ref, lmap, calib)
    block_params = params0 - sum(sorted(b.params for b in lmap.blocks)[:count])
    best = None
    for method in a.methods.split(",") if a.only in ("all", "blocks") else []:
        sel = select_blocks(ctx, count, method)
        cand = copy.deepcopy(ref)
        remove_blocks(cand.module, layer_map(cand.module), sel.removed)
        row = measure(f"{method}: {count} blocks", cand, sel, {"kind": "blocks", "method": method,
                                                              "calib_tokens": calib.num_tokens})
        block_params = row["params"]
        if best is None or row["kl_mean"] < best[0]["kl_mean"]:
            best = (row, cand, sel)
        del cand
        publish()
    del ctx
    if best is not None and a.heal:
        from compress.prune.heal import heal

        row, cand, sel = best
        heal_windows = load_windows(CALIB, ref, split="calibration", tokens=a.heal_tokens)
        h = heal(cand, ref, heal_windows, a.heal, a.heal_lr)
        measure(f"{row['label']} + heal {a.heal} steps", cand, sel,
                {"kind": "blocks-healed", "method": row["method"], "calib_tokens": calib.num_tokens,
                 "heal_s": h["seconds"], "heal_tokens": heal_windows.num_tokens, "heal_lr": a.heal_lr,
                 "kl_before_heal": row["kl_mean"]})
        publish()
    best = None
    if a.only == "blocks":
        return
    if a.only in ("all", "width"):
        _width_rows(a, ref, measure, publish)
        if a.sparsity:
            _sparsity_rows(a, ref, measure, publish)
    if a.only == "width":
        return

    fc_calib = load_windows(CALIB, ref, split="calibration", tokens=a.finercut_tokens)
    fc_ctx = ScoringContext(ref, lmap, fc_calib)
    sel = finercut(fc_ctx, max_params=block_params)
    del fc_ctx
    quarter = resolve_amount("25%", "--sublayers", lmap.num_sublayers, "sublayers")
    for k in sorted({quarter, len(sel.removed)}):
        if k > len(sel.removed):
            continue
        part = copy.deepcopy(sel)
        part.removed, part.divergence = sel.removed[:k], sel.divergence[:k]
        cand = copy.deepcopy(ref)
        remove_sublayers(cand.module, layer_map(cand.module), part.removed, cand.kind)
        what = "equal params" if k == len(sel.removed) else "25% of sublayers"
        measure(f"FinerCut: {k} sublayers ({what})", cand, part, {"kind": "sublayers", "method": "finercut",
                                                                  "calib_tokens": fc_calib.num_tokens,
                                                                  "select_s": round(sel.seconds, 1)})
        del cand
    state["finercut"] = {"order": [f"{i}.{n}" for i, n in sel.removed], "divergence": sel.divergence,
                         "seconds": round(sel.seconds, 1), "calib_tokens": fc_calib.num_tokens,
                         "sublayer_params": {f"{b.index}.{n}": s.params for b in lmap.blocks
                                             for n, s in b.sublayers.items()}}
    _plot(a.model, lmap, sel, REPO / "benchmarks" / "results" / f"prune-finercut-{name}.png")
    publish()


def _width_rows(a, ref, measure, publish) -> None:
    """Width pruning at --width, uniform and adaptive (DP, same parameter count), each on its own copy."""
    from compress.data import load_windows
    from compress.importance.context import ScoringContext
    from compress.models import layer_map
    from compress.prune.width_apply import prune_width_request
    from flows.prune import width_fraction

    calib = load_windows(CALIB, ref, split="calibration", tokens=1024)
    for adaptive in (False, True):
        cand = copy.deepcopy(ref)
        ctx = ScoringContext(cand, layer_map(cand.module), calib)
        sel, record, _ = prune_width_request(ctx, width_fraction(a.width), adaptive)
        del ctx
        ratios = record["ratios"]
        mix = sorted({f"{r[0]:.0%}/{r[1]:.0%}" for r in ratios.values()})
        measure(f"width {a.width} {'adaptive (DP)' if adaptive else 'uniform'}", cand, sel,
                {"kind": "width", "method": "adaptive" if adaptive else "uniform", "calib_tokens": calib.num_tokens,
                 "ratios": {str(k): v for k, v in ratios.items()}, "mix": mix})
        del cand
        publish()


def _sparsity_rows(a, ref, measure, publish) -> None:
    """Weight sparsity at --sparsity (Wanda score), uniform and block-adaptive (DP, same number of zeros), and 2:4."""
    from compress.data import load_windows
    from compress.importance.context import ScoringContext
    from compress.models import layer_map
    from compress.prune.sparsity_apply import prune_sparsity_request
    from flows.prune import width_fraction

    calib = load_windows(CALIB, ref, split="calibration", tokens=1024)
    frac = width_fraction(a.sparsity, "--sparsity")
    cases = [("uniform", "unstructured", False), ("adaptive (DP)", "unstructured", True)]
    if abs(frac - 0.5) < 1e-9:
        cases.append(("2:4", "2:4", False))
    for label, pattern, adaptive in cases:
        cand = copy.deepcopy(ref)
        ctx = ScoringContext(cand, layer_map(cand.module), calib)
        sel, record, _ = prune_sparsity_request(ctx, frac, pattern, adaptive)
        del ctx
        measure(f"sparsity {a.sparsity} {label}", cand, sel,
                {"kind": "sparsity", "method": label, "calib_tokens": calib.num_tokens,
                 "zeros": record["zeros"], "weights": record["weights"],
                 "block_sparsity": {str(k): round(v["sparsity"], 3) for k, v in record["blocks"].items()}})
        del cand
        publish()


def _encoder(spec: str, methods: list[str], tokens: int) -> dict:
    """2 blocks of the encoder removed by each method: embedding cosine to the original on persuasion.txt."""
    from compress.data import load_windows
    from compress.evaluate import evaluate
    from compress.importance.context import ScoringContext
    from compress.models import layer_map, load_model
    from compress.prune.blocks import remove_blocks, select_blocks

    ref = load_model(spec)
    lmap = layer_map(ref.module)
    calib = load_windows(CALIB, ref, split="calibration", tokens=tokens)
    held = load_windows(str(AUSTEN / "persuasion.txt"), ref, split="all", tokens=3072, sequential=True)
    ctx = ScoringContext(ref, lmap, calib)
    rows = []
    for method in methods:
        sel = select_blocks(ctx, 2, method)
        cand = copy.deepcopy(ref)
        remove_blocks(cand.module, layer_map(cand.module), sel.removed)
        r = evaluate(cand, ref, held)
        rows.append({"method": method, "removed": sel.to_dict()["removed"], "emb_cosine": r.emb_cosine,
                     "calib_divergence": sel.divergence[-1], "select_s": round(sel.seconds, 2),
                     "params": sum(p.numel() for p in cand.module.parameters())})
        print(json.dumps(rows[-1]), flush=True)
    return {"model": spec, "num_blocks": lmap.num_blocks, "params": sum(p.numel() for p in ref.module.parameters()),
            "calib_tokens": calib.num_tokens, "eval_windows": held.describe(), "rows": rows}


def _plot(model: str, lmap, sel, path: Path) -> None:
    from compress.prune.plot import plot_removed

    result = {"model": model, "mode": "sublayers", "method": "finercut", "num_blocks": lmap.num_blocks,
              "sublayer_names": sorted({n for b in lmap.blocks for n in b.sublayers}), "of": lmap.num_sublayers,
              "selection": sel.to_dict(), "divergence": "kl"}
    plot_removed(result, path)


def _write_section(a, state: dict, anchors) -> None:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.machine())
    n, blocks = state["count"], state["num_blocks"]
    cmds = " then ".join(f"`{c}`" for c in state.get("commands") or [f"python benchmarks/prune.py --model {a.model}"])
    lines = [f"Written by {cmds} on {time.strftime('%Y-%m-%d')} ({cpu}, "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}, Python {platform.python_version()}; "
             f"whole run {state.get('seconds', 0):.0f} s).",
             f"{a.blocks} of {blocks} blocks, rounded half up = **{n} blocks** removed. Choice on "
             f"{state['calibration']['tokens']} calibration tokens (Austen novels except persuasion.txt, "
             f"sha256 {state['calibration']['sha256'][:12]})"
             + (f"; FinerCut on the first {state['finercut']['calib_tokens']} of them (it measures candidates × "
                "removals)" if state.get("finercut") else "")
             + ". Evaluation: ANCHORS.md windows (persuasion.txt in order, first "
             f"6 × 512 = {anchors.num_tokens} tokens); KL = mean per-token KL(original ‖ pruned). `select s` = wall "
             "time of choosing (replaying cached hidden states from the first changed block), one run."
             + (f" {state['note']}" if state.get("note") else "")]
    ppl_ref = state["rows"][0]["ppl_ref"] if state["rows"] else float("nan")
    dec0 = state.get("original_decode_ms")
    lines += ["", f"| pruned model | params | KL | KL p99 | top-1 | ppl (original {ppl_ref:.2f}) | calibration KL | "
              "select s | decode ms/token (× original) | removed |", "|---|---|---|---|---|---|---|---|---|---|",
              f"| original | {state['params']:,} | 0 | 0 | 1 | {ppl_ref:.2f} | 0 | - | {dec0 or '-'} | - |"]
    for r in state["rows"]:
        if r["kind"] == "blocks" and r["calib_tokens"] != state["calibration"]["tokens"]:
            r = {**r, "label": f"{r['label']} ({r['calib_tokens']} calibration tokens)"}
        removed = (", ".join(r["removed"]) if r["kind"].startswith("blocks") else
                   "attention/FFN per block: " + ", ".join(r["mix"]) if r["kind"] == "width" else
                   f"{r['zeros']:,} of {r['weights']:,} block weights zero; per block "
                   f"{min(r['block_sparsity'].values()):.0%}–{max(r['block_sparsity'].values()):.0%}"
                   if r["kind"] == "sparsity" else f"{len(r['removed'])} (see below)")
        dec = r.get("decode_ms")
        dec = "-" if dec is None else f"{dec} ({dec / dec0:.2f}×)" if dec0 else f"{dec}"
        lines.append(f"| {r['label']} | {r['params']:,} | {r['kl_mean']:.4f} | {r['kl_p99']:.3f} | {r['top1']:.3f} | "
                     f"{r['ppl']:.2f} | {r['calib_divergence']:.4f} | {r['select_s']} | {dec} | {removed} |")
    bi = next((r for r in state["rows"] if r.get("method") == "bi"), None)
    ours = [r for r in state["rows"] if r.get("method") != "bi" and (r["kind"] == "blocks" or "equal" in r["label"])]
    if bi and ours:
        best = min(ours, key=lambda r: r["kl_mean"])
        lines += ["", f"Best of ours vs one-shot BI: {best['label']} KL {best['kl_mean']:.4f} = "
                      f"**{best['kl_mean'] / bi['kl_mean']:.2f}×** BI's {bi['kl_mean']:.4f} (target ≤ 0.8×)."]
    healed = next((r for r in state["rows"] if r["kind"] == "blocks-healed"), None)
    if healed:
        lines += ["", f"Healing ({healed['label']}): {healed['heal_tokens']} calibration tokens cycled in windows of "
                      f"512, AdamW lr {healed['heal_lr']:g}, all weights trained, {healed['heal_s']:.0f} s on 2 "
                      f"cores: KL {healed['kl_before_heal']:.4f} → {healed['kl_mean']:.4f} "
                      f"({healed['kl_mean'] / healed['kl_before_heal']:.2f}×) on the held-out ANCHORS windows."]
    wu = next((r for r in state["rows"] if r["kind"] == "width" and r["method"] == "uniform"), None)
    wa = next((r for r in state["rows"] if r["kind"] == "width" and r["method"] == "adaptive"), None)
    if wu and wa:
        lines += ["", f"Width {a.width}: adaptive (DP over per-block ratios 0–75%, distortion measured one block at a "
                      f"time on {wa['calib_tokens']} calibration tokens, attention rounded to whole KV groups) KL "
                      f"{wa['kl_mean']:.4f} at {wa['params']:,} params vs uniform {wu['kl_mean']:.4f} at "
                      f"{wu['params']:,}: **{wa['kl_mean'] / wu['kl_mean']:.2f}×**. Adaptive ratios per block: "
                      + ", ".join(f"{k}: {v[0]:.0%}/{v[1]:.0%}" for k, v in wa["ratios"].items()) + "."]
    fc = state.get("finercut")
    if fc:
        order = fc["order"]
        attn = [int(u.split(".")[0]) for u in order if u.endswith(".attn")]
        mlp = [int(u.split(".")[0]) for u in order if u.endswith(".mlp")]
        half = blocks // 2
        lines += ["", f"FinerCut removed {len(order)} sublayers in {fc['seconds']:.0f} s ({fc['calib_tokens']} "
                      f"calibration tokens): {len(attn)} attention, {len(mlp)} FFN. Attention removed in blocks "
                      f"{sorted(attn)} ({sum(b >= half for b in attn)} of {len(attn)} in the deeper half, blocks "
                      f"≥ {half}); FFN in blocks {sorted(mlp)}.",
                  f"Removal order: {', '.join(order)}.",
                  f"Grid plot: `benchmarks/results/prune-finercut-{Path(a.model).name}.png` (not in git; rerun to "
                  "make it)."]
    enc = state.get("encoder")
    if enc:
        w = enc["eval_windows"]
        lines += ["", f"Encoder: {enc['model']} ({enc['params']:,} params), 2 of {enc['num_blocks']} blocks removed, "
                      f"chosen on {enc['calib_tokens']} calibration tokens (divergence = 1 − cosine of mean-pooled "
                      f"embeddings); embedding cosine to the original on persuasion.txt ({w['windows']} windows of "
                      f"{w['seq_len']} tokens, in order).", "",
                  "| method | removed blocks | params | embedding cosine | calibration 1−cos | select s |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['method']} | {', '.join(r['removed'])} | {r['params']:,} | {r['emb_cosine']:.4f} | "
                  f"{r['calib_divergence']:.4f} | {r['select_s']} |" for r in enc["rows"]]
    sys.path.insert(0, str(REPO / "benchmarks"))
    from markdown import replace_section

    replace_section(a.out or REPO / "BENCHMARKS.md", HEADING, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
