"""`compress report`: one self-contained HTML page from real outputs of quantize / score / prune / gate on a tiny
random model, plus hand-written Pareto points and an export validation.json of the real shape."""

from __future__ import annotations

import base64
import json
import re

import pytest
from tiny_models import build
from typer.testing import CliRunner

from cli import app
from compress.errors import UserError
from evals.gate import load_report, run_gate
from evals.report import build_report, frontier, label_bpw

runner = CliRunner()
EVIL = "tiny<script>alert('x')</script>&co"
COMMON = ["--tokens", "64", "--seq-len", "16"]


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """A layer-wise artifact dir, an importance JSON (model name with <script>), a gate JSON, a Pareto JSON, a
    sublayer prune JSON and an EvalReport JSON, all written by the real code on a tiny llama."""
    d = tmp_path_factory.mktemp("report")
    build("llama").module.save_pretrained(d / "tiny")
    r = runner.invoke(app, ["quantize", str(d / "tiny"), "--layerwise", "--avg-bits", "5", *COMMON, "--eval-tokens",
                            "32", "--out", str(d / "art"), "--json"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["score", str(d / "tiny"), "--methods", "lim,zd", *COMMON, "--json"])
    assert r.exit_code == 0, r.output
    scores = json.loads(r.stdout)
    scores["model"] = EVIL
    (d / "scores.json").write_text(json.dumps(scores))
    r = runner.invoke(app, ["prune", str(d / "tiny"), "--sublayers", "2", *COMMON, "--eval-tokens", "32", "--json"])
    assert r.exit_code == 0, r.output
    (d / "prune.json").write_text(r.stdout)
    metrics = load_report(d / "art", "candidate")
    gate = run_gate(load_report(d / "art", "baseline"), metrics, {"max_kl": 0.5, "min_top1": 1.01}).to_dict()
    (d / "gate.json").write_text(json.dumps(gate))
    (d / "eval.json").write_text(json.dumps({k: v for k, v in metrics.items() if k != "_path"}))
    points = [{"label": "fp32", "size_bytes": 127_872, "kl_mean": 0.0},
              {"label": "layer-wise 5.0", "size_bytes": metrics["size_bytes"], "kl_mean": metrics["kl_mean"]},
              {"label": "q4 <b>", "size_bytes": 19_000, "kl_mean": 2.5e-5, "latency_ms": 3.1},
              {"label": "q4 dominated", "size_bytes": 24_000, "kl_mean": 4e-5, "latency_ms": 3.5}]
    (d / "pareto.json").write_text(json.dumps(points))
    return d


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_page_has_one_section_per_input_with_embedded_plots_and_nothing_external(outputs, tmp_path):
    out = tmp_path / "report.html"
    inputs = [outputs / "art", outputs / "scores.json", outputs / "gate.json", outputs / "pareto.json"]
    result = build_report(inputs, out, title="Tiny <b>llama</b> report")
    page = out.read_text(encoding="utf-8")
    assert [s["kind"] for s in result["sections"]] == ["quantize", "importance", "gate", "pareto"]
    assert page.count("<section ") == 4 and result["out"] == str(out)
    assert [s["plots"] for s in result["sections"]] == [1, 1, 0, 1]
    images = _images(page)
    assert len(images) == 3 and all(img.startswith(b"\x89PNG\r\n\x1a\n") for img in images)
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page.lower()
    # every src/href is a data: URI or an anchor on the page; no stylesheet, font or script is fetched
    assert all(v.startswith("data:image/png;base64,") for v in re.findall(r'src="([^"]*)"', page))
    assert all(v.startswith("#") for v in re.findall(r'href="([^"]*)"', page))
    assert "@import" not in page and "url(" not in page and "<link" not in page
    assert "Content-Security-Policy" in page
    assert "tiny&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;&amp;co" in page
    assert "<title>Tiny &lt;b&gt;llama&lt;/b&gt; report</title>" in page
    assert "q4 &lt;b&gt;" in page
    # the gate failed min_top1 (no model beats a limit of 101%); the artifact's units are listed
    assert 'class="badge fail">FAILED' in page and "min_top1" in page
    assert "block 0" in page and "embedding" in page


def test_every_kind_of_input_is_recognised(outputs, tmp_path):
    export = tmp_path / "onnx"
    export.mkdir()
    (export / "validation.json").write_text(json.dumps(VALIDATION))
    inputs = [outputs / "prune.json", outputs / "eval.json", export, outputs / "art" / "compress.json"]
    result = build_report(inputs, tmp_path / "r.html")
    assert [s["kind"] for s in result["sections"]] == ["prune", "eval", "validation", "quantize"]
    page = (tmp_path / "r.html").read_text()
    assert "Pruning per layer: sublayers" in page and "Removed sublayers, in removal order" in page
    assert 'class="badge pass">PASSED' in page and "prefill/logits" in page
    assert "0.999990" in page or "0.99999" in page  # a cosine tolerance is not rounded to 1


VALIDATION = {"model": "tiny", "format": "fp32", "out": "onnx",
              "export": {"files": ["model.onnx"], "task": "text-generation-with-past", "fmt": "fp32", "opset": 18},
              "export_seconds": 0.8, "validation_seconds": 0.7, "passed": True, "size_bytes": 261_789,
              "validation": {"vs source": {
                  "fmt": "fp32", "graph": "decoder", "passed": True,
                  "tolerance": {"rel_tol": 1e-4, "kl_max": 1e-4, "top1_min": 0.99, "cos_min": 0.99999,
                                "elementwise": True},
                  "checks": [{"name": "prefill/logits", "max_abs": 9.3e-08, "mean_abs": 1.6e-08, "ref_max": 0.46,
                              "atol": 4.7e-05, "cosine": 0.99999999, "kl_mean": 4.1e-16, "kl_p99": 1.6e-15,
                              "top1": 1.0, "failures": [], "passed": True}],
                  "inputs": {"windows": 2, "seq_len": 16}}}}


@pytest.mark.parametrize("name,content,needle", [
    ("bad.json", "{not json", "not valid JSON"),
    ("other.json", json.dumps({"hello": 1}), "not a compress output"),
    ("numbers.json", json.dumps([1, 2, 3]), "point 0 is not"),
    ("string.json", json.dumps("text"), "holds a JSON str"),
    ("pareto.json", json.dumps([{"label": "a", "size_bytes": 10}]), "point 0 is not"),
    ("emptydir", None, "a directory with no compress.json"),
    ("missing.json", ..., "no such file"),
])
def test_bad_input_raises_user_error_naming_the_file_and_writes_nothing(tmp_path, name, content, needle):
    path = tmp_path / name
    if content is None:
        path.mkdir()
    elif content is not ...:
        path.write_text(content)
    out = tmp_path / "out" / "report.html"
    with pytest.raises(UserError) as err:
        build_report([path], out)
    message = str(err.value)
    assert str(path) in message and needle in message and "expected" in message
    assert "\n" not in message
    assert not out.parent.exists()


def test_no_inputs_and_directory_out_are_refused(tmp_path):
    with pytest.raises(UserError, match="at least one input"):
        build_report([], tmp_path / "r.html")
    (tmp_path / "p.json").write_text(json.dumps([{"label": "a", "size_bytes": 1, "kl_mean": 0.1}]))
    with pytest.raises(UserError, match="is a directory"):
        build_report([tmp_path / "p.json"], tmp_path)


def test_output_is_written_atomically(tmp_path, monkeypatch):
    pts = tmp_path / "in" / "pareto.json"
    pts.parent.mkdir()
    pts.write_text(json.dumps([{"label": "a", "latency_ms": 2.0, "kl_mean": 0.1},
                               {"label": "b", "latency_ms": 1.0, "kl_mean": 0.3}]))
    out_dir = tmp_path / "out"
    out = out_dir / "report.html"
    build_report([pts], out)
    first = out.read_text()
    assert sorted(p.name for p in out_dir.iterdir()) == ["report.html"]  # no temporary sibling left
    build_report([pts], out, title="again")  # replaces the old page in one rename
    assert "again" in out.read_text() and sorted(p.name for p in out_dir.iterdir()) == ["report.html"]

    import compress.atomic

    def boom(src, dst):
        raise OSError("disk full")

    before = out.read_text()
    monkeypatch.setattr(compress.atomic.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        build_report([pts], out, title="never")
    assert out.read_text() == before != first  # the old page is intact
    assert sorted(p.name for p in out_dir.iterdir()) == ["report.html"]  # and the temporary file is gone


def test_frontier_and_spec_labels():
    pts = [{"label": "a", "size_bytes": 10, "kl_mean": 0.5}, {"label": "b", "size_bytes": 20, "kl_mean": 0.1},
           {"label": "c", "size_bytes": 15, "kl_mean": 0.6}, {"label": "d", "size_bytes": 30, "kl_mean": 0.0},
           {"label": "e", "latency_ms": 1.0, "kl_mean": 0.0}]
    assert frontier(pts, "size_bytes") == [0, 1, 3]
    assert frontier(pts, "latency_ms") == [4]
    assert label_bpw("q4g32s") == 4.5 and label_bpw("fp16") == 16.0 and label_bpw("q4g32a") == 4 + 20 / 32
    assert label_bpw("q8gchp") == pytest.approx(8 + 16 / 4096) and label_bpw("weird") is None
