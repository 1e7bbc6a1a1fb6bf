"""GGUF export measured in llama.cpp (issue 9): layer-wise `--target gguf` artifacts near 5.5 and 6 bits/weight →
export_gguf, against llama.cpp's own quantizer (Q4_0, Q4_K_M, Q5_0, Q5_K_M, Q6_K, Q8_0 via llama_model_quantize with
allow_requantize), all run through llama-cpp-python on the ANCHORS.md protocol (persuasion.txt tokenized whole,
first N × 512 tokens; per-token KL(reference ‖ llama.cpp) mean/p99, top-1). Decode speed in the same run: llama.cpp
ms/token of our 5.5 GGUF vs the ONNX Runtime `int4` export (fused attention) of the same artifact vs torch fp32 eager
(64-token prompt, 8 warm-up, 32 timed greedy steps, median).

    python benchmarks/gguf.py --model smollm2-135m --artifact 5.5=/tmp/gg/smol_5.5 --artifact 6=/tmp/gg/smol_6
    python benchmarks/gguf.py --model ~/.cache/compress/models/tiny-austen-lm
    python benchmarks/gguf.py --write-section          # the BENCHMARKS.md section from the JSON files only

Reference: the model as transformers loads it in fp32 (SmolLM2: the zoo model, i.e. the source GGUF dequantized;
tiny-austen-lm: the fp32 HF model). llama.cpp's quantizer reads the source GGUF (SmolLM2: the zoo's Q4_1 file) or
an F32 GGUF written by export_gguf. JSON to benchmarks/results/gguf-<model>.json; each run then rewrites the
BENCHMARKS.md section "GGUF export for llama.cpp (issue 9)" from every JSON file present (--no-section to skip).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
# this file's name would shadow the `gguf` package: run with the repository, not benchmarks/, on the path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "benchmarks"]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.markdown import tilde  # noqa: E402

AUSTEN = REPO.parent / "shared" / "data" / "text" / "austen"
PERSUASION = AUSTEN / "persuasion.txt"
CALIB = ",".join(str(p) for p in sorted(AUSTEN.glob("*.txt")) if p.name != "persuasion.txt")
PROMPT = "It is a truth universally acknowledged, that a single man in possession of a good fortune"
RESULTS = REPO / "benchmarks" / "results"
SECTION = "GGUF export for llama.cpp (issue 9)"
SCHEMA = 2
LLAMACPP_TYPES = "Q4_0,Q4_K_M,Q5_0,Q5_K_M,Q6_K,Q8_0"
# ANCHORS.md, SmolLM2 (llama.cpp quantizer on the source Q4_1 GGUF): KL mean and file size in MB
ANCHORS = {"Q4_K_M": (0.056, 105), "Q4_0": (0.318, 92), "Q8_0": (0.0044, 145), "source": (0.0034, 98)}
BUILD_NOTE = ("llama-cpp-python build: `pip install llama-cpp-python==0.3.36` compiled from source in 4 min 16 s "
              "wall, measured this session on this machine while other work ran.")


def torch_kl(model, ref_logits: list[torch.Tensor], windows) -> dict:
    """KL(reference ‖ model in torch) and top-1 on the same windows."""
    from compress.metrics import kl_per_token, log_softmax_chunked, summarize, top1_agreement

    kl, top1 = [], []
    with torch.inference_mode():
        for r, ids in zip(ref_logits, windows.input_ids, strict=True):
            c = model.module(input_ids=ids[None], use_cache=False).logits[0].float()
            kl.append(kl_per_token(log_softmax_chunked(r), c))
            top1.append(top1_agreement(r, c))
    s = summarize(torch.cat(kl))
    return {"kl_mean": s["mean"], "kl_p99": s["p99"], "top1": float(torch.cat(top1).mean())}


def gguf_facts(path: Path) -> dict:
    """File size, parameters (tensor elements), file bpw and the tensor-type histogram of a GGUF."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    params = sum(int(t.n_elements) for t in reader.tensors)
    types = Counter(t.tensor_type.name for t in reader.tensors)
    size = path.stat().st_size
    return {"gguf_bytes": size, "params": params, "gguf_bpw": round(size * 8 / params, 4),
            "tensor_types": dict(sorted(types.items(), key=lambda kv: -kv[1])), "tensors": len(reader.tensors)}


def llamacpp_quantize(src: Path, out: Path, qtype: str, threads: int) -> float:
    """llama.cpp's own quantizer (default params, allow_requantize) from `src` to `out`; returns seconds."""
    import llama_cpp

    from exporters.llamacpp import quiet_stderr

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}")
    params.allow_requantize = True
    params.nthread = threads
    t0 = time.perf_counter()
    with quiet_stderr():
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize {src} → {qtype} returned {rc}")
    return round(time.perf_counter() - t0, 2)


def llamacpp_quantize_imatrix(src: Path, out: Path, qtype: str, imatrix: Path, threads: int) -> float:
    """llama.cpp's `llama-quantize --allow-requantize --imatrix FILE` (the binary benchmarks/llamacpp_tools.py
    builds: the Python API cannot pass an importance matrix); returns seconds."""
    sys.path.append(str(REPO / "benchmarks"))
    from llamacpp_tools import llama_quantize

    t0 = time.perf_counter()
    subprocess.run([str(llama_quantize()), "--allow-requantize", "--imatrix", str(imatrix), str(src), str(out), qtype,
                    str(threads)], check=True, capture_output=True)
    return round(time.perf_counter() - t0, 2)


