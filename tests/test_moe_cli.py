"""`compress moe stats | rebalance | prune | place` on a tiny random Mixtral (and a dense llama for the refusals)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_moe_layout import tiny_moe
from tiny_models import build
from typer.testing import CliRunner

from cli import app
from compress.artifact import is_artifact
from compress.artifact_formats import load_artifact
from compress.moe.layout import moe_layers

SMALL = ["--data", "self", "--seq-len", "16", "--tokens", "256", "--eval-tokens", "128"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny MoE forwards are many small ops: one thread avoids OpenMP overhead."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def skewed_moe():
    """The tiny Mixtral with expert 0's router row scaled up, so every layer is unbalanced."""
    loaded = tiny_moe("mixtral")
    with torch.no_grad():
        for m in moe_layers(loaded.module):
            loaded.module.get_submodule(m.router).weight[0] *= 8.0
    return loaded


@pytest.fixture(autouse=True)
def zoo(monkeypatch):
    """`tiny-moe` and `tiny-llama` are fresh random models; artifact dirs load for real."""
    def fake(spec, *a, **k):
        if is_artifact(Path(spec)):
            return load_artifact(Path(spec))
        return {"tiny-moe": skewed_moe, "tiny-llama": lambda: build("llama")}[spec]()

    monkeypatch.setattr("compress.models.load_model", fake)
    real_check = __import__("compress.inputs", fromlist=["check_model"]).check_model
    monkeypatch.setattr("compress.inputs.check_model",
                        lambda spec, arch=None: None if spec.startswith("tiny-") else real_check(spec, arch))


def invoke(*args: str):
    return CliRunner().invoke(app, ["moe", *args])


