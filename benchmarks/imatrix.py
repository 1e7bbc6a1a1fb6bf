"""RTN with and without the importance matrix (issue 17), on SmolLM2-135M, written to BENCHMARKS.md.

    python benchmarks/imatrix.py [--repeats 3] [--rows "blocks q4,blocks q3,all q4,layerwise 4.5,layerwise 3.5"]

Each row quantizes the same model twice with `compress quantize` (library call, `--out` a scratch directory):
`--no-imatrix` (plain min/max RTN) and the default (RTN weighted by the importance matrix collected on the same
calibration windows), then evaluates both artifacts against the original on the ANCHORS.md protocol (persuasion.txt,
first 6 × 512 tokens; never calibrated on). Calibration: 2,048 tokens of the five other Austen novels in equal
shares. The last table times the importance-matrix pass against one plain forward of the model over the same
windows (medians of `--repeats`; target ≤ 1.2×).
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# benchmarks/ last: its gguf.py must not shadow the gguf package that compress imports
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "benchmarks"]
sys.path[:0] = [str(REPO)]
sys.path.append(str(REPO / "benchmarks"))
from heldout_text import AUSTEN, NOVELS  # noqa: E402  (the benchmarks directory is on the path just above)

HEADING = "RTN with the importance matrix (issue 17)"
RESULTS = REPO / "benchmarks" / "results" / "imatrix.json"
ROWS = {  # label -> QuantizeRequest fields
    "blocks q4": dict(bits=4, group_size=32),
    "blocks q3": dict(bits=3, group_size=32),
    "all q4": dict(bits=4, group_size=32, embeddings="quantize"),
    "layerwise 4.5": dict(layerwise=True, avg_bits=4.5, measure="fast"),
    "layerwise 3.5": dict(layerwise=True, avg_bits=3.5, measure="fast"),
}
CALIB_TOKENS = 2048


def main() -> None:
    from markdown import publish_state

    from compress.artifact_formats import load_artifact
    from compress.data import load_windows
    from compress.evaluate import evaluate
    from compress.models import load_model
    from flows.quantize import QuantizeRequest, run_quantize

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--part", choices=("all", "rows", "cost"), default="all",
                    help="rows: the KL pairs only; cost: only the timing (run it alone), keeping the rows written")
    ap.add_argument("--no-markdown", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    ref = load_model(a.model)
    anchors = load_windows(str(AUSTEN / "persuasion.txt"), ref, split="all", tokens=3072, seq_len=512,
                           sequential=True)
    state = {"model": a.model, "rows": [], "cost": None, "calib_tokens": CALIB_TOKENS,
             "command": shlex.join(["python", "benchmarks/imatrix.py", *sys.argv[1:]])}

    def publish() -> None:
        publish_state(state, t0, RESULTS, HEADING, render, not a.no_markdown)

    if a.part == "cost" and RESULTS.is_file():
        import json

        state["rows"] = json.loads(RESULTS.read_text())["rows"]
    labels = [r.strip() for r in a.rows.split(",") if r.strip()] if a.part != "cost" else []
    for label in labels:
        row = {"row": label}
        for variant, use in (("plain", False), ("imatrix", True)):
            with tempfile.TemporaryDirectory(prefix="compress-bench-") as tmp:
                req = QuantizeRequest(model=a.model, data=NOVELS, tokens=CALIB_TOKENS, seq_len=512, evaluate=False,
                                      use_imatrix=use, out=Path(tmp) / "q", **ROWS[label])
                result = run_quantize(req)
                rep = evaluate(load_artifact(Path(tmp) / "q"), ref, anchors)
            row[variant] = {"kl": rep.kl_mean, "top1": rep.top1_agreement, "bpw": result["bpw"],
                            "size_bytes": result["size_bytes"], "seconds": result["seconds"]}
            print(label, variant, row[variant], flush=True)
        state["rows"].append(row)
        publish()
    if a.part != "rows":
        state["cost"] = _cost(ref, a.repeats)
        state["cost"]["command"] = state["command"]
        print(state["cost"], flush=True)
    publish()


def _cost(ref, repeats: int) -> dict:
    """Seconds of the importance-matrix pass and of one plain forward over the same calibration windows."""
    from compress.data import load_windows
    from compress.models import layer_map
    from compress.quantize.apply import quantizable
    from compress.quantize.imatrix import BATCH, collect
    from compress.stream.lazy import LazyModel

    lmap = layer_map(ref.module)
    calib = load_windows(NOVELS, ref, split="calibration", tokens=CALIB_TOKENS, seq_len=512)
    names = quantizable(ref.module, lmap)

    def forward() -> None:
        with torch.inference_mode():
            for s in range(0, len(calib.input_ids), BATCH):
                ref.module(input_ids=calib.input_ids[s:s + BATCH], attention_mask=calib.attention_mask[s:s + BATCH],
                           use_cache=False)

    def imatrix() -> None:
        collect(LazyModel.resident(ref, lmap), calib, names)

    times: dict[str, list[float]] = {"forward": [], "imatrix": []}
    for _ in range(repeats):  # interleaved, so drift in the machine's load hits both
        for name, fn in (("forward", forward), ("imatrix", imatrix)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"forward_s": med["forward"], "imatrix_s": med["imatrix"], "ratio": med["imatrix"] / med["forward"],
            "repeats": repeats, "windows": len(calib.input_ids)}


def render(state: dict) -> str:
    """The BENCHMARKS.md section."""
    m = state["machine"]
    lines = [f"Written by `{state['command']}` ({m['cores']} cores, torch {m['torch']}, {state['seconds'] / 60:.0f} "
             f"min, load {m['load']:.1f} at the end). {state['model']}; calibration {state['calib_tokens']} tokens of "
             "the five Austen novels other than persuasion.txt (equal shares, `--data a,b,...`); KL = mean per-token "
             "KL(original ‖ quantized) on the ANCHORS.md windows (persuasion.txt, first 6 × 512 tokens). "
             "`plain` = `--no-imatrix` (min/max RTN), `imatrix` = the default with `--data` (scales chosen by the "
             "importance-weighted error). Rows: `blocks qN` = `--bits N --group-size 32` (block Linears; embedding "
             "kept), `all q4` adds `--embeddings quantize`, `layerwise B` = `--layerwise --avg-bits B --measure "
             "fast` (the distortion table measured with each variant's own codes).", "",
             "| row | bpw | KL plain | KL imatrix | imatrix / plain | top-1 plain | top-1 imatrix | s plain | "
             "s imatrix |", "|---|---|---|---|---|---|---|---|---|"]
    for r in state["rows"]:
        p, i = r["plain"], r["imatrix"]
        bpw = f"{p['bpw']:.3f}" if abs(p["bpw"] - i["bpw"]) < 1e-3 else f"{p['bpw']:.3f} / {i['bpw']:.3f}"
        lines.append(f"| {r['row']} | {bpw} | {p['kl']:.4f} | {i['kl']:.4f} | {i['kl'] / p['kl']:.3f} | "
                     f"{p['top1']:.3f} | {i['top1']:.3f} | {p['seconds']:.0f} | {i['seconds']:.0f} |")
    c = state.get("cost")
    if c:
        verdict = "met" if c["ratio"] <= 1.2 else "missed"
        lines += ["", f"Cost of the importance-matrix pass (`{c.get('command', state['command'])}`, alone on the "
                  f"machine; {c['windows']} windows of 512 tokens, batches of 4, "
                  f"medians of {c['repeats']}, interleaved): {c['imatrix_s']:.2f} s against {c['forward_s']:.2f} s for "
                  f"one plain forward of the whole model over the same windows: **{c['ratio']:.2f}×** (target ≤ "
                  f"1.2×: {verdict}). The `s` columns are each whole quantize run (load, importance pass, "
                  "measurement, codes, save)."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