def measure(kind: str, name: str, gguf_path: Path, original, windows, ref_logits, a, decode_ids: list[int],
            extra: dict) -> dict:
    """llama.cpp numbers for one GGUF: KL/top-1 on the windows, greedy text, decode ms/token."""
    from exporters.llamacpp import compare_with_reference, llamacpp_decode_speed, llamacpp_generate

    cmp = compare_with_reference(gguf_path, original, windows, n_threads=a.threads, ref_logits=ref_logits)
    t0 = time.perf_counter()
    text = llamacpp_generate(gguf_path, PROMPT, max_tokens=16, n_threads=a.threads)
    gen_s = time.perf_counter() - t0
    ms = llamacpp_decode_speed(gguf_path, n_tokens=a.decode_tokens, n_threads=a.threads, prompt=decode_ids,
                               warmup=a.warmup)
    row = {"kind": kind, "name": name, "path": str(gguf_path), **gguf_facts(gguf_path),
           "llamacpp_kl_mean": cmp.kl_mean, "llamacpp_kl_median": cmp.kl_median, "llamacpp_kl_p99": cmp.kl_p99,
           "llamacpp_top1": cmp.top1_agreement, "llamacpp_logits_seconds": cmp.llamacpp_seconds,
           "generate_prompt": PROMPT, "generated": text, "generate_seconds": round(gen_s, 2),
           "decode_ms_per_token": round(ms, 2), **extra}
    print(json.dumps({k: v for k, v in row.items() if k not in ("generate_prompt",)}), flush=True)
    return row


def _entry(ours: dict, t: dict) -> dict:
    """One llama.cpp file as seen from one of ours."""
    return {"type": t["qtype"], "bytes": t["gguf_bytes"], "bpw": t["gguf_bpw"],
            "size_vs_ours": t["gguf_bytes"] / ours["gguf_bytes"] - 1, "kl_mean": t["llamacpp_kl_mean"],
            "kl_p99": t["llamacpp_kl_p99"], "top1": t["llamacpp_top1"],
            "ours_lower_kl": ours["llamacpp_kl_mean"] < t["llamacpp_kl_mean"]}


def comparisons(rows: list[dict]) -> list[dict]:
    """Per layer-wise GGUF: every llama.cpp file at least as large (smallest first) and every smaller one, each
    with its KL and whether ours is lower."""
    theirs = sorted((r for r in rows if r["kind"] == "llamacpp"), key=lambda r: r["gguf_bytes"])
    out = []
    for r in (r for r in rows if r["kind"] == "ours"):
        larger = [_entry(r, t) for t in theirs if t["gguf_bytes"] >= r["gguf_bytes"]]
        smaller = [_entry(r, t) for t in theirs if t["gguf_bytes"] < r["gguf_bytes"]]
        out.append({"ours": r["name"], "ours_bytes": r["gguf_bytes"], "ours_bpw": r["gguf_bpw"],
                    "ours_kl_mean": r["llamacpp_kl_mean"], "ours_kl_p99": r["llamacpp_kl_p99"],
                    "ours_top1": r["llamacpp_top1"], "larger": larger, "smaller": smaller,
                    "ge": larger[0] if larger else None,
                    "first_larger_with_lower_kl": next((t for t in larger if not t["ours_lower_kl"]), None),
                    "smaller_with_lower_kl": [t for t in smaller if not t["ours_lower_kl"]]})
    return out


ORT_VARIANTS = {"ort_int4_fused": 0, "ort_int4_fused_acc4": 4}  # engine key → MatMulNBits accuracy_level


def export_ort(a, art_dir: Path, work: Path, level: int) -> tuple[dict, object]:
    """`--format int4 --fuse-attention` export of the artifact (accuracy level `level`), its session and facts."""
    from compress.metrics import kl_per_token, log_softmax_chunked, summarize, top1_agreement
    from exporters.graph import decoder_feed, session
    from flows.export import ExportRequest, run_export

    onnx_dir = work / f"{art_dir.name}-int4-fused{'-acc4' if level else ''}"
    try:
        t0 = time.perf_counter()
        r = run_export(ExportRequest(model=str(art_dir), out=onnx_dir, fmt="int4", fuse_attention=True,
                                     data=str(PERSUASION), tokens=512, seq_len=256, accuracy_level=level))
        rw = r["export"].get("extra", {}).get("rewrite", {})
        info = {"out": str(onnx_dir), "accuracy_level": level, "passed": r["passed"], "size_bytes": r["size_bytes"],
                "export_seconds": round(time.perf_counter() - t0, 1), "bits": rw.get("bits"),
                "validation": {k: [{kk: c.get(kk) for kk in ("name", "max_abs", "atol", "kl_mean", "top1", "passed")}
                                   for c in v["checks"]] for k, v in r["validation"].items()},
                "fusion_notes": r["export"].get("extra", {}).get("fusion", {}).get("notes")}
        sess = session(onnx_dir / "model.onnx", a.threads, exact=not level)
    except Exception as exc:  # reported, not fatal: the GGUF numbers stand without it
        print(f"ONNX Runtime int4 export (accuracy level {level}) failed: {type(exc).__name__}: {exc}", flush=True)
        return {"accuracy_level": level, "error": f"{type(exc).__name__}: {exc}"}, None
    if a.ort_kl:  # the graph on the same windows: at level 0 it should equal the artifact's torch KL
        kl, top1 = [], []
        for ref, w in zip(a.ref_logits, a.windows.input_ids, strict=True):
            c = torch.from_numpy(sess.run(["logits"], decoder_feed(sess, w[None].numpy().astype(np.int64), None,
                                                                   0))[0][0]).float()
            kl.append(kl_per_token(log_softmax_chunked(ref), c))
            top1.append(top1_agreement(ref, c))
        st = summarize(torch.cat(kl))
        info.update(kl_mean=st["mean"], kl_p99=st["p99"], top1=float(torch.cat(top1).mean()))
    return info, sess


