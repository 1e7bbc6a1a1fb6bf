"""`compress tune`: bisects the bit budget to the smallest model passing the gate, keeps best/ and the Pareto set
after every candidate (also when interrupted), and exits 1 naming the closest candidate when none passes."""

from __future__ import annotations

import json

import pytest
from tiny_models import build
from typer.testing import CliRunner

from cli import app
from compress.errors import UserError
from flows.tune import TuneRequest, parse_duration, run_tune

runner = CliRunner()
COMMON = ["--tokens", "64", "--eval-tokens", "64", "--seq-len", "16", "--candidates", "8,4,2", "--time-budget", "5m"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    build("llama").module.save_pretrained(path)
    return path


def _gate(tmp_path, text: str):
    (tmp_path / "gate.yaml").write_text(text)
    return str(tmp_path / "gate.yaml")


def test_bisection_finds_a_passing_budget_and_writes_everything(tiny_dir, tmp_path):
    out = tmp_path / "t"
    r = runner.invoke(app, ["tune", str(tiny_dir), "--gate", _gate(tmp_path, "max_kl: 0.0004\n"), "--out", str(out),
                            *COMMON, "--json"])
    assert r.exit_code == 0, r.output
    state = json.loads(r.stdout)
    points = state["points"]
    assert points[0]["avg_bits"] == 8.0 and len(points) >= 3
    best = state["best"]
    assert best["passed"] and best["size_bytes"] == min(p["size_bytes"] for p in points if p["passed"])
    assert all(p["kl_mean"] > 0.0004 for p in points if not p["passed"])
    upper = min(p["avg_bits"] for p in points if p["passed"])
    failing_below = [p["avg_bits"] for p in points if not p["passed"] and p["avg_bits"] < upper]
    assert failing_below and upper - max(failing_below) <= 0.125 + 1e-6  # bisection converged
    assert (out / "best" / "compress.json").is_file() and (out / "pareto.png").stat().st_size > 0
    pareto = json.loads((out / "pareto.json").read_text())
    assert len(pareto) == len(points) and any(p["pareto"] for p in pareto)
    assert not (out / ".candidate").exists()
    for argv in (["load", str(out / "best")], ["verify", str(out)],
                 ["eval", str(out / "best"), "--tokens", "32", "--seq-len", "16"]):
        r = runner.invoke(app, argv)
        assert r.exit_code == 0, (argv, r.output)


def test_no_passing_candidate_exits_1_and_names_the_closest(tiny_dir, tmp_path):
    out = tmp_path / "t"
    r = runner.invoke(app, ["tune", str(tiny_dir), "--gate", _gate(tmp_path, "max_kl: 0.0\nmin_top1: 1.01\n"),
                            "--out", str(out), *COMMON])
    assert r.exit_code == 1, r.output
    assert "no candidate passed the gate; closest:" in r.stderr
    assert json.loads((out / "tune.json").read_text())["best"] is None and (out / "pareto.json").is_file()


def test_an_interrupt_keeps_the_best_so_far_and_the_pareto_set(tiny_dir, tmp_path, monkeypatch):
    import flows.tune as tune

    real, calls = tune._candidate, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(tune, "_candidate", flaky)
    out = tmp_path / "t"
    req = TuneRequest(model=str(tiny_dir), gate=tmp_path / "g.yaml", out=out, tokens=64, eval_tokens=64,
                      seq_len=16, candidates="8,4,2")
    (tmp_path / "g.yaml").write_text("max_kl: 0.0004\n")
    state = run_tune(req, log=lambda m: None)
    assert state["interrupted"] and len(state["points"]) == 2 and state["best"] is not None
    saved = json.loads((out / "tune.json").read_text())
    assert saved["interrupted"] and len(json.loads((out / "pareto.json").read_text())) == 2
    assert (out / "best" / "model.safetensors").is_file()


def test_bad_input(tmp_path):
    assert parse_duration("10m") == 600 and parse_duration("90") == 90 and parse_duration("1.5h") == 5400
    for bad in ("0s", "soon", "-1m"):
        with pytest.raises(UserError, match="--time-budget"):
            parse_duration(bad)
    (tmp_path / "g.yaml").write_text("max_klx: 1\n")
    r = runner.invoke(app, ["tune", "smollm2-135m", "--gate", str(tmp_path / "g.yaml"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "unknown key 'max_klx'" in r.stderr and not (tmp_path / "o").exists()
    (tmp_path / "g.yaml").write_text("max_kl: 1\n")
    r = runner.invoke(app, ["tune", "smollm2-135m", "--gate", str(tmp_path / "g.yaml"), "--out", str(tmp_path / "o"),
                            "--objective", "speed"])
    assert r.exit_code == 2 and "--objective speed" in r.stderr
