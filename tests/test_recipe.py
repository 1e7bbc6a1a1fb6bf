"""`compress run` recipes on a tiny random llama: steps chain, cache by content key, resume, gate, refuse bad input."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from tiny_models import build

from compress.errors import UserError
from flows.recipe import StepFailed, load_recipe, run_recipe

STEPS = """\
  - prune: {{blocks: 1, method: bi}}
  - quantize: {{layerwise: true, avg-bits: {avg_bits}, target: ort, candidates: [8, 4]}}
  - export: {{format: int4, tokens: 32}}
  - eval: {{tokens: 32}}
  - gate: {{max_kl: {max_kl}, min_top1: 0.1}}
"""


def recipe_text(model: Path, avg_bits: float = 5, max_kl: float = 0.5, extra: str = "") -> str:
    return (f"model: {model}\nworkdir: work\ndefaults: {{seq_len: 16, tokens: 64, eval_tokens: 32}}\nsteps:\n"
            + STEPS.format(avg_bits=avg_bits, max_kl=max_kl) + extra)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny llama saved as an HF dir without a tokenizer: data 'self' samples from it."""
    path = tmp_path_factory.mktemp("tiny-llama")
    build("llama").module.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def first_run(tiny_dir, tmp_path_factory):
    """One full run of prune -> quantize -> export -> eval -> gate; tests copy its directory before changing it."""
    root = tmp_path_factory.mktemp("recipe")
    (root / "recipe.yaml").write_text(recipe_text(tiny_dir))
    t0 = time.perf_counter()
    summary = run_recipe(root / "recipe.yaml")
    return root, summary, time.perf_counter() - t0


def _copy(first_run, tmp_path: Path) -> Path:
    root = tmp_path / "copy"
    shutil.copytree(first_run[0], root)
    return root


def _statuses(summary: dict) -> list[str]:
    return [s["status"] for s in summary["steps"]]


def test_a_recipe_runs_end_to_end_and_records_every_step(first_run):
    root, summary, _ = first_run
    assert summary["passed"] is True and _statuses(summary) == ["ran"] * 5
    on_disk = json.loads((root / "work" / "compress.json").read_text())
    assert on_disk == summary
    assert [s["step"] for s in on_disk["steps"]] == ["prune", "quantize", "export", "eval", "gate"]
    for s in on_disk["steps"]:
        d = root / "work" / s["dir"]
        assert d.name == f"{s['index']:02d}-{s['step']}-{s['key'][:12]}"
        assert json.loads((d / "done.json").read_text())["key"] == s["key"]
        assert s["seconds"] > 0 and s["record"]
    prune, quant, export, ev, gate = (s["record"] for s in on_disk["steps"])
    assert len(prune["removed"]) == 1
    assert quant["plan"]["meta"]["allocator"] == "dp" and quant["bpw"] <= 5.0
    assert quant["out"] == str(root / "work" / on_disk["steps"][1]["dir"] / "model")
    assert export["passed"] is True and "vs original float" in export["validation"]
    # eval: the chain's end against the recipe's model; the baseline is that model against itself, same windows
    assert ev["candidate"]["kl_mean"] > 0 and ev["baseline"]["kl_mean"] == pytest.approx(0, abs=1e-9)
    assert ev["candidate"]["provenance"]["windows_sha256"] == ev["baseline"]["provenance"]["windows_sha256"]
    assert gate["passed"] is True and {c["name"] for c in gate["checks"]} == {"max_kl", "min_top1"}
    assert on_disk["outputs"]["onnx"].endswith("onnx") and on_disk["outputs"]["model"].endswith("model")


