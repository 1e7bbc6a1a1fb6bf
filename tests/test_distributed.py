"""torchrun with 2 gloo ranks on CPU: the measured (or Fisher-predicted) distortion table is split across the ranks
and gathered, and the artifact rank 0 writes is byte for byte the one a single process writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tiny_models import hf_dir

REPO = Path(__file__).resolve().parents[1]
TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 60


def _run(prefix: list[str], model: Path, text: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    args = ["quantize", str(model), "--layerwise", "--avg-bits", "4.5", "--candidates", "8g16,4g16,3g16",
            "--data", str(text), "--tokens", "128", "--eval-tokens", "128", "--seq-len", "32", "--out", str(out),
            "--json", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([*prefix, str(REPO / "cli.py"), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)


def test_two_gloo_ranks_write_the_same_artifact_as_one_process(tmp_path):
    model = hf_dir(tmp_path / "m", TEXT[:2000])
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    # fisher: each rank predicts its share of the candidates; gptq: each rank solves its share of a block's Linears
    for measure, extra in (("full", []), ("fast", []), ("fisher", []), ("fast", ["--method", "gptq"])):
        tag = measure + "".join(extra)
        one = _run([sys.executable], model, text, tmp_path / f"one-{tag}", "--measure", measure, *extra)
        two = _run(torchrun, model, text, tmp_path / f"two-{tag}", "--measure", measure, *extra)
        assert one.returncode == 0, one.stderr
        assert two.returncode == 0, two.stderr
        a, b = json.loads(one.stdout), json.loads(two.stdout)  # rank 0 alone printed
        assert a["distortion"] == b["distortion"] and a["plan"]["meta"]["units"] == b["plan"]["meta"]["units"]
        assert a["metrics"] == b["metrics"]  # each rank evaluated its share of the windows
        files = sorted(p.name for p in (tmp_path / f"one-{tag}").glob("*.safetensors"))
        assert files and files == sorted(p.name for p in (tmp_path / f"two-{tag}").glob("*.safetensors"))
        for f in files:
            assert (tmp_path / f"one-{tag}" / f).read_bytes() == (tmp_path / f"two-{tag}" / f).read_bytes()


def test_two_gloo_ranks_evaluate_the_same_numbers_as_one_process(tmp_path):
    """`compress eval` under torchrun, in memory and streamed: each rank runs its share of the windows."""
    model = hf_dir(tmp_path / "m", TEXT[:2000])
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    q = _run([sys.executable], model, text, tmp_path / "q")
    assert q.returncode == 0, q.stderr
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    for stream in ("off", "on"):
        args = [str(REPO / "cli.py"), "eval", str(tmp_path / "q"), "--reference", str(model), "--data", str(text),
                "--tokens", "160", "--seq-len", "32", "--stream", stream, "--json"]
        runs = [subprocess.run([*prefix, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
                for prefix in ([sys.executable], torchrun)]
        assert all(r.returncode == 0 for r in runs), [r.stderr for r in runs]
        one, two = (json.loads(r.stdout) for r in runs)
        assert one["kl_mean"] is not None and one["tokens"] == two["tokens"]
        for k in ("ppl", "ppl_ref", "kl_mean", "kl_median", "kl_p99", "top1_agreement", "size_bytes", "bpw"):
            assert one[k] == two[k], (stream, k)


def test_verbs_that_do_not_split_are_refused_under_torchrun(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WORLD_SIZE": "2", "RANK": "0"}
    p = subprocess.run([sys.executable, str(REPO / "cli.py"), "inspect", "smollm2-135m"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "torchrun: `compress inspect` runs in one process" in p.stderr