def matmulnbits_probe(k: int, n: int, threads: int, repeats: int = 200) -> dict:
    """µs of one ONNX Runtime MatMulNBits [1×k]·[k×n] (block 32) per bits (4, 8) and accuracy level (0, 4)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    x = rng.random((1, k), dtype=np.float32)
    out = {}
    for bits in (4, 8):
        for level in (0, 4):
            nb = k // 32
            init = [numpy_helper.from_array(rng.integers(0, 256, (n, nb, 32 * bits // 8), dtype=np.uint8), "B"),
                    numpy_helper.from_array((rng.random((n, nb)) * 0.01).astype(np.float32), "S")]
            node = helper.make_node("MatMulNBits", ["x", "B", "S"], ["y"], domain="com.microsoft", K=k, N=n,
                                    bits=bits, block_size=32, accuracy_level=level)
            g = helper.make_graph([node], "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], init)
            m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft",
                                                                                                     1)])
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
            for _ in range(20):
                sess.run(None, {"x": x})
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                sess.run(None, {"x": x})
                times.append(time.perf_counter() - t0)
            out[f"bits{bits}_level{level}_us"] = round(1e6 * statistics.median(times), 1)
    return {"k": k, "n": n, "threads": threads, **out}


def decode_benchmark(a, original, art_dir: Path, gguf_path: Path, ids: np.ndarray, work: Path) -> dict:
    """llama.cpp (our GGUF) vs ONNX Runtime int4 + fused attention (same artifact) vs torch fp32 eager, same run."""
    from benchmarks.export_quant import ort_decode_ms, torch_decode_ms
    from exporters.llamacpp import llamacpp_decode_speed

    res: dict = {"artifact": str(art_dir), "gguf": str(gguf_path), "prompt_tokens": int(ids.shape[1]),
                 "warmup": a.warmup, "timed_steps": a.decode_tokens, "rounds": a.decode_rounds, "threads": a.threads,
                 "ort_variants": {}}
    sessions = {}
    for key, level in ORT_VARIANTS.items():
        if level and not a.ort_acc4:
            continue
        res["ort_variants"][key], sess = export_ort(a, art_dir, work, level)
        if sess is not None:
            sessions[key] = sess
    res["ort"] = res["ort_variants"]["ort_int4_fused"]
    cfg = original.module.config
    res["matmulnbits_probe"] = matmulnbits_probe(int(cfg.hidden_size), int(cfg.intermediate_size), a.threads)
    rounds: dict[str, list[float]] = {"llamacpp_gguf": [], **{k: [] for k in sessions}, "torch_fp32_eager": []}
    for _ in range(a.decode_rounds):
        rounds["llamacpp_gguf"].append(llamacpp_decode_speed(gguf_path, n_tokens=a.decode_tokens, n_threads=a.threads,
                                                             prompt=ids[0].tolist(), warmup=a.warmup))
        for key, sess in sessions.items():
            rounds[key].append(ort_decode_ms(sess, ids, a.warmup, a.decode_tokens))
        rounds["torch_fp32_eager"].append(torch_decode_ms(original.module, ids, a.warmup, a.decode_tokens))
    res["rounds_ms"] = {k: [round(x, 3) for x in v] for k, v in rounds.items() if v}
    res["ms"] = {k: statistics.median(v) for k, v in rounds.items() if v}
    print(json.dumps({k: v for k, v in res.items() if k != "ort"}), flush=True)
    return res


def machine() -> dict:
    """CPU model, cores, versions."""
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    flags = next((ln.split(":", 1)[1].split() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("flags")), [])
    import onnxruntime

    return {"cpu": cpu, "cores": os.cpu_count(), "amx": any(f.startswith("amx") for f in flags),
            "avx512": any(f.startswith("avx512") for f in flags), "machine": platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "llama_cpp_python": __import__("llama_cpp").__version__, "gguf": _version("gguf")}


def _version(pkg: str) -> str:
    from importlib.metadata import version

    return version(pkg)


def others_running() -> list[str]:
    """Other benchmark processes (the timing must not overlap them)."""
    out = subprocess.run(["pgrep", "-af", "benchmarks/"], capture_output=True, text=True).stdout.splitlines()
    return [tilde(ln.replace(str(REPO) + "/", "")) for ln in out
            if str(os.getpid()) != ln.split()[0] and "benchmarks/gguf.py" not in ln]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="zoo name or HF llama directory")
    ap.add_argument("--avg-bits", default="5.5,6")
    ap.add_argument("--artifact", action="append", default=[], help="KEY=DIR: reuse an artifact made earlier (KEY "
                    "listed in --avg-bits; its budget and plan settings are read from its manifest)")
    ap.add_argument("--granularity", default="block", help="plans made here: block | linear")
    ap.add_argument("--measure", default=None, help="plans made here: full (default) | fast | fisher")
    ap.add_argument("--candidates", default=None, help="plans made here: --candidates (default: the gguf menu)")
    ap.add_argument("--windows", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode-tokens", type=int, default=32, help="timed greedy decode steps (median)")
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=64, help="decode prompt: first N tokens of persuasion.txt")
    ap.add_argument("--decode-rounds", type=int, default=3, help="llama.cpp / ORT / torch timed in turn, N times")
    ap.add_argument("--llamacpp-types", default=LLAMACPP_TYPES, help="llama.cpp quantizer ftypes ('' for none)")
    ap.add_argument("--baselines", default="", help="uniform GGUF types written by export_gguf (e.g. Q8_0,Q5_0)")
    ap.add_argument("--decode-bits", default="5.5", help="which layer-wise GGUF the decode comparison uses")
    ap.add_argument("--no-decode", action="store_true", help="skip the llama.cpp / ORT / torch decode comparison")
    ap.add_argument("--imatrix", type=Path, default=None, help="also quantize --imatrix-types with llama-quantize "
                    "--imatrix FILE (e.g. an artifact's imatrix.gguf; benchmarks/llamacpp_tools.py builds the tool)")
    ap.add_argument("--imatrix-types", default="Q4_K_M", help="llama.cpp types made with --imatrix")
    ap.add_argument("--heading", default=None, help="write this run's table under its own BENCHMARKS.md heading "
                    "instead of rewriting the whole GGUF section from every results file")
    ap.add_argument("--no-ort-kl", dest="ort_kl", action="store_false", help="skip the ORT graph's KL")
    ap.add_argument("--no-ort-acc4", dest="ort_acc4", action="store_false",
                    help="skip the extra ORT export with int8 activations (accuracy level 4)")
    ap.add_argument("--work", type=Path, default=REPO / "out" / "gguf")
    ap.add_argument("--no-section", action="store_true", help="do not rewrite the BENCHMARKS.md section")
    ap.add_argument("--write-section", action="store_true", help="only rewrite the section from the JSON files")
    ap.add_argument("--results", type=Path, default=RESULTS, help="directory of the gguf-*.json files")
    ap.add_argument("--markdown", type=Path, default=REPO / "BENCHMARKS.md", help="file holding the section")
    a = ap.parse_args()
    if a.write_section:
        write_section(a.results, a.markdown)
        return
    torch.set_num_threads(a.threads)
    command = "python benchmarks/gguf.py " + " ".join(shlex.quote(x) for x in sys.argv[1:])
    started = {"load_average": os.getloadavg(), "other_benchmarks": others_running(),
               "time": time.strftime("%Y-%m-%d %H:%M:%S")}

    from compress.artifact_formats import load_artifact
    from compress.data import load_windows
    from compress.models import load_model
    from exporters.gguf import export_gguf
    from exporters.llamacpp import reference_logits
    from flows.quantize import QuantizeRequest, run_quantize

    name = Path(a.model).expanduser().name
    work = a.work / name
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    original = load_model(a.model)
    windows = load_windows(str(PERSUASION), original, split="all", tokens=512 * a.windows, seq_len=512,
                           sequential=True)
    ref_logits = reference_logits(original, windows)
    a.ref_logits, a.windows = ref_logits, windows
    reference_s = time.perf_counter() - t0
    text = PERSUASION.read_text(encoding="utf-8")[:4000]
    decode_ids = original.tokenizer(text)["input_ids"][: a.prompt_tokens]
    reuse = dict(s.split("=", 1) for s in a.artifact)
    rows, artifacts = [], {}

    # 1. our layer-wise GGUFs
    for bits in [b.strip() for b in a.avg_bits.split(",") if b.strip()]:
        art_dir, quantize_s = Path(reuse[bits]).expanduser() if bits in reuse else work / f"lw{bits}", None
        if bits not in reuse:
            t = time.perf_counter()
            run_quantize(QuantizeRequest(model=a.model, layerwise=True, avg_bits=float(bits), target="gguf",
                                         granularity=a.granularity, measure=a.measure, candidates=a.candidates,
                                         data=CALIB, tokens=1024, eval_tokens=1024, out=art_dir))
            quantize_s = round(time.perf_counter() - t, 1)
        artifacts[bits] = art_dir
        art = load_artifact(art_dir)
        manifest = art.extra["manifest"]
        export = export_gguf(art, work / f"lw{bits}.gguf")
        own = torch_kl(art, ref_logits, windows)
        meta = manifest["plan"]["meta"]
        label = (f"ours: layer-wise --avg-bits {meta['budget_avg_bits']:g} --granularity {meta['granularity']} "
                 f"--measure {meta['measure']} --target gguf, menu {','.join(meta['candidates'])}")
        extra = {"avg_bits_requested": meta["budget_avg_bits"], "artifact": str(art_dir),
                 "quantize_seconds": quantize_s,
                 "artifact_bpw": manifest.get("bpw"), "units": manifest["plan"]["meta"].get("units"),
                 "calibration": manifest["plan"]["meta"].get("calibration"), "torch_artifact": own,
                 "export_seconds": export.seconds, "file_type": export.file_type, "tensors_exact": export.n_exact,
                 "tensors_approximated": export.n_approximated, "approximation_note": export.approximation_note(),
                 "tokenizer": export.tokenizer, "export_params": export.params}
        rows.append(measure("ours", label, work / f"lw{bits}.gguf",
                            original, windows, ref_logits, a, decode_ids, extra))
        del art

    # 2. llama.cpp's own quantizer, from the source GGUF (SmolLM2) or an F32 GGUF of the model
    src_dir = Path(original.path) / "source" if original.path else None
    found = sorted(src_dir.glob("*.gguf")) if src_dir and src_dir.is_dir() else []
    if found:
        source, source_label = found[0], f"llama.cpp running the source GGUF ({found[0].name})"
    else:
        source = work / "source-F32.gguf"
        export_gguf(original, source, float_type="F32")
        source_label = "llama.cpp running the F32 GGUF (export_gguf float_type=F32)"
    rows.append(measure("source", source_label, source, original, windows, ref_logits, a, decode_ids,
                        {"qtype": "source"}))
    for qtype in [t.strip() for t in a.llamacpp_types.split(",") if t.strip()]:
        out = work / f"llamacpp-{qtype}.gguf"
        secs = llamacpp_quantize(source, out, qtype, a.threads)
        rows.append(measure("llamacpp", f"llama.cpp {qtype}", out, original, windows, ref_logits, a, decode_ids,
                            {"qtype": qtype, "quantize_seconds": secs, "quantized_from": str(source)}))
    if a.imatrix is not None:
        for qtype in [t.strip() for t in a.imatrix_types.split(",") if t.strip()]:
            out = work / f"llamacpp-{qtype}-imatrix.gguf"
            secs = llamacpp_quantize_imatrix(source, out, qtype, a.imatrix, a.threads)
            rows.append(measure("llamacpp", f"llama.cpp {qtype} + our imatrix", out, original, windows, ref_logits, a,
                                decode_ids, {"qtype": qtype, "quantize_seconds": secs, "quantized_from": str(source),
                                             "imatrix": str(a.imatrix)}))
    for qtype in [t.strip() for t in a.baselines.split(",") if t.strip()]:
        out = work / f"uniform-{qtype}.gguf"
        export_gguf(original, out, float_type=qtype)
        rows.append(measure("uniform", f"export_gguf uniform {qtype} of the reference", out, original, windows,
                            ref_logits, a, decode_ids, {"qtype": qtype}))

    # 4. decode speed, same run
    decode = None
    if not a.no_decode and a.decode_bits in artifacts:
        decode = decode_benchmark(a, original, artifacts[a.decode_bits], work / f"lw{a.decode_bits}.gguf",
                                  np.asarray([decode_ids], np.int64), work)

    out = a.results / f"gguf-{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"schema": SCHEMA, "model": a.model, "name": name, "command": command, "date": time.strftime("%Y-%m-%d"),
            "started": started, "finished": time.strftime("%Y-%m-%d %H:%M:%S"), **machine(), "threads": a.threads,
            "windows": windows.describe(), "reference": str(original.spec), "reference_seconds": round(reference_s, 1),
            "source_gguf": str(source), "decode_prompt": f"first {len(decode_ids)} tokens of persuasion.txt",
            "load_average_end": os.getloadavg(), "other_benchmarks_end": others_running()}
    result = {"meta": meta, "rows": rows, "comparisons": comparisons(rows), "decode": decode}
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    for c in result["comparisons"]:
        print(comparison_line(c))
    if a.heading:
        write_heading(result, a.heading, a.markdown, timed=not a.no_decode)
    elif not a.no_section:
        write_section(a.results, a.markdown)


# ------------------------------------------------------------------------------------------------ BENCHMARKS.md


def _shown(path: str) -> str:
    """A path as BENCHMARKS.md shows it: relative to the repository, or under ~ (no machine's absolute paths)."""
    p = Path(path).expanduser()
    if p.is_relative_to(REPO):
        return str(p.relative_to(REPO))
    return tilde(str(p))


def _kl(v: float) -> str:
    return f"{v:.4f}" if v >= 1e-3 else f"{v:.2e}"


def _others(m: dict) -> str:
    seen = m["started"]["other_benchmarks"] + m["other_benchmarks_end"]
    return "none" if not seen else "; ".join(sorted({" ".join(x.split()[1:]) for x in seen}))


def _types(t: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in t.items())


def comparison_line(c: dict) -> str:
    """Ours vs the llama.cpp file of equal or larger size (the verdict), then every other larger file."""
    head = (f"{c['ours']} ({c['ours_bytes']:,} B, {c['ours_bpw']:.2f} bpw): KL {_kl(c['ours_kl_mean'])}, p99 "
            f"{_kl(c['ours_kl_p99'])}, top-1 {c['ours_top1']:.3f}")
    ge = c["ge"]
    if ge is None:
        return f"{head}; no llama.cpp type measured is as large."
    verdict = "ours lower KL: beaten" if ge["ours_lower_kl"] else "ours higher KL: comparison MISSED"
    s = (f"{head} vs the next llama.cpp file up, {ge['type']} ({ge['bytes']:,} B, {ge['bpw']:.2f} bpw, "
         f"{100 * ge['size_vs_ours']:+.1f}% size): KL {_kl(ge['kl_mean'])}, p99 {_kl(ge['kl_p99'])}, top-1 "
         f"{ge['top1']:.3f} — KL ours/theirs {c['ours_kl_mean'] / ge['kl_mean']:.2f}, {verdict}")
    rest = c["larger"][1:]
    if rest:
        s += ". Larger llama.cpp files: " + "; ".join(
            f"{t['type']} {100 * t['size_vs_ours']:+.1f}% KL {_kl(t['kl_mean'])} "
            f"({'ours lower' if t['ours_lower_kl'] else 'THEIRS lower'})" for t in rest)
    first = c["first_larger_with_lower_kl"]
    if first is not None and first is not ge and first["type"] != ge["type"]:
        s += (f". Smallest llama.cpp file with lower KL than ours: {first['type']} at "
              f"{100 * first['size_vs_ours']:+.1f}% size (KL {_kl(first['kl_mean'])}, "
              f"{first['kl_mean'] / c['ours_kl_mean']:.2f}× ours)")
    if c["smaller_with_lower_kl"]:
        s += ". SMALLER llama.cpp files with lower KL: " + ", ".join(
            f"{t['type']} ({100 * t['size_vs_ours']:+.1f}%, KL {_kl(t['kl_mean'])})"
            for t in c["smaller_with_lower_kl"])
    elif c["smaller"]:
        t = c["smaller"][-1]
        s += f". Next llama.cpp file down: {t['type']} ({100 * t['size_vs_ours']:+.1f}%) KL {_kl(t['kl_mean'])}"
    return s + "."


def model_table(d: dict) -> list[str]:
    m = d["meta"]
    lines = [f"### {m['name']}", "",
             f"`{m['command']}` — {m['finished']}, {m['threads']} threads; reference `{m['reference']}` (fp32 in "
             f"transformers); {m['windows']['windows']} × {m['windows']['seq_len']} tokens of persuasion.txt "
             f"(sha256 {m['windows']['sha256'][:12]}); llama.cpp types quantized from `{Path(m['source_gguf']).name}`"
             f". Load average at start {m['started']['load_average'][0]:.2f}, at end {m['load_average_end'][0]:.2f}"
             f"; other benchmarks running at start/end: {_others(m)}.", "",
             "| candidate | file bytes | MB | file bpw | tensor types | KL mean | KL p99 | top-1 | decode ms/token |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(d["rows"], key=lambda r: (r["kind"] == "source", r["gguf_bytes"])):
        label = f"**{r['name']}**" if r["kind"] == "ours" else r["name"]
        lines.append(f"| {label} | {r['gguf_bytes']:,} | {r['gguf_bytes'] / 1e6:.1f} | {r['gguf_bpw']:.2f} | "
                     f"{_types(r['tensor_types'])} | {_kl(r['llamacpp_kl_mean'])} | {_kl(r['llamacpp_kl_p99'])} | "
                     f"{r['llamacpp_top1']:.3f} | {r['decode_ms_per_token']:.2f} |")
    lines.append("")
    for r in d["rows"]:
        if r["kind"] == "ours":
            units = Counter(r["units"].values()) if r.get("units") else {}
            files = r["calibration"]["source"].split(",")
            calib = Path(files[0]).name + (f" +{len(files) - 1} files" if len(files) > 1 else "")
            own = r["torch_artifact"]
            lines.append(f"- {r['name']}: artifact `{_shown(r['artifact'])}` {r['artifact_bpw']} bpw, widths "
                         f"{dict(units)}, calibration {calib} ({r['calibration']['tokens']} tokens); GGUF tensors "
                         f"exact {r['tensors_exact']}, "
                         f"approximated {r['tensors_approximated']}; the artifact in torch on the same windows: KL "
                         f"{_kl(own['kl_mean'])}, p99 {_kl(own['kl_p99'])}, top-1 {own['top1']:.3f}.")
    lines.append("")
    lines += [f"- {comparison_line(c)}" for c in d["comparisons"]]
    if m["name"] == "smollm2-135m":
        lines += ["", "Check against ANCHORS.md (same protocol, llama.cpp quantizer on the source Q4_1 GGUF):", ""]
        for r in d["rows"]:
            key = r.get("qtype")
            if key in ANCHORS and not r.get("imatrix"):  # ANCHORS.md's types are made without an imatrix
                kl, mb = ANCHORS[key]
                rel = r["llamacpp_kl_mean"] / kl - 1
                ok = abs(rel) <= 0.05 and abs(r["gguf_bytes"] / 1e6 - mb) <= 1.5
                lines.append(f"- {r['name']}: KL {_kl(r['llamacpp_kl_mean'])} at {r['gguf_bytes'] / 1e6:.1f} MB vs "
                             f"ANCHORS {kl} at {mb} MB ({100 * rel:+.1f}%): "
                             f"{'reproduced' if ok else 'NOT reproduced'}.")
    return lines


ENGINES = {"llamacpp_gguf": "llama.cpp, our {bits} GGUF",
           "ort_int4_fused": "ONNX Runtime `int4 --fuse-attention`, same artifact (fp32 compute, as asked)",
           "ort_int4_fused_acc4": "ONNX Runtime `int4 --fuse-attention --accuracy-level 4` (extra: int8 activations)",
           "torch_fp32_eager": "torch fp32 eager (reference model)"}


def decode_table(ds: list[dict]) -> list[str]:
    dec0 = next((d["decode"] for d in ds if d.get("decode")), None)
    if dec0 is None:
        return ["### Decode speed", "", "Not measured (--no-decode)."]
    lines = ["### Decode speed (batch 1, KV cache, same run per model)", "",
             f"Each engine decodes greedily from the first {dec0['prompt_tokens']} tokens of persuasion.txt, "
             f"{dec0['threads']} threads: {dec0['warmup']} warm-up steps, median of {dec0['timed_steps']} timed steps; "
             f"the engines are timed in turn and the round repeated {dec0['rounds']} times; the median of the round "
             "medians is shown, every round listed. llama.cpp runs our layer-wise 5.5 GGUF; ONNX Runtime runs the "
             "`--format int4 --fuse-attention` export of the same artifact (MatMulNBits carrying its own codes; "
             "5-bit layers go into 8-bit MatMulNBits containers, hence the larger graph); torch is the fp32 "
             "reference in eager mode.", "",
             "| model | engine | ms/token | rounds (ms) | time vs llama.cpp | speed-up vs torch fp32 | file bytes | "
             "KL on the windows |", "|---|---|---|---|---|---|---|---|"]
    notes = []
    for d in ds:
        dec, name = d.get("decode"), d["meta"]["name"]
        if not dec:
            continue
        ms, rounds = dec["ms"], dec["rounds_ms"]
        llama, tor = ms["llamacpp_gguf"], ms["torch_fp32_eager"]
        ours = next(r for r in d["rows"] if r["kind"] == "ours" and r["path"] == dec["gguf"])
        variants = dec.get("ort_variants") or {"ort_int4_fused": dec["ort"]}
        facts = {"llamacpp_gguf": (ours["gguf_bytes"], ours["llamacpp_kl_mean"]), "torch_fp32_eager": (None, 0.0),
                 **{k: (v.get("size_bytes"), v.get("kl_mean")) for k, v in variants.items()}}
        for k in ENGINES:
            if k not in ms:
                continue
            size, kl = facts[k]
            label = ENGINES[k].format(bits=f"{ours['avg_bits_requested']:g}")
            lines.append(f"| {name} | {label} | {ms[k]:.2f} | "
                         f"{', '.join(f'{x:.2f}' for x in rounds[k])} | {ms[k] / llama:.2f}× | {tor / ms[k]:.2f}× | "
                         f"{'-' if size is None else f'{size:,}'} | {'-' if kl is None else _kl(kl)} |")
        for k, v in variants.items():
            if "error" in v:
                notes.append(f"- {name}, {k}: ONNX Runtime export FAILED, skipped: {v['error']}")
            else:
                own = ours["torch_artifact"]["kl_mean"]
                failed = [f"{ref} {c['name']} (KL {_kl(c['kl_mean'])}, top-1 {c['top1']:.3f})"
                          for ref, checks in v["validation"].items() for c in checks if not c["passed"]]
                notes.append(f"- {name}, accuracy level {v['accuracy_level']}: export validation "
                             f"{'passed' if v['passed'] else 'FAILED on ' + '; '.join(failed)}, MatMulNBits bits "
                             f"{v['bits']}, "
                             f"{v['export_seconds']} s" + (f"; KL on the windows {_kl(v['kl_mean'])} (the artifact in "
                                                          f"torch {_kl(own)})" if "kl_mean" in v else "") + ".")
        pr = dec.get("matmulnbits_probe")
        if pr:
            notes.append(f"- {name}, one MatMulNBits [1×{pr['k']}]·[{pr['k']}×{pr['n']}], block 32, "
                         f"{pr['threads']} threads (median of 200): 4-bit {pr['bits4_level0_us']} µs at accuracy "
                         f"level 0, {pr['bits4_level4_us']} µs at level 4; 8-bit {pr['bits8_level0_us']} µs at level "
                         f"0, {pr['bits8_level4_us']} µs at level 4.")
    return lines + [""] + notes


def write_heading(result: dict, heading: str, markdown: Path, timed: bool = True) -> None:
    """One run's table under its own BENCHMARKS.md heading (the GGUF section itself is left as it is); without
    timing (--no-decode: the machine was shared) the decode column is dropped."""
    from benchmarks.markdown import replace_section

    meta = result["meta"]
    command = tilde(meta["command"])
    intro = (f"Written by `{command}` on {meta['date']} ({meta['cores']} cores, llama-cpp-python "
             f"{meta['llama_cpp_python']}). Protocol as in the section \"GGUF export for llama.cpp\": llama.cpp runs "
             "each file on the ANCHORS.md windows; KL(reference fp32 ‖ llama.cpp). Ours now carry RTN codes weighted "
             "by the importance matrix collected on the calibration text; the `+ our imatrix` row is llama.cpp's own "
             "quantizer (`llama-quantize --imatrix`, built by benchmarks/llamacpp_tools.py) given that same matrix.")
    lines = [tilde(ln) for ln in model_table(result)]
    if not timed:
        lines = [ln.rsplit("|", 2)[0] + "|" if ln.startswith("|") else ln for ln in lines]
        lines.append("Decode speed not timed in this run (the machine was shared with other jobs).")
    replace_section(markdown, heading, "\n".join([intro, "", *lines]) + "\n")


def write_section(results: Path = RESULTS, markdown: Path = REPO / "BENCHMARKS.md") -> None:
    from benchmarks.markdown import replace_section

    ds = []
    for name in ("smollm2-135m", "tiny-austen-lm"):
        p = results / f"gguf-{name}.json"
        if p.is_file():
            d = json.loads(p.read_text())
            if d.get("meta", {}).get("schema") == SCHEMA:
                d["comparisons"] = comparisons(d["rows"])  # from the rows: the same for every file written
                ds.append(d)
    if not ds:
        print("no schema-2 results to write")
        return
    m = ds[-1]["meta"]
    lines = [f"Written by `python benchmarks/gguf.py` (one run per model, then the section from "
             f"benchmarks/results/gguf-*.json). Machine: {m['cpu']} ({m['machine']}, {m['cores']} cores"
             f"{', AMX' if m['amx'] else ''}{', AVX-512' if m['avx512'] else ''}), Python {m['python']}, "
             f"llama-cpp-python {m['llama_cpp_python']}, gguf {m['gguf']}, onnxruntime {m['onnxruntime']}, torch "
             f"{m['torch']}; llama.cpp loads with `use_extra_bufts=False` (its AMX/repack buffers segfault here). "
             + BUILD_NOTE, "",
             "Commands (HF_HUB_OFFLINE=1, `.venv/bin/python`):", ""]
    lines += [f"    {d['meta']['command']}" for d in ds]
    lines += ["", "The SmolLM2 artifacts were made earlier with `compress quantize smollm2-135m --layerwise --target "
              "gguf --avg-bits {5.5,6} --data ../shared/data/text/austen/emma.txt --eval-tokens 1024 --out "
              "/tmp/gg/smol_{5.5,6}`; tiny-austen-lm's are made by the script (calibration: the Austen novels except "
              "persuasion.txt, 1024 tokens).", "",
              f"Protocol (ANCHORS.md): persuasion.txt tokenized whole with the model's own tokenizer, first "
              f"{m['windows']['windows']} windows of {m['windows']['seq_len']} tokens, each one sequence through "
              "llama-cpp-python (`logits_all`); per-token KL(reference ‖ llama.cpp) over the full vocabulary, mean and "
              f"p99 over all {m['windows']['tokens']:,} positions; top-1 = same argmax. File "
              "bpw = file bytes × 8 ÷ parameters (tensor elements, tied head counted once; metadata and tokenizer "
              "included in the bytes). llama.cpp types: `llama_model_quantize` with "
              "`llama_model_quantize_default_params()`, `allow_requantize=True`. Decode ms/token column: "
              "llamacpp_decode_speed from the decode prompt below (one measurement per file, as the rows were "
              "measured).", ""]
    for d in ds:
        lines += model_table(d) + [""]
    lines += decode_table(ds) + [""]
    lines += ["### Reading", ""] + reading(ds)
    replace_section(markdown, SECTION, "\n".join(lines) + "\n")
    print(f"wrote section '{SECTION}' from {len(ds)} result file(s)")


def reading(ds: list[dict]) -> list[str]:
    """A short, literal summary of the comparisons and the decode ratios (no rounding up)."""
    out = []
    for d in ds:
        name = d["meta"]["name"]
        parts = []
        for c in d["comparisons"]:
            bits = c["ours"].split("--avg-bits ")[1].split()[0]
            ge, first = c["ge"], c["first_larger_with_lower_kl"]
            if ge is None:
                parts.append(f"{bits}: no larger llama.cpp file measured")
                continue
            txt = (f"ours {bits} ({c['ours_bpw']:.2f} bpw, KL {_kl(c['ours_kl_mean'])}) vs {ge['type']} "
                   f"({ge['bpw']:.2f} bpw, {100 * ge['size_vs_ours']:+.1f}% size, {_kl(ge['kl_mean'])}): "
                   + ("beaten" if ge["ours_lower_kl"] else "missed"))
            down = c["smaller"][-1] if c["smaller"] else None
            if not ge["ours_lower_kl"] and down is not None and down["ours_lower_kl"]:
                txt += (f" (the next file down, {down['type']} at {100 * down['size_vs_ours']:+.1f}%, has "
                        f"{down['kl_mean'] / c['ours_kl_mean']:.2f}× our KL)")
            if ge["ours_lower_kl"] and first is not None and first["size_vs_ours"] <= 0.10:
                txt += (f", but {first['type']} at {100 * first['size_vs_ours']:+.1f}% size has KL "
                        f"{_kl(first['kl_mean'])} ({first['kl_mean'] / c['ours_kl_mean']:.2f}× ours)")
            if c["smaller_with_lower_kl"]:
                t = c["smaller_with_lower_kl"][-1]
                txt += f"; even the smaller {t['type']} ({100 * t['size_vs_ours']:+.1f}%) has lower KL"
            parts.append(txt)
        line = f"- {name}: " + "; ".join(parts) + "."
        if name == "smollm2-135m":
            checks = []
            for r in d["rows"]:
                if r.get("qtype") in ("Q4_K_M", "Q4_0") and not r.get("imatrix"):
                    kl = ANCHORS[r["qtype"]][0]
                    rel = r["llamacpp_kl_mean"] / kl - 1
                    checks.append(f"{r['qtype']} {_kl(r['llamacpp_kl_mean'])} vs {kl} ({100 * rel:+.1f}%)")
            ok = all(abs(float(c.split("(")[1].split("%")[0]) / 100) <= 0.05 for c in checks)
            if checks:
                line += (" ANCHORS.md " + ("reproduced" if ok else "NOT reproduced") + ": " + ", ".join(checks) + ".")
        out.append(line)
    decs = [(d["meta"]["name"], d["decode"]) for d in ds if d.get("decode")]
    if decs:
        bits = []
        for name, dec in decs:
            ms = dec["ms"]
            b = f"{name} llama.cpp {ms['llamacpp_gguf']:.2f} ms/token"
            if "ort_int4_fused" in ms:
                b += (f", ORT int4 {ms['ort_int4_fused']:.2f} ({ms['ort_int4_fused'] / ms['llamacpp_gguf']:.2f}× "
                      "llama.cpp's time)")
            if "ort_int4_fused_acc4" in ms:
                b += f", ORT int4 at accuracy level 4 {ms['ort_int4_fused_acc4']:.2f}"
            b += f", torch fp32 {ms['torch_fp32_eager']:.2f}"
            bits.append(b)
        line = "- Decode: " + "; ".join(bits) + "."
        pr = decs[0][1].get("matmulnbits_probe")
        if pr and pr["bits8_level0_us"] > 3 * pr["bits4_level0_us"]:
            line += (f" ORT's 8-bit MatMulNBits at fp32 compute is the slow part ({pr['bits8_level0_us']} µs vs "
                     f"{pr['bits4_level0_us']} µs for 4-bit on one {pr['k']}×{pr['n']} layer), and our 5-bit layers "
                     "run as 8-bit there.")
        out.append(line)
    return out


if __name__ == "__main__":
    main()