def test_compress_eval_and_the_recipe_eval_step_measure_the_same(first_run, tiny_dir):
    """One function behind both: the same candidate, reference and options give the same report (same windows)."""
    from typer.testing import CliRunner

    from cli import app

    root, summary, _ = first_run
    step = summary["steps"][1]  # the quantized model the eval step measured (export does not change it)
    model = root / "work" / step["dir"] / "model"
    res = CliRunner().invoke(app, ["eval", str(model), "--reference", str(tiny_dir), "--tokens", "32", "--seq-len",
                                   "16", "--json"])
    assert res.exit_code == 0, res.output
    cli_report = json.loads(res.stdout)
    step_report = summary["steps"][3]["record"]["candidate"]
    assert cli_report["provenance"]["windows_sha256"] == step_report["provenance"]["windows_sha256"]
    for key in ("kl_mean", "kl_median", "top1_agreement", "ppl", "ppl_ref", "tokens"):
        assert cli_report[key] == pytest.approx(step_report[key], rel=1e-6), key


def test_a_second_run_is_all_cached_and_faster(first_run, tmp_path):
    root = _copy(first_run, tmp_path)  # keys do not depend on where the workdir is
    t0 = time.perf_counter()
    again = run_recipe(root / "recipe.yaml")
    seconds = time.perf_counter() - t0
    assert _statuses(again) == ["cached"] * 5 and again["passed"] is True
    assert seconds < first_run[2] / 5
    assert [s["key"] for s in again["steps"]] == [s["key"] for s in first_run[1]["steps"]]
    assert [s["record"] for s in again["steps"]] == [s["record"] for s in first_run[1]["steps"]]
    assert all(s["ran_seconds"] == f["seconds"] for s, f in zip(again["steps"], first_run[1]["steps"], strict=True))


def test_a_changed_option_reruns_that_step_and_the_later_ones_only(first_run, tmp_path, tiny_dir):
    root = _copy(first_run, tmp_path)
    (root / "recipe.yaml").write_text(recipe_text(tiny_dir, avg_bits=6))
    summary = run_recipe(root / "recipe.yaml")
    assert _statuses(summary) == ["cached", "ran", "ran", "ran", "ran"]
    old, new = first_run[1]["steps"], summary["steps"]
    assert new[0]["key"] == old[0]["key"]
    assert all(n["key"] != o["key"] for n, o in zip(new[1:], old[1:], strict=True))
    assert new[1]["record"]["plan"]["meta"]["budget_avg_bits"] == 6.0
    assert (root / "work" / old[1]["dir"]).is_dir()  # the old result stays: switching back is a cache hit
    back = recipe_text(tiny_dir, avg_bits=5)
    (root / "recipe.yaml").write_text(back)
    assert _statuses(run_recipe(root / "recipe.yaml")) == ["cached"] * 5


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_an_interrupted_step_leaves_no_done_json_and_the_next_run_resumes(first_run, tmp_path, tiny_dir,
                                                                          monkeypatch, error):
    import flows.quantize as qrun

    root = _copy(first_run, tmp_path)
    (root / "recipe.yaml").write_text(recipe_text(tiny_dir, avg_bits=5.5))

    def broken(req, progress=None):
        Path(req.out).parent.joinpath("partial.bin").write_bytes(b"half")  # something half-written, then a crash
        raise error("injected")

    monkeypatch.setattr(qrun, "run_quantize", broken)
    with pytest.raises(error, match="injected"):
        run_recipe(root / "recipe.yaml")
    summary = json.loads((root / "work" / "compress.json").read_text())
    assert summary["passed"] is None and summary["error"]["type"] == error.__name__
    assert _statuses(summary) == ["cached", "failed"]  # nothing after the step that broke ran
    planned = load_recipe(root / "recipe.yaml").steps
    assert (planned[1].dir / "partial.bin").exists() and not (planned[1].dir / "done.json").exists()
    assert not planned[2].dir.exists()
    monkeypatch.undo()
    resumed = run_recipe(root / "recipe.yaml")
    assert _statuses(resumed) == ["cached", "ran", "ran", "ran", "ran"] and resumed["passed"] is True
    assert not (planned[1].dir / "partial.bin").exists() and (planned[1].dir / "done.json").exists()


