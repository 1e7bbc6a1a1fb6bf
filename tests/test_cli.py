"""CLI bad-input contract: one line on stderr naming the input, exit code 2, no traceback, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app

runner = CliRunner()


def _run(args):
    return runner.invoke(app, args)


def _assert_user_error(result, needle: str):
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert "Traceback" not in result.output


@pytest.fixture
def t5_dir(tmp_path):
    from transformers import T5Config

    T5Config(d_model=8, num_layers=1, num_heads=1, d_ff=8, vocab_size=10).save_pretrained(tmp_path / "t5")
    return tmp_path / "t5"


def test_unknown_zoo_name(tmp_path):
    _assert_user_error(_run(["inspect", "nonesuch"]), "unknown model 'nonesuch'")
    _assert_user_error(_run(["models", "pull", "nonesuch"]), "unknown zoo model 'nonesuch'")


def test_missing_file_and_non_model_directory(tmp_path):
    _assert_user_error(_run(["inspect", str(tmp_path / "gone.gguf")]), "does not exist")
    _assert_user_error(_run(["inspect", str(tmp_path)]), "is not a model directory")


def test_unsupported_architecture(t5_dir):
    _assert_user_error(_run(["inspect", str(t5_dir)]), "unsupported architecture 't5'")


def test_bare_weights_file_needs_a_config(tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "w.safetensors"))
    _assert_user_error(_run(["inspect", str(tmp_path / "w.safetensors")]), "has no architecture")


def test_unknown_scorer_and_missing_data_fail_before_loading_and_write_nothing(tmp_path):
    out = tmp_path / "scores.json"
    _assert_user_error(_run(["score", "smollm2-135m", "--methods", "lim,bogus", "--out", str(out)]),
                       "unknown scorer 'bogus'")
    _assert_user_error(_run(["score", "smollm2-135m", "--data", str(tmp_path / "no.txt"), "--out", str(out)]),
                       "no such file")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_unknown_protocol():
    _assert_user_error(_run(["eval", "smollm2-135m", "--protocol", "mine"]), "unknown --protocol")


def test_models_list_json():
    result = _run(["models", "list", "--json"])
    assert result.exit_code == 0
    names = {r["name"] for r in json.loads(result.stdout)}
    assert {"smollm2-135m", "minilm-l6"} <= names


def test_debug_shows_the_traceback():
    result = _run(["inspect", "nonesuch", "--debug"])
    assert result.exit_code != 0 and result.exception is not None


@pytest.mark.parametrize("argv", [["quantize", "no-such-model", "--bits", "4"],
                                  ["eval", "smollm2-135m", "--data", "no-such-dir/"],
                                  ["export", "no/such/dir", "--onnx", "out-x"],
                                  ["prune", "smollm2-135m", "--blocks", "2", "--data", "nothing.txt"]])
def test_bad_paths_are_answered_before_torch_is_imported(argv, tmp_path):
    """A wrong path costs a fraction of a second: checked before torch/transformers load (-X importtime lists
    every module the process imported)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", "from cli import main; main()", *argv],
                          cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(Path(__file__).resolve().parents[1]), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2, proc.stderr[-500:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "import time:" in line}
    assert not {"torch", "transformers"} & imported, sorted(imported)[:20]
    assert [line for line in proc.stderr.splitlines() if line.startswith("error: ")]


def test_version():
    result = _run(["--version"])
    assert result.exit_code == 0 and result.stdout.startswith("compress ")
