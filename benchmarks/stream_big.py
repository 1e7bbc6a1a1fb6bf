"""Models larger than memory (issue 16): peak RSS and wall time of the streaming verbs on a synthesized ~3 B Llama,
and `--stream on` against `--stream off` on SmolLM2 (same weight bytes).

    python benchmarks/stream_big.py [--model ~/.cache/compress/bench/llama-3b-synth] [--only NAME]

The big model is made by benchmarks/make_big_model.py when missing (bf16 shards, ~6 GB, never committed). Each
command runs in its own process under `/usr/bin/time -v` (peak RSS = "Maximum resident set size"). Run it alone:
other jobs on the two cores change the wall times (not the RSS). With --only, the rows not run now are kept as an
earlier run wrote them (each row says its date).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIG = Path("~/.cache/compress/bench/llama-3b-synth").expanduser()
DATA = REPO.parent / "shared" / "data" / "text" / "austen"
TARGET_CAP = 1.5e9  # issue 16: peak RSS ≤ 1.5 GB, "a quarter of the model's bytes"
MIB = 2**20


def target_rss(model: Path) -> float:
    """The peak-RSS target in bytes: a quarter of the model's weight files, at most 1.5 GB."""
    return min(TARGET_CAP, sum(f.stat().st_size for f in model.glob("*.safetensors")) / 4)


def timed(args: list[str], cwd: Path) -> dict:
    """Run `compress ARGS --json` under /usr/bin/time -v: exit code, wall seconds, peak RSS bytes, the JSON."""
    cmd = ["/usr/bin/time", "-v", sys.executable, str(REPO / "cli.py"), *args]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - t0
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1)) * 1024
    try:
        body = json.loads(p.stdout)
    except ValueError:
        body = {}
    if p.returncode:
        print(p.stderr[-2000:], file=sys.stderr)
    return {"rc": p.returncode, "seconds": wall, "rss": rss, "json": body}


def weights_sha(root: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(root.glob("model*.safetensors*")):
        h.update(f.name.encode())
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def params_b(model: Path) -> float:
    sys.path.insert(0, str(REPO))
    from compress.stream.checkpoint import Checkpoint

    ck = Checkpoint(model)
    return sum(math.prod(s) for s in ck.shapes.values()) / 1e9


def generate_check(artifact: Path) -> dict:
    """Load the artifact whole (the in-memory loader) and greedily generate 8 tokens, under /usr/bin/time -v."""
    code = ("import os,sys,torch;os.environ['HF_HUB_OFFLINE']='1';sys.path.insert(0,sys.argv[2]);"
            "from compress.models import load_model;m=load_model(sys.argv[1]);"
            "ids=m.tokenizer('It is a truth universally acknowledged',return_tensors='pt')['input_ids'];"
            "out=m.module.generate(ids,max_new_tokens=8,min_new_tokens=8,do_sample=False);"
            "print(out.shape[1]-ids.shape[1])")
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-c", code, str(artifact), str(REPO)],
                       capture_output=True, text=True)
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1)) * 1024
    return {"rc": p.returncode, "seconds": time.perf_counter() - t0, "rss": rss,
            "new_tokens": p.stdout.strip().splitlines()[-1] if p.stdout.strip() else None}


SECTION = "Models larger than memory: streaming block by block (issue 16)"


def earlier(name: str) -> list[str]:
    """The lines an earlier run wrote for `name` in this section of BENCHMARKS.md (a table row, or a paragraph
    whose first words are the name), to keep when this run does not redo them."""
    text = (REPO / "BENCHMARKS.md").read_text()
    start = text.find(f"## {SECTION}\n")
    if start < 0:
        return []
    end = text.find("\n## ", start + 1)
    body = text[start:end if end > 0 else len(text)]
    return [ln for ln in body.splitlines() if f"({name})" in ln or ln.startswith(name)]