def test_a_failing_gate_returns_passed_false_and_skips_what_follows(first_run, tmp_path, tiny_dir):
    root = _copy(first_run, tmp_path)
    (root / "recipe.yaml").write_text(recipe_text(tiny_dir, max_kl=1e-9, extra="  - eval: {tokens: 32, seed: 1}\n"))
    summary = run_recipe(root / "recipe.yaml")
    assert summary["passed"] is False
    assert _statuses(summary) == ["cached", "cached", "cached", "cached", "ran", "skipped"]
    gate = summary["steps"][4]["record"]
    assert gate["passed"] is False and [c["passed"] for c in gate["checks"]] == [False, True]
    gate_dir = root / "work" / summary["steps"][4]["dir"]
    assert "failure" in (gate_dir / "junit.xml").read_text() and "FAILED" in (gate_dir / "gate.md").read_text()
    assert json.loads((root / "work" / "compress.json").read_text())["passed"] is False
    assert run_recipe(root / "recipe.yaml")["passed"] is False  # a cached failure is still a failure


def test_validate_steps_check_the_last_export_and_a_failure_raises(first_run, tmp_path, tiny_dir):
    root = _copy(first_run, tmp_path)
    validate = "  - validate: {tokens: 32, seq_len: 16}\n"
    (root / "recipe.yaml").write_text(recipe_text(tiny_dir, extra=validate))
    summary = run_recipe(root / "recipe.yaml")
    assert _statuses(summary) == ["cached"] * 5 + ["ran"]
    record = summary["steps"][5]["record"]
    assert record["passed"] is True and record["quantized"] is False  # the graph against its own artifact: exact
    assert record["reference"] == str(root / "work" / summary["steps"][1]["dir"] / "model")
    # against the unpruned original the layers differ: refused before anything runs
    (root / "recipe.yaml").write_text(recipe_text(tiny_dir, extra="  - validate: {reference: original}\n"))
    with pytest.raises(UserError, match="step 6 .*step 1 \\(prune\\) changed the model's shape"):
        run_recipe(root / "recipe.yaml")
    # without a prune, against the original with an impossible KL limit: a StepFailed, and no done.json
    (tmp_path / "q.yaml").write_text(
        f"model: {tiny_dir}\ndefaults: {{seq_len: 16, tokens: 32}}\nsteps:\n"
        "  - quantize: {bits: 4, target: ort, embeddings: quantize, evaluate: false}\n  - export: {format: int4}\n"
        "  - validate: {reference: original, max_kl: 1e-12}\n")
    with pytest.raises(StepFailed, match="step 3 \\(validate"):
        run_recipe(tmp_path / "q.yaml")
    failed = json.loads((tmp_path / "q.out" / "compress.json").read_text())
    assert _statuses(failed) == ["ran", "ran", "failed"] and failed["error"]["type"] == "StepFailed"
    assert not (load_recipe(tmp_path / "q.yaml").steps[2].dir / "done.json").exists()


def test_a_score_step_feeds_rank_allocation(tiny_dir, tmp_path):
    (tmp_path / "r.yaml").write_text(
        f"model: {tiny_dir}\ndefaults: {{seq_len: 16, tokens: 32}}\nsteps:\n"
        "  - score: {methods: [lim, zd]}\n"
        "  - quantize: {layerwise: true, avg_bits: 5, allocator: rank, rank_by: zd, candidates: '8,4', "
        "evaluate: false}\n")
    events = []
    summary = run_recipe(tmp_path / "r.yaml", on_event=lambda e: events.append((e["index"], e["status"])))
    assert events == [(1, "start"), (1, "ran"), (2, "start"), (2, "ran")]
    assert (tmp_path / "r.out" / "compress.json").is_file()  # default workdir: beside the recipe
    score, quant = summary["steps"]
    assert score["record"]["methods"] == ["lim", "zd"]
    meta = quant["record"]["plan"]["meta"]
    assert meta["allocator"] == "rank" and meta["rank_by"] == "zd"
    assert quant["inputs"]["scores"] == {"step": 1, "key": score["key"]}
    assert _statuses(run_recipe(tmp_path / "r.yaml", resume=False)) == ["ran", "ran"]