def test_stats_json_sums_and_files(tmp_path):
    r = invoke("stats", "tiny-moe", "--data", "self", "--seq-len", "16", "--tokens", "128", "--json",
               "--out", str(tmp_path / "s"))
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["tokens"] == 128 and len(result["layers"]) == 3
    for s in result["layers"]:
        assert sum(s["load"]) == s["tokens"] * s["top_k"] == 128 * 2
        assert s["dead"] == [e for e, n in enumerate(s["load"]) if n == 0]
        assert s["max_over_mean"] == pytest.approx(max(s["load"]) / (sum(s["load"]) / s["num_experts"]))
    assert result["worst_layer"] == max(result["layers"], key=lambda s: s["max_over_mean"])["index"]
    assert json.loads((tmp_path / "s" / "stats.json").read_text()) == result
    for png in ("load.png", "coactivation.png"):
        assert (tmp_path / "s" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = invoke("stats", "tiny-moe", "--data", "self", "--seq-len", "16", "--tokens", "64")
    assert table.exit_code == 0 and "max/mean" in table.stdout and "tokens per expert" in table.stdout


def test_rebalance_writes_an_artifact_whose_routing_uses_the_bias(tmp_path):
    from test_moe_stats import windows

    from compress.moe.routing import capture_routing, select

    out = tmp_path / "bal"
    r = invoke("rebalance", "tiny-moe", *SMALL, "--method", "bip", "--capacity", "1.1", "--out", str(out), "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    s = result["summary"]
    assert s["max_over_mean_worst_after"] < s["max_over_mean_worst_before"]
    assert all(row["calib_after"] < row["calib_before"] for row in result["layers"])
    assert s["kl_mean"] >= 0 and 0 <= s["top1_agreement"] <= 1 and result["metrics"]["kl_mean"] is not None
    assert json.loads((out / "moe_rebalance.json").read_text()) == result
    loaded = CliRunner().invoke(app, ["load", str(out), "--json"])
    assert loaded.exit_code == 0 and json.loads(loaded.stdout)["family"] == "mixtral"
    back = load_artifact(out)
    assert back.extra["manifest"]["format"] == "compress-moe-v1"
    routing = capture_routing(back, windows(2, 16, seed=3), keep_scores=True)
    moved = 0
    for rec in routing.values():
        block = back.module.get_submodule(rec.layer.path)
        bias = torch.tensor(result["bias"][rec.layer.path])
        torch.testing.assert_close(block.selection_bias, bias)
        assert bias.max() > 0
        assert torch.equal(rec.indices.sort(-1).values, select(rec.scores, 2, bias).sort(-1).values)
        moved += int((rec.indices.sort(-1).values != select(rec.scores, 2).sort(-1).values).any(-1).sum())
    assert moved > 0  # the bias changes which experts some tokens use


def test_rebalance_runtime_capacity_holds_on_held_out_text_and_the_bias_alone_advises_it(tmp_path):
    """Too few calibration tokens for the bias to carry over: the bias alone ends over the capacity on held-out
    windows and says what to do; --runtime-capacity bounds the held-out load and is recorded."""
    few = ["--tokens", "32", "--eval-tokens", "256", "--seq-len", "16"]
    r = invoke("rebalance", "tiny-moe", *few, "--out", str(tmp_path / "a"), "--json")
    assert r.exit_code == 0, r.output
    alone = json.loads(r.stdout)
    assert alone["summary"]["max_over_mean_worst_after"] > 1.15
    assert any("--runtime-capacity 1.1" in n for n in alone["notes"])
    r = invoke("rebalance", "tiny-moe", *few, "--runtime-capacity", "1.1", "--margin", "0.05",
               "--out", str(tmp_path / "b"), "--json")
    assert r.exit_code == 0, r.output
    bounded = json.loads(r.stdout)
    assert bounded["runtime_capacity"] == 1.1 and bounded["margin"] == 0.05
    assert bounded["summary"]["max_over_mean_worst_after"] <= 1.1 and not bounded["notes"]
    manifest = json.loads((tmp_path / "b" / "compress.json").read_text())
    assert manifest["moe_balance"]["runtime_capacity"] == 1.1


@pytest.mark.parametrize("schedule, merge", [("uniform", False), ("descending", True)])
def test_prune_writes_a_loadable_artifact_with_fewer_experts(tmp_path, schedule, merge):
    out = tmp_path / "pruned"
    r = invoke("prune", "tiny-moe", "--experts", "25%", *SMALL, "--schedule", schedule,
               *(["--merge"] if merge else []), "--out", str(out), "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["removed"] == 6 and result["total"] == 24  # 25% of 3 layers × 8 experts
    kept = {row["index"]: row["kept"] for row in result["layers"]}
    assert sum(kept.values()) == 18 and min(kept.values()) >= 2
    if schedule == "uniform":
        assert set(kept.values()) == {6}
    assert result["params_after"] < result["params_before"]
    assert result["summary"]["kl_mean"] >= 0 and 0 <= result["summary"]["top1_agreement"] <= 1
    assert json.loads((out / "moe_prune.json").read_text()) == result
    assert CliRunner().invoke(app, ["load", str(out)]).exit_code == 0
    back = load_artifact(out)
    assert {ly.index: ly.num_experts for ly in moe_layers(back.module)} == kept
    ids = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(back.module(input_ids=ids).logits).all()


def test_place_json_invariants(tmp_path):
    plan = tmp_path / "plan.json"
    r = invoke("place", "tiny-moe", "--data", "self", "--seq-len", "16", "--tokens", "128", "--eval-tokens", "64",
               "--devices", "4", "--replicas", "2", "--json", "--out", str(plan))
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    written = json.loads(plan.read_text())
    assert written.pop("written_by").startswith("compress") and written == result
    ours, rr = result["placement"], result["round_robin"]
    assert ours["layer_index"] == rr["layer_index"] == [row["index"] for row in result["layers"]] == [0, 1, 2]
    assert ours["devices"] == 4 and ours["replicas"] == 2
    for load, a, b, row in zip(result["loads"], ours["layers"], rr["layers"], result["layers"], strict=True):
        assert sum(load) == 128 * 2
        copies = [len(d) for d in a["experts"]]
        assert min(copies) >= 1 and sum(copies) == len(load) + 2 == row["copies"]
        assert all(len(set(d)) == len(d) and all(0 <= x < 4 for x in d) for d in a["experts"])
        slots = [len(e) for e in a["device_experts"]]
        assert max(slots) - min(slots) <= 1
        assert sum(a["device_load"]) == pytest.approx(sum(load))
        assert b["experts"] == [[e % 4] for e in range(len(load))]
        assert a["max_over_mean"] <= b["max_over_mean"] + 1e-9
        assert row["ours"] == pytest.approx(a["max_over_mean"])
        assert row["round_robin"] == pytest.approx(b["max_over_mean"])
    for held in result["heldout_loads"]:
        assert sum(held) == 64 * 2
    assert result["summary"]["ours_mean"] <= result["summary"]["round_robin_mean"]


@pytest.mark.parametrize("args, needle", [
    (["stats", "tiny-llama", "--data", "self", "--out", "{out}"], "has no experts"),
    (["rebalance", "tiny-llama", "--data", "self", "--out", "{out}"], "has no experts"),
    (["prune", "tiny-llama", "--experts", "25%", "--data", "self", "--out", "{out}"], "has no experts"),
    (["place", "tiny-llama", "--devices", "2", "--data", "self", "--out", "{out}"], "has no experts"),
    (["rebalance", "tiny-moe", "--capacity", "0.9", "--out", "{out}"], "--capacity 0.9"),
    (["rebalance", "tiny-moe", "--method", "auction", "--out", "{out}"], "use one of bip, greedy"),
    (["rebalance", "tiny-moe", "--margin", "0.2", "--out", "{out}"], "--margin 0.2"),
    (["rebalance", "tiny-moe", "--runtime-capacity", "0.5", "--out", "{out}"], "--runtime-capacity 0.5"),
    (["prune", "tiny-moe", "--experts", "80%", "--out", "{out}"], "remove at most 18"),
    (["prune", "tiny-moe", "--experts", "100%", "--out", "{out}"], "--experts 100%"),
    (["prune", "tiny-moe", "--experts", "25%", "--schedule", "zigzag", "--out", "{out}"], "--schedule zigzag"),
    (["place", "tiny-moe", "--devices", "9", "--out", "{out}"], "--devices 9"),
    (["place", "tiny-moe", "--devices", "0", "--out", "{out}"], "--devices 0"),
    (["stats", "tiny-moe", "--data", "no/such.txt", "--out", "{out}"], "--data no/such.txt"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, args, needle):
    out = tmp_path / "out"
    r = invoke(*[a.replace("{out}", str(out)) for a in args])
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("verb, extra", [("rebalance", ["--method", "bip"]), ("prune", ["--experts", "25%"])])
def test_moe_artifacts_chain_into_quantize(tmp_path, verb, extra):
    from flows.quantize import QuantizeRequest, run_quantize

    r = invoke(verb, "tiny-moe", *SMALL, *extra, "--out", str(tmp_path / "m"))
    assert r.exit_code == 0, r.output
    source = load_artifact(tmp_path / "m")
    run_quantize(QuantizeRequest(model=str(tmp_path / "m"), bits=8, evaluate=False, out=tmp_path / "q"))
    quantized = load_artifact(tmp_path / "q")
    src_blocks = [type(source.module.get_submodule(m.path)).__name__ for m in moe_layers(source.module)]
    assert [type(quantized.module.get_submodule(m.path)).__name__ for m in moe_layers(quantized.module)] == src_blocks
    assert [m.num_experts for m in moe_layers(quantized.module)] == [m.num_experts for m in moe_layers(source.module)]
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = source.module(input_ids=ids).logits, quantized.module(input_ids=ids).logits
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9  # 8-bit weights: the same routing and predictions
