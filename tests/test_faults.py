"""Never lose a user's data: refused --out paths stay byte for byte, kills leave the old or the new output complete,
damaged outputs are caught before use, full or read-only disks and hostile inputs give one line and no leftovers."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app
from compress.outputs import MARKER
from tests.tiny_models import build

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()
LAUNCH = "import sys; from cli import main; sys.argv[0] = 'compress'; main()"


def _one_line_error(result, code: int, *needles: str) -> str:
    assert result.exit_code == code, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1, result.stderr
    err = errors[0]
    assert "Traceback" not in result.output
    for n in needles:
        assert n in err, err
    return err


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def _user_dir(path: Path) -> Path:
    (path / "sub").mkdir(parents=True)
    (path / "notes.txt").write_text("precious\n")
    (path / "sub" / "a.txt").write_text("x\n")
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "llama"
    build("llama").module.save_pretrained(path)
    return path


def _quantize_args(model: Path, out: Path, *extra: str) -> list[str]:
    return ["quantize", str(model), "--bits", "4", "--group-size", "16", "--tokens", "64", "--eval-tokens", "64",
            "--seq-len", "16", "--out", str(out), *extra]


def _loads(out: Path) -> None:
    from compress.integrity import verify
    from compress.models import load_model

    problems, n = verify(out)
    assert n > 0 and not problems, problems
    load_model(str(out))


# ------------------------------------------------------------------------------------------------ ownership


def test_quantize_refuses_a_user_directory_and_leaves_it_byte_for_byte(tiny, tmp_path):
    mywork = _user_dir(tmp_path / "mywork")
    before = _snapshot(mywork)
    err = _one_line_error(runner.invoke(app, _quantize_args(tiny, mywork)), 2, str(mywork), "--force",
                          "not written by compress")
    assert "notes.txt" in err
    assert _snapshot(mywork) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mywork"]  # no temporary sibling left


# Every verb that writes: (argv before the output flag, flag, kind). The model does not exist: the refusal comes
# first, before anything is loaded.
VERBS = [
    (["quantize", "nomodel/x", "--bits", "4"], "--out", "dir"),
    (["prune", "nomodel/x", "--blocks", "1"], "--out", "dir"),
    (["reparam", "nomodel/x", "--fold-bn"], "--out", "dir"),
    (["export", "nomodel/x"], "--onnx", "dir"),
    (["export", "nomodel/x"], "--gguf", "file"),
    (["convert", "nomodel/x"], "--compressed-tensors", "dir"),
    (["moe", "stats", "nomodel/x"], "--out", "dir"),
    (["moe", "rebalance", "nomodel/x"], "--out", "dir"),
    (["moe", "prune", "nomodel/x", "--experts", "1"], "--out", "dir"),
    (["moe", "place", "nomodel/x", "--devices", "2"], "--out", "file"),
    (["score", "nomodel/x"], "--out", "file"),
    (["score", "nomodel/x"], "--plot", "file"),
    (["quantize", "nomodel/x", "--bits", "4"], "--plot", "file"),
    (["eval", "nomodel/x"], "--out", "file"),
    (["gate", "--baseline", "b.json", "--candidate", "c.json"], "--junit", "file"),
    (["gate", "--baseline", "b.json", "--candidate", "c.json"], "--markdown", "file"),
    (["report", "nothing.json"], "--out", "file"),
    (["tune", "nomodel/x", "--gate", "g.yaml"], "--out", "dir"),
]


@pytest.mark.parametrize("argv,flag,kind", VERBS, ids=[f"{' '.join(v[0][:2])} {v[1]}" for v in VERBS])
def test_every_verb_refuses_what_it_did_not_write(argv, flag, kind, tmp_path):
    target = _user_dir(tmp_path / "mine") if kind == "dir" else tmp_path / "mine.out"
    if kind == "file":
        target.write_text("my own notes\n")
    before = _snapshot(tmp_path)
    _one_line_error(runner.invoke(app, [*argv, flag, str(target)]), 2, str(target), "--force")
    assert _snapshot(tmp_path) == before


def test_recipe_workdir_is_refused_unless_empty_or_its_own(tiny, tmp_path):
    work = _user_dir(tmp_path / "work")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {tiny}\nworkdir: work\nsteps:\n  - eval: {{tokens: 32, seq_len: 16}}\n")
    before = _snapshot(work)
    _one_line_error(runner.invoke(app, ["run", str(recipe)]), 2, "workdir", "--force")
    assert _snapshot(work) == before


def test_own_outputs_empty_dirs_and_forced_paths_are_replaced(tiny, tmp_path):
    out = tmp_path / "q"
    out.mkdir()  # empty: written
    assert runner.invoke(app, _quantize_args(tiny, out)).exit_code == 0
    assert (out / MARKER).is_file()
    first = json.loads((out / MARKER).read_text())
    assert "model.safetensors" in first["files"] and first["written_by"].startswith("compress")
    assert runner.invoke(app, _quantize_args(tiny, out, "--group-size", "32")).exit_code == 0  # its own: replaced
    _loads(out)
    mine = _user_dir(tmp_path / "mine")
    assert runner.invoke(app, _quantize_args(tiny, mine, "--force")).exit_code == 0
    assert not (mine / "notes.txt").exists()
    _loads(mine)


def test_single_files_own_replaced_foreign_refused_empty_accepted(tiny, tmp_path):
    plot, report = tmp_path / "bits.png", tmp_path / "eval.json"
    args = ["eval", str(tiny), "--tokens", "32", "--seq-len", "16", "--out", str(report)]
    assert runner.invoke(app, args).exit_code == 0
    assert json.loads(report.read_text())["written_by"].startswith("compress")
    assert runner.invoke(app, args).exit_code == 0  # its own file: replaced
    report.write_text('{"mine": 1}\n')
    _one_line_error(runner.invoke(app, args), 2, str(report), "--force")
    assert report.read_text() == '{"mine": 1}\n'
    plot.write_bytes(b"")  # empty (e.g. a CI step-summary file created for us): written
    scores = tmp_path / "scores.json"
    score = ["score", str(tiny), "--methods", "lim", "--tokens", "32", "--seq-len", "16", "--plot", str(plot),
             "--out", str(scores)]
    assert runner.invoke(app, score).exit_code == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and b"written by compress" in plot.read_bytes()
    assert runner.invoke(app, score).exit_code == 0
    from compress.importance.report import ImportanceReport

    assert ImportanceReport.load(scores).methods == ["lim"]  # the signed file still reads back


def test_force_never_applies_to_root_home_or_the_working_directory(tmp_path, monkeypatch):
    work = tmp_path / "proj"
    work.mkdir()
    monkeypatch.chdir(work)
    for target, why in [(".", "working directory"), (str(tmp_path), "holds the home or working directory"),
                        ("/", "root"), (str(Path.home()), "home directory")]:
        _one_line_error(runner.invoke(app, ["quantize", "nomodel/x", "--bits", "4", "--out", target, "--force"]), 2,
                        why)


def test_symlinked_out_is_refused(tmp_path):
    real = _user_dir(tmp_path / "real")
    (tmp_path / "link").symlink_to(real)
    _one_line_error(runner.invoke(app, ["quantize", "nomodel/x", "--bits", "4", "--out", str(tmp_path / "link")]),
                    2, "symbolic link")


# ------------------------------------------------------------------------------------------------ kills, races


def _spawn(args: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", LAUNCH, *args], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, **(env or {})})


def _state(out: Path) -> str:
    """Which output is at `out`: 'old' (group 32) or 'new' (group 16), after checking it is complete."""
    _loads(out)
    manifest = json.loads((out / "compress.json").read_text())
    groups = {m["group_size"] for m in manifest["modules"].values()}
    assert len(groups) == 1, groups
    return {32: "old", 16: "new"}[groups.pop()]


@pytest.mark.parametrize("point", ["before-install", "installed"])
def test_sigkill_at_each_install_step_leaves_a_complete_output(tiny, tmp_path, point):
    out = tmp_path / "q"
    assert runner.invoke(app, _quantize_args(tiny, out, "--group-size", "32")).exit_code == 0
    proc = _spawn(_quantize_args(tiny, out), {"COMPRESS_FAULT_AT": point})
    assert proc.wait(timeout=300) == -signal.SIGKILL
    assert _state(out) == ("old" if point == "before-install" else "new")
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".q.")]
    assert leftovers  # the killed run's temporary sibling (new output, or the old one after the swap)...
    assert runner.invoke(app, _quantize_args(tiny, out)).exit_code == 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".q.")] == []  # ...swept by the next run
    assert _state(out) == "new"


def test_sigkill_at_random_moments_of_a_real_quantize(tiny, tmp_path):
    """20 kills after a random delay spread over a whole run: every time, the old or the new output, complete."""
    out = tmp_path / "q"
    t0 = time.perf_counter()
    assert _spawn(_quantize_args(tiny, out, "--group-size", "32")).wait(timeout=300) == 0
    full = time.perf_counter() - t0
    rng = random.Random(14)
    seen = []
    for i in range(20):
        proc = _spawn(_quantize_args(tiny, out, "--group-size", "32" if i % 2 else "16"))
        try:
            proc.wait(timeout=rng.uniform(0.3, 1.05) * full)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        seen.append((proc.returncode, _state(out)))
    assert any(rc == -signal.SIGKILL for rc, _ in seen), seen


def test_two_runs_writing_the_same_out_leave_one_complete_output(tiny, tmp_path):
    out = tmp_path / "q"
    procs = [_spawn(_quantize_args(tiny, out, "--group-size", g)) for g in ("16", "32")]
    codes = [p.wait(timeout=300) for p in procs]
    assert codes == [0, 0], [p.stderr.read().decode()[-500:] for p in procs]
    assert _state(out) in ("old", "new")
    assert [p.name for p in tmp_path.iterdir()] == ["q"]


# ------------------------------------------------------------------------------------------------ integrity


@pytest.fixture
def artifact(tiny, tmp_path) -> Path:
    out = tmp_path / "art"
    assert runner.invoke(app, _quantize_args(tiny, out)).exit_code == 0
    return out


def test_verify_passes_a_clean_output(artifact):
    r = runner.invoke(app, ["verify", str(artifact)])
    assert r.exit_code == 0, r.output
    assert runner.invoke(app, ["load", str(artifact)]).exit_code == 0


@pytest.mark.parametrize("damage", ["truncate", "bitflip"])
def test_damaged_weights_are_caught_before_use(artifact, damage):
    weights = artifact / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "truncate":
        weights.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[len(data) - 7] ^= 0x10
        weights.write_bytes(bytes(data))
    for verb in (["load"], ["eval", "--tokens", "32", "--seq-len", "16"], ["export", "--onnx", str(artifact) + "-x"],
                 ["convert", "--compressed-tensors", str(artifact) + "-ct"]):
        args = [verb[0], str(artifact), *verb[1:]]
        _one_line_error(runner.invoke(app, args), 2, str(weights), "damaged")
    assert not Path(str(artifact) + "-x").exists() and not Path(str(artifact) + "-ct").exists()
    r = runner.invoke(app, ["verify", str(artifact)])
    assert r.exit_code == 1 and "model.safetensors" in r.stderr


def test_truncated_weights_without_a_marker_still_give_one_line(artifact):
    (artifact / MARKER).unlink()
    weights = artifact / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    _one_line_error(runner.invoke(app, ["load", str(artifact)]), 2, str(weights))


# ------------------------------------------------------------------------------------------------ the machine


def _mount_tmpfs(path: Path, size: str, readonly: bool = False) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root; run the suite as root to test full and read-only disks")
    path.mkdir()
    opts = f"size={size}" + (",ro" if readonly else "")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip()})")


@pytest.fixture
def small_disk(tmp_path):
    import shutil

    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "256k")
    (disk / ".fill").write_bytes(b"\0" * (shutil.disk_usage(disk).free - 16 * 1024))  # 16 KiB left
    yield disk
    subprocess.run(["umount", str(disk)], check=False)


def test_full_disk_exits_1_naming_the_path_and_leaves_nothing(tiny, small_disk):
    out = small_disk / "q"
    _one_line_error(runner.invoke(app, _quantize_args(tiny, out)), 1, str(out), "free")
    assert [p.name for p in small_disk.iterdir()] == [".fill"]


def test_disk_filling_mid_write_exits_1_and_leaves_nothing(small_disk):
    from compress.atomic import atomic_dir
    from compress.errors import EnvironmentFault

    with pytest.raises(EnvironmentFault, match="no space left"), atomic_dir(small_disk / "out") as tmp:
        (tmp / "big.bin").write_bytes(b"\0" * (1 << 20))
    assert [p.name for p in small_disk.iterdir()] == [".fill"]


def test_read_only_filesystem_exits_2_naming_the_path(tiny, tmp_path):
    ro = tmp_path / "ro"
    _mount_tmpfs(ro, "64k", readonly=True)
    try:
        _one_line_error(runner.invoke(app, _quantize_args(tiny, ro / "q")), 2, str(ro), "read-only")
    finally:
        subprocess.run(["umount", str(ro)], check=False)


# ------------------------------------------------------------------------------------------------ hostile inputs


class _Touch:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_pickle_that_would_run_code_is_refused_and_never_runs(tiny, tmp_path):
    import torch

    touched = tmp_path / "pwned"
    torch.save({"x": _Touch(str(touched))}, tmp_path / "w.pt")
    _one_line_error(runner.invoke(app, ["inspect", str(tmp_path / "w.pt"), "--arch", str(tiny)]), 2,
                    "--trust-pickle")
    assert not touched.exists()


def test_yaml_python_tags_are_refused(tmp_path):
    touched = tmp_path / "pwned"
    tag = f"!!python/object/apply:os.system ['touch {touched}']"
    (tmp_path / "r.yaml").write_text(f"model: {tag}\nsteps: []\n")
    _one_line_error(runner.invoke(app, ["run", str(tmp_path / "r.yaml")]), 2, "r.yaml")
    (tmp_path / "g.yaml").write_text(f"max_kl: {tag}\n")
    (tmp_path / "b.json").write_text("{}")
    _one_line_error(runner.invoke(app, ["gate", "--baseline", str(tmp_path / "b.json"), "--candidate",
                                        str(tmp_path / "b.json"), "--thresholds", str(tmp_path / "g.yaml")]), 2,
                    "g.yaml")
    assert not touched.exists()


def _tiny_gguf(path: Path) -> Path:
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_token_list([f"t{i}" for i in range(100)])
    w.add_tensor("token_embd.weight", np.ones((64, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_truncated_or_absurd_gguf_is_refused_quickly(tmp_path):
    from compress.models.gguf_check import check_gguf

    good = _tiny_gguf(tmp_path / "good.gguf")
    assert check_gguf(good)["tensors"] == 1
    data = good.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 100])
    huge_counts = bytearray(data)
    struct.pack_into("<Q", huge_counts, 8, 1 << 60)
    (tmp_path / "counts.gguf").write_bytes(bytes(huge_counts))
    huge_array = bytearray(data)
    at = data.index(b"tokenizer.ggml.tokens") + len("tokenizer.ggml.tokens") + 4 + 4  # key, value type, elem type
    struct.pack_into("<Q", huge_array, at, 1 << 62)
    (tmp_path / "array.gguf").write_bytes(bytes(huge_array))
    for name, needle in [("cut.gguf", "truncated"), ("counts.gguf", "promises"), ("array.gguf", "runs past")]:
        _one_line_error(runner.invoke(app, ["inspect", str(tmp_path / name)]), 2, name, needle)


def test_remote_code_is_refused_unless_trusted_and_never_imported(tiny, tmp_path):
    model = tmp_path / "remote"
    model.mkdir()
    for f in tiny.iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    touched = tmp_path / "pwned"
    (model / "modeling_evil.py").write_text(f"from pathlib import Path\nPath({str(touched)!r}).touch()\n")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (model / "config.json").write_text(json.dumps(config))
    for argv in (["inspect", str(model)], ["quantize", str(model), "--bits", "4", "--out", str(tmp_path / "q")]):
        _one_line_error(runner.invoke(app, argv), 2, "--trust-remote-code")
    assert not touched.exists() and not (tmp_path / "q").exists()