BAD = [
    ("steps:\n  - prune: {blocks: 1\n", ["malformed YAML", "line 3"]),
    ("steps: [prune: {blocks: 1}]\n", ["missing `model:`"]),
    ("model: MODEL\nsteps: []\n", ["no steps"]),
    ("model: MODEL\n", ["no steps"]),
    ("model: MODEL\nmodle: x\nsteps: [eval]\n", ["line 2", "unknown key 'modle'", "workdir"]),
    ("model: MODEL\nsteps:\n  - prune: {blocks: 1}\n  - quantise: {bits: 4}\n",
     ["step 2 (line 4)", "unknown step 'quantise'", "quantize"]),
    ("model: MODEL\nsteps:\n  - prune: {blocks: 1}\n  - quantize:\n      bits: 4\n      avgbits: 4.5\n",
     ["step 2 (quantize, line 6)", "unknown key 'avgbits'", "avg_bits", "layerwise"]),
    ("model: MODEL\nsteps:\n  - export: {fmt: fp32, out: x}\n", ["step 1 (export, line 3)", "'out' is set by",
                                                                     "format"]),
    ("model: MODEL\nsteps:\n  - quantize: {bits: four}\n", ["step 1 (quantize, line 3)", "bits", "'four'"]),
    ("model: MODEL\nsteps:\n  - quantize: {bits: 4, avg-bits: 4.5, layerwise: true}\n", ["step 1", "one mode"]),
    ("model: MODEL\nsteps:\n  - gate: {max_kl: 0.1}\n", ["step 1 (gate", "put an `eval` step before it"]),
    ("model: MODEL\nsteps:\n  - eval\n  - gate\n", ["step 2 (gate", "no thresholds"]),
    ("model: MODEL\nsteps:\n  - export: {format: int4}\n", ["step 1 (export", "quantize"]),
    ("model: MODEL\nsteps:\n  - quantize: {layerwise: true, avg_bits: 5, allocator: rank}\n",
     ["step 1 (quantize", "add a `score` step"]),
    ("model: MODEL\ndefaults: {colour: red}\nsteps: [eval]\n", ["line 2", "unknown key 'colour'"]),
    ("model: MODEL\nsteps:\n  - eval: {data: nowhere/*.txt}\n", ["step 1 (eval", "nowhere"]),
    ("model: no-such-model\nsteps: [eval]\n", ["no-such-model"]),
]


@pytest.mark.parametrize("text, needles", BAD)
def test_bad_recipes_are_refused_before_anything_runs(tiny_dir, tmp_path, text, needles):
    path = tmp_path / "bad.yaml"
    path.write_text(text.replace("MODEL", str(tiny_dir)))
    with pytest.raises(UserError) as exc:
        run_recipe(path)
    for needle in needles:
        assert needle in str(exc.value), str(exc.value)
    assert not (tmp_path / "bad.out").exists()


def test_keys_follow_file_contents_and_chain(tiny_dir, tmp_path):
    text = tmp_path / "data" / "a.txt"
    text.parent.mkdir()
    text.write_text("one two three " * 50)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {tiny_dir}\ndata: data\nsteps:\n  - quantize: {{bits: 4, data: self}}\n"
                      "  - eval\n  - eval: {seed: 1}\n")
    before = load_recipe(recipe).steps
    assert before[1].options["data"] == str(tmp_path / "data")  # top-level data, relative to the recipe
    assert before[0].options["data"] == "self"
    text.write_text("four five six " * 50)  # same name and size class, new contents
    after = load_recipe(recipe).steps
    assert after[0].key == before[0].key  # does not read the data
    assert after[1].key != before[1].key and after[2].key != before[2].key  # reads it / follows one that does
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.copytree(text.parent, moved / "data")
    shutil.copy(recipe, moved / "r.yaml")
    assert [s.key for s in load_recipe(moved / "r.yaml").steps] == [s.key for s in after]
