"""ONNX Runtime GenAI packages of SmolLM2-135M: the model builder's own int4 against ours (issue 18), one run,
written to BENCHMARKS.md.

    pip install -e ".[genai]"
    python benchmarks/genai.py [--max-size builder|BYTES] [--rounds 3] [--decode-tokens 64]

Builder: `onnxruntime_genai.models.builder` `-p int4 -e cpu` on the fp32 model (its RTN, block 32), at its default
accuracy level (4: int8 activations) and at 0 (fp32 activations). Ours: `compress quantize --layerwise --max-size N
--target ort --measure fast` with N = the bytes of the builder's quantized weights (its MatMulNBits and
GatherBlockQuantized initializers; `--target ort` counts bytes as the ONNX file stores them), calibrated on 2,048
tokens of the five Austen novels other than persuasion.txt (RTN weighted by the importance matrix), then `compress
export --format genai` at accuracy levels 0 and 4. Every package is run by onnxruntime_genai itself: KL(original
fp32 torch ‖ package) and top-1 on the ANCHORS.md windows (persuasion.txt, first 6 × 512 tokens); speed in a child
process per package and round (packages in turn, rounds repeated): prefill tokens/s of one 512-token prompt, decode
ms/token = median of `--decode-tokens` greedy steps after a 64-token prompt; peak RSS of that child. 2 threads (the
machine's cores).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# benchmarks/ last: its gguf.py must not shadow the gguf package that compress imports
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "benchmarks"]
sys.path[:0] = [str(REPO)]
sys.path.append(str(REPO / "benchmarks"))
from heldout_text import AUSTEN, NOVELS  # noqa: E402

MENUS = ("default", "4a,4,4g64a,4g64,2a")  # --target ort's own; without 8 bits (no fp32-activation kernel)
HEADING = "ONNX Runtime GenAI packages: the model builder's int4 and ours (issue 18)"
RESULTS = REPO / "benchmarks" / "results" / "genai.json"
CALIB_TOKENS = 2048
WORK = Path("~/.cache/compress/bench/genai").expanduser()

SPEED_CHILD = r"""
import json, sys, time
import numpy as np
import onnxruntime_genai as og
path, prompt_len, decode_tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ids = json.loads(sys.argv[4])
def peak_mb():  # VmHWM: this process's own peak (ru_maxrss keeps the parent's peak across exec)
    line = next(x for x in open("/proc/self/status") if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024
model = og.Model(path)
def run(n_prompt, n_new):
    p = og.GeneratorParams(model)
    p.set_search_options(do_sample=False, max_length=n_prompt + n_new)
    g = og.Generator(model, p)
    t = time.perf_counter(); g.append_tokens(ids[:n_prompt]); first = time.perf_counter() - t
    steps = []
    for _ in range(n_new - 1):
        t = time.perf_counter(); g.generate_next_token(); steps.append(time.perf_counter() - t)
    return first, steps
run(16, 4)  # warm-up
prefill, _ = run(prompt_len, 1)
_, steps = run(64, decode_tokens + 1)
print(json.dumps({"prefill_s": prefill, "prefill_tok_s": prompt_len / prefill,
                  "decode_ms": 1000 * float(np.median(steps)),
                  "peak_rss_mb": peak_mb()}))
"""


def main() -> None:
    from markdown import publish_state, tilde

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--max-size", default="builder", help="our plan's weight budget in bytes, or 'builder': the "
                    "bytes of the builder's own quantized weights")
    ap.add_argument("--candidates", default=";".join(MENUS), help="our layer-wise menus, ';'-separated "
                    "('default' = --target ort's)")
    ap.add_argument("--method", default="rtn", help="our plans' --method (rtn: with the importance matrix; gptq)")
    ap.add_argument("--measure", default="fast", help="our plans' --measure")
    ap.add_argument("--calib-tokens", type=int, default=CALIB_TOKENS, help="our plans' calibration tokens")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--no-speed", action="store_true", help="accuracy, size and graph only (for a machine that is "
                    "busy: speed figures would mean nothing)")
    ap.add_argument("--no-markdown", action="store_true")
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from compress.data import load_windows
    from compress.models import load_model
    from compress.models.zoo import pull

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    WORK.mkdir(parents=True, exist_ok=True)
    ref = load_model(a.model)
    seq = min(512, getattr(ref.module.config, "max_position_embeddings", 512))  # the float decoder's is 256
    anchors = load_windows(str(AUSTEN / "persuasion.txt"), ref, split="all", tokens=6 * seq, seq_len=seq,
                           sequential=True)
    with torch.inference_mode():
        ref_logits = [ref.module(input_ids=ids[None], use_cache=False).logits[0].float() for ids in anchors.input_ids]
    packages = {}
    local = Path(a.model).expanduser()
    name = local.name if local.is_dir() else a.model
    work = WORK if name == "smollm2-135m" else WORK / name
    builder = _builder_packages(local if local.is_dir() else Path(pull(a.model)), work / "builder")
    packages.update(builder)
    budget = _quantized_bytes(builder["builder int4, accuracy level 0"][0]) - _qkv_zero_bytes(ref.module) \
        if a.max_size == "builder" else int(a.max_size)
    for menu in a.candidates.split(";"):
        packages.update(_our_packages(a.model, budget, None if menu == "default" else menu, work / "ours",
                                      seq, a.method, a.measure, a.calib_tokens))
    state = {"model": name, "max_size": budget, "candidates": a.candidates, "rows": {}, "speed_rounds": [],
             "command": tilde(shlex.join(["python", "benchmarks/genai.py", *sys.argv[1:]])),
             "versions": _versions()}
    for label, (path, meta) in packages.items():
        state["rows"][label] = {**meta, **_accuracy(path, anchors, ref_logits), **_size(path)}
        print(label, state["rows"][label], flush=True)
    prompt = anchors.input_ids[0].tolist()
    for r in range(0 if a.no_speed else a.rounds):
        rnd = {}
        for label, (path, _) in packages.items():
            rnd[label] = _speed(path, prompt, a.decode_tokens)
            print("round", r, label, rnd[label], flush=True)
        state["speed_rounds"].append(rnd)
    for label in packages if state["speed_rounds"] else []:
        rounds = [rd[label] for rd in state["speed_rounds"]]
        state["rows"][label].update({k: statistics.median(x[k] for x in rounds)
                                     for k in ("prefill_tok_s", "decode_ms", "peak_rss_mb")})
    results, heading = (RESULTS, HEADING) if name == "smollm2-135m" else (
        RESULTS.with_name(f"genai-{name}.json"), f"{HEADING}: {name}")
    publish_state(state, t0, results, heading, render, not a.no_markdown)


def _builder_packages(model_dir: Path, root: Path) -> dict:
    """The builder's own int4 of the fp32 model, at accuracy levels 4 (its CPU default) and 0."""
    from exporters.genai import _build

    src = root / "src"
    src.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((model_dir / "config.json").read_text())
    if cfg.get("rope_scaling") is None:
        cfg["rope_scaling"] = {"rope_type": "default"}  # the builder iterates it; null crashes 0.18
    (src / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in model_dir.iterdir():
        if f.is_file() and f.name not in ("config.json", ".compress-output") and not (src / f.name).exists():
            (src / f.name).symlink_to(f)
    out = {}
    for level in (4, 0):
        dst = root / f"int4-acc{level}"
        if not (dst / "genai_config.json").is_file():
            t = time.perf_counter()
            _build(src, dst, root / "cache", [f"accuracy_level={level}"])
            print(f"builder level {level}: {time.perf_counter() - t:.0f} s", flush=True)
        out[f"builder int4, accuracy level {level}"] = (dst, {"who": "builder", "accuracy_level": level})
    return out


def _qkv_zero_bytes(model) -> int:
    """Bytes of the zero points our package writes for symmetric Q/K/V at group 32 (the builder packs the three into
    one MatMulNBits and needs every one's zero points): set aside from our budget, so the package fits."""
    return sum(m.weight.shape[0] * (m.weight.shape[1] // 32) // 2 for n, m in model.named_modules()
               if n.rpartition(".")[2] in ("q_proj", "k_proj", "v_proj"))


def _quantized_bytes(package: Path) -> int:
    """Bytes of a package's quantized weights: the codes, scales and zero points of its MatMulNBits and
    GatherBlockQuantized nodes, each initializer once."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(package / "model.onnx"))
    inits = {i.name: i for i in m.graph.initializer}
    names = {x for n in m.graph.node if n.op_type in ("MatMulNBits", "GatherBlockQuantized") for x in n.input[:4]}
    return sum(numpy_helper.to_array(inits[x]).nbytes for x in names if x in inits)


def _code_key() -> str:
    """8 hex digits of the source that makes and exports our packages (compress/, flows/, exporters/): a cached
    artifact of other code is never reused (a change to GPTQ once left a stale package measured as new)."""
    import hashlib

    h = hashlib.sha256()
    for d in ("compress", "flows", "exporters"):
        for f in sorted((REPO / d).rglob("*.py")):
            h.update(f.relative_to(REPO).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:8]


def _our_packages(model: str, max_size: int, candidates: str | None, root: Path, seq: int = 512,
                  method: str = "rtn", measure: str = "fast", tokens: int = CALIB_TOKENS) -> dict:
    """Our layer-wise --target ort artifact under `max_size` weight bytes, exported at accuracy levels 0 and 4."""
    from compress.artifact_formats import load_artifact
    from exporters.genai import write_genai
    from flows.quantize import QuantizeRequest, run_quantize

    how = [f"--{k} {v}" for k, v, default in (("method", method, "rtn"), ("measure", measure, "fast"),
                                               ("tokens", tokens, CALIB_TOKENS)) if v != default]
    tag = f"lw{max_size}" + (f"-{candidates.replace(',', '_')}" if candidates else "") \
        + "".join("-" + h.replace("--", "").replace(" ", "") for h in how) + f"-{_code_key()}"
    art = root / tag
    if not (art / "compress.json").is_file():
        run_quantize(QuantizeRequest(model=model, layerwise=True, max_size=max_size, target="ort", measure=measure,
                                     method=method, candidates=candidates, data=NOVELS, tokens=tokens, seq_len=seq,
                                     evaluate=False, out=art))
    loaded = load_artifact(art)
    meta = {"who": "ours", "artifact_bpw": loaded.extra["manifest"]["bpw"],
            "units": loaded.extra["manifest"]["plan"]["meta"].get("units")}
    out = {}
    for level in (0, 4):
        dst = root / f"genai-{tag}-acc{level}"
        if not (dst / "genai_config.json").is_file():
            tmp = Path(tempfile.mkdtemp(prefix=".genai-", dir=root))
            pkg = write_genai(loaded, tmp, level)
            tmp.rename(dst)
            (dst / "package.json").write_text(json.dumps(pkg.to_dict(), indent=1))
        pkg = json.loads((dst / "package.json").read_text())
        out[f"ours: {' '.join([candidates or 'default menu', *how])}, accuracy level {level}"] = (
            dst, {**meta, "accuracy_level": level, "nodes": pkg["nodes"], "fusions": pkg["fusions"],
                  "ops": pkg["ops"]})
    return out


def _accuracy(path: Path, anchors, ref_logits) -> dict:
    import torch

    from compress.metrics import kl_per_token, log_softmax_chunked
    from exporters.genai import package_logits

    got = package_logits(path, anchors)
    kl, top1 = [], []
    for g, w in zip(got, ref_logits, strict=True):
        gt = torch.from_numpy(g)
        kl.append(kl_per_token(log_softmax_chunked(w), gt))
        top1.append((gt.argmax(-1) == w.argmax(-1)).float())
    return {"kl": float(torch.cat(kl).mean()), "top1": float(torch.cat(top1).mean())}


def _size(path: Path) -> dict:
    import collections

    import onnx

    m = onnx.load(str(path / "model.onnx"), load_external_data=False)
    ops = collections.Counter(n.op_type for n in m.graph.node)
    return {"file_bytes": sum(f.stat().st_size for f in path.glob("model.onnx*")), "nodes": sum(ops.values()),
            "matmulnbits": ops.get("MatMulNBits", 0), "gqa": ops.get("GroupQueryAttention", 0),
            "skip_norm": ops.get("SkipSimplifiedLayerNormalization", 0)}


def _speed(path: Path, prompt: list[int], decode_tokens: int) -> dict:
    out = subprocess.run([sys.executable, "-c", SPEED_CHILD, str(path), str(len(prompt)), str(decode_tokens),
                          json.dumps(prompt)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _versions() -> dict:
    from importlib.metadata import version

    return {p: version(p) for p in ("onnxruntime-genai", "onnxruntime", "torch")}


def render(state: dict) -> str:
    """The BENCHMARKS.md section."""
    m, v = state["machine"], state["versions"]
    lines = [f"Written by `{state['command']}` ({m['cores']} cores, onnxruntime-genai {v['onnxruntime-genai']}, "
             f"onnxruntime {v['onnxruntime']}, {state['seconds'] / 60:.0f} min). {state['model']}; KL = mean "
             "per-token KL(original fp32 in torch ‖ package run by onnxruntime_genai) on the ANCHORS.md windows "
             "(persuasion.txt, first 6 × 512 tokens); prefill = one 512-token prompt; decode = median ms per greedy "
             "step after a 64-token prompt; each package timed in its own child process, packages in turn, "
             f"{len(state['speed_rounds'])} rounds, medians shown; RSS = that child's peak.", "",
             "| package | file bytes | KL | top-1 | nodes | MatMulNBits | GQA | prefill tok/s | decode ms/token | "
             "peak RSS MB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for label, r in state["rows"].items():
        lines.append(f"| {label} | {r['file_bytes']:,} | {r['kl']:.4f} | {r['top1']:.3f} | {r['nodes']} | "
                     f"{r['matmulnbits']} | {r['gqa']} | {_num(r, 'prefill_tok_s', 0)} | {_num(r, 'decode_ms', 2)} | "
                     f"{_num(r, 'peak_rss_mb', 0)} |")
    if state.get("max_size"):
        given = "--max-size" in state["command"] and "--max-size builder" not in state["command"]
        whose = ("set by --max-size, below the builder's own: a smaller budget makes the plan take coarser groups "
                 "(g64, g128), which decode faster") if given else (
            "the builder's own, less the zero points our package writes for symmetric Q/K/V (the builder packs "
            "the three and needs all of them)")
        lines += ["", f"Our plans' budget: {state['max_size']:,} bytes of quantized weights as the ONNX file stores "
                  f"them (fp32 scales): {whose}. Units per menu:"]
        seen = set()
        for label, r in state["rows"].items():
            menu = label.rsplit(", accuracy level", 1)[0] if r.get("who") == "ours" else None
            if menu and menu not in seen and r.get("units"):
                seen.add(menu)
                lines.append(f"- {menu}: " + ", ".join(f"{k} {v}" for k, v in r["units"].items()))
    lines += ["", *_verdicts(state["rows"])]
    if not state["speed_rounds"]:
        lines += ["", "Speed not measured in this run (`--no-speed`: the machine was busy with other jobs)."]
    return "\n".join(lines)


def _num(row: dict, key: str, digits: int) -> str:
    return f"{row[key]:.{digits}f}" if key in row else "not measured"


def _verdicts(rows: dict) -> list[str]:
    """Issue 18's targets for each of our packages against the builder's at the same accuracy level: size ≤ its,
    KL ≤ 0.5× its, decode ≥ 1.0× its speed, prefill ≥ 0.9× its."""
    out = []
    for label, o in rows.items():
        b = rows.get(f"builder int4, accuracy level {o.get('accuracy_level')}")
        if o.get("who") != "ours" or not b:
            continue
        size, kl = o["file_bytes"] / b["file_bytes"], o["kl"] / b["kl"]
        line = (f"- {label}: size {size:.4f}× the builder's, KL {kl:.3f}× (target ≤ 0.5 at ≤ its size: "
                f"{'met' if kl <= 0.5 and size <= 1 else 'missed'})")
        if "decode_ms" not in o:
            out.append(line + "; speed not measured.")
            continue
        dec, pre = b["decode_ms"] / o["decode_ms"], o["prefill_tok_s"] / b["prefill_tok_s"]
        out.append(line + f", decode speed {dec:.3f}× (target ≥ 1.0: {'met' if dec >= 1.0 else 'missed'}), prefill "
                   f"{pre:.2f}× (target ≥ 0.9: {'met' if pre >= 0.9 else 'missed'}).")
    return out


if __name__ == "__main__":
    main()