def main() -> None:
    from markdown import replace_section

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=BIG)
    ap.add_argument("--only", default=None, help="run only the rows whose name contains this, or one of these "
                                                  "comma-separated strings (the others are kept)")
    ap.add_argument("--note", default="", help="a sentence for the header (e.g. that other jobs shared the cores)")
    ap.add_argument("--no-generate", action="store_true", help="skip loading the 3 B artifacts whole to generate "
                    "(about 40 min; the earlier lines are kept)")
    a = ap.parse_args()
    big = a.model.expanduser()
    if not big.is_dir():
        subprocess.run([sys.executable, str(REPO / "benchmarks" / "make_big_model.py"), "--out", str(big)],
                       check=True)
    work = Path(tempfile.mkdtemp(prefix="stream-big-"))
    n_b = params_b(big)
    target = target_rss(big)
    shown = "~/.cache/compress/bench/llama-3b-synth"
    rows = []
    cases = {
        "3B quantize --bits 4 (RTN)": ["quantize", str(big), "--bits", "4", "--group-size", "32", "--stream", "on",
                                       "--no-eval", "--data", str(DATA), "--out", "q4", "--json"],
        "3B eval of the result vs the original": ["eval", "q4", "--reference", str(big), "--data", str(DATA),
                                                  "--stream", "on", "--json"],
        "3B quantize --layerwise --measure fisher + eval": ["quantize", str(big), "--layerwise", "--avg-bits", "4.5",
                                                            "--measure", "fisher", "--stream", "on", "--data",
                                                            str(DATA), "--out", "lw", "--json"],
        "3B --layerwise --measure fisher --show-plan (the Fisher pass alone)": [
            "quantize", str(big), "--layerwise", "--avg-bits", "4.5", "--measure", "fisher", "--stream", "on",
            "--data", str(DATA), "--show-plan", "--json"],
    }
    try:
        for name, args in cases.items():
            if a.only and not any(o in name for o in a.only.split(",")):
                continue
            r = timed(args, work)
            m = r["json"].get("metrics") or r["json"]
            rows.append((name, args, r, m))
            print(f"[rc {r['rc']}] {name}: {r['seconds']:.0f} s, peak RSS {r['rss'] / MIB:,.0f} MiB", flush=True)
        gen = {} if a.no_generate else {d: generate_check(work / d) for d in ("q4", "lw") if (work / d).is_dir()}
        same = []
        if not a.only or "smollm2" in a.only:
            for mode in ("off", "on"):
                r = timed(["quantize", "smollm2-135m", "--bits", "4", "--group-size", "32", "--stream", mode,
                           "--data", str(DATA), "--out", f"s-{mode}", "--json"], work)
                same.append((mode, r, weights_sha(work / f"s-{mode}") if r["rc"] == 0 else None))
                print(f"[rc {r['rc']}] smollm2 --stream {mode}: {r['seconds']:.0f} s, {r['rss'] / 2**30:.2f} GiB",
                      flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    today = time.strftime("%Y-%m-%d")
    lines = [f"Written by `python benchmarks/stream_big.py` on {time.strftime('%Y-%m-%d')} ({platform.machine()}, "
             f"{os.cpu_count()} cores, no GPU). The model: `benchmarks/make_big_model.py` → `{shown}`, a Llama of "
             f"{n_b:.2f} B parameters (Llama-3.2-3B's shape with SmolLM2's 49,152-token vocabulary), random weights "
             "from a fixed seed, bf16 safetensors shards (5.9 GB). Data: the Austen novels (2,048 evaluation tokens, "
             "4 windows of 512). Peak RSS is `/usr/bin/time -v`'s maximum resident set size of the whole process "
             f"(Python, torch and transformers included), in MiB (2^20 bytes); target ≤ {target / MIB:,.0f} MiB "
             f"({target / 1e9:.3f} GB: a quarter of the model's weight files, as the issue asks, at most 1.5 GB). "
             "Rows carry the date "
             "they were measured (`--only` reruns some and keeps the others). " + a.note, "",
             "| command | exit | peak RSS | vs target | wall | s per B params | KL mean | top-1 | measured |",
             "|---|---|---|---|---|---|---|---|---|"]
    done = {name for name, *_ in rows}
    for name in cases:
        if name not in done:
            lines += [ln if ln.count("|") >= 10 else ln.rstrip() + " 2026-12-03 (stop 15) |" for ln in earlier(name)]
    for name, args, r, m in rows:
        cmd = " ".join(args).replace(str(big), shown).replace(str(DATA), "austen/")
        ok = "met" if r["rss"] <= target else "**missed**"
        kl = m.get("kl_mean")
        top1 = m.get("top1_agreement")
        lines.append(f"| `compress {cmd}` ({name}) | {r['rc']} | {r['rss'] / MIB:,.0f} MiB | {ok} | "
                     f"{r['seconds']:.0f} s | {r['seconds'] / n_b:.0f} | "
                     f"{'' if kl is None else f'{kl:.4f}'} | {'' if top1 is None else f'{top1:.3f}'} | {today} |")
    for d, what in (("q4", "The 3 B artifact"), ("lw", "The 3 B layer-wise artifact")):
        if d in gen:
            g = gen[d]
            lines += ["", f"{what} loads (whole, with the in-memory loader) and generates: {g['new_tokens']} new "
                          f"tokens greedily, exit {g['rc']}, {g['seconds']:.0f} s, peak RSS {g['rss'] / 2**30:.2f} "
                          f"GiB ({today}; loading whole is not streamed: the skeleton is built in fp32 before the "
                          "packed modules replace its Linears)."]
        else:
            lines += ["", *earlier(what + " loads")]
    if same:
        identical = len({s for _, _, s in same}) == 1 and same[0][2] is not None
        lines += ["", "SmolLM2-135M, `compress quantize smollm2-135m --bits 4 --group-size 32 --stream off|on --data "
                      "austen/ --out DIR`:", "",
                  "| --stream | exit | peak RSS | wall | weights sha256 |", "|---|---|---|---|---|"]
        for mode, r, sha in same:
            lines.append(f"| {mode} | {r['rc']} | {r['rss'] / 2**30:.2f} GiB | {r['seconds']:.0f} s | "
                         f"`{(sha or '')[:16]}` |")
        lines += ["", f"Weight files byte-identical: **{'yes' if identical else 'NO'}** (compress.json differs only in "
                      "its timings and the stream note)."]
    else:
        kept = earlier("SmolLM2-135M, `compress quantize")
        if kept:
            text = (REPO / "BENCHMARKS.md").read_text()
            block = text[text.index(kept[0]):]
            block = block[:block.index("Weight files byte-identical")]
            tail = text[text.index("Weight files byte-identical"):].splitlines()[0]
            lines += ["", *block.rstrip().splitlines(), "", tail]
    replace_section(REPO / "BENCHMARKS.md", SECTION, "\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
