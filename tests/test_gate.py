"""`compress gate`: pass exits 0, a failing threshold exits 1 with JUnit XML and Markdown, bad input exits 2."""

from __future__ import annotations

import json
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest
from typer.testing import CliRunner

from cli import app
from evals.gate import load_report, run_gate

runner = CliRunner()


def _report(tmp_path, name: str, **overrides) -> str:
    """An EvalReport as `compress eval --out` writes it, with chosen metric values."""
    body = {"model": name, "reference": "ref", "ppl": 40.0, "ppl_ref": 38.5, "kl_mean": 0.03, "kl_median": 0.02,
            "kl_p99": 0.2, "top1_agreement": 0.9, "emb_cosine": None, "size_bytes": 100_000_000, "bpw": 4.5,
            "tokens": 3072, "provenance": {"reference_sha256": "aaa", "windows_sha256": "www"}}
    for k, v in overrides.items():
        if k in ("reference_sha256", "windows_sha256"):
            body["provenance"][k] = v
        else:
            body[k] = v
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(body))
    return str(path)


def test_pass_exits_0_and_writes_junit_and_markdown(tmp_path):
    base, cand = _report(tmp_path, "base"), _report(tmp_path, "cand", kl_mean=0.04, ppl=41.0)
    r = runner.invoke(app, ["gate", "--baseline", base, "--candidate", cand, "--max-kl", "0.05", "--min-top1", "0.85",
                            "--max-ppl-increase", "5%", "--junit", str(tmp_path / "j.xml"), "--markdown",
                            str(tmp_path / "s.md")])
    assert r.exit_code == 0, r.output
    suite = ET.parse(tmp_path / "j.xml").getroot()
    assert suite.tag == "testsuite" and suite.get("tests") == "3" and suite.get("failures") == "0"
    assert [c.get("name") for c in suite.iter("testcase")] == ["max_kl", "min_top1", "max_ppl_increase"]
    md = (tmp_path / "s.md").read_text()
    assert "PASSED (3/3" in md and md.count("✅") == 3


def test_a_failing_threshold_exits_1_and_names_it(tmp_path):
    base, cand = _report(tmp_path, "base"), _report(tmp_path, "cand", kl_mean=0.08, ppl=44.0)
    r = runner.invoke(app, ["gate", "--baseline", base, "--candidate", cand, "--max-kl", "0.05", "--min-top1", "0.85",
                            "--max-ppl-increase", "5", "--junit", str(tmp_path / "j.xml"), "--markdown",
                            str(tmp_path / "s.md"), "--json"])
    assert r.exit_code == 1, r.output
    out = json.loads(r.stdout)
    assert not out["passed"] and [c["passed"] for c in out["checks"]] == [False, True, False]
    kl = out["checks"][0]
    assert kl["margin"] == pytest.approx(-0.03) and kl["baseline"] == 0.03
    assert out["checks"][2]["value"] == pytest.approx(10.0)  # 44 / 40 − 1, in %
    suite = ET.parse(tmp_path / "j.xml").getroot()
    failed = [c.get("name") for c in suite.iter("testcase") if c.find("failure") is not None]
    assert suite.get("failures") == "2" and failed == ["max_kl", "max_ppl_increase"]
    assert "FAILED (1/3" in (tmp_path / "s.md").read_text()
    assert "gate failed: max_kl" in r.stderr


def test_thresholds_from_yaml_and_flags_override(tmp_path):
    base, cand = _report(tmp_path, "base"), _report(tmp_path, "cand", kl_mean=0.04, size_bytes=120_000_000)
    (tmp_path / "g.yaml").write_text("gate:\n  max_kl: 0.01\n  max-size-bytes: 110000000\n")
    args = ["gate", "--baseline", base, "--candidate", cand, "--thresholds", str(tmp_path / "g.yaml"), "--json"]
    r = runner.invoke(app, args)
    assert r.exit_code == 1 and [c["name"] for c in json.loads(r.stdout)["checks"]] == ["max_kl", "max_size_bytes"]
    r = runner.invoke(app, [*args, "--max-kl", "0.05", "--max-size-bytes", "130000000"])
    assert r.exit_code == 0, r.output


def _assert_user_error(r, needle: str):
    assert r.exit_code == 2, r.output
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in r.output, err


def test_reports_from_different_references_or_windows_are_refused(tmp_path):
    base = _report(tmp_path, "base")
    other_ref = _report(tmp_path, "c1", reference_sha256="bbb")
    other_win = _report(tmp_path, "c2", windows_sha256="xxx", reference_sha256="bbb")
    _assert_user_error(runner.invoke(app, ["gate", "--baseline", base, "--candidate", other_ref, "--max-kl", "1"]),
                       "different inputs (reference model aaa vs bbb)")
    r = runner.invoke(app, ["gate", "--baseline", base, "--candidate", other_win, "--max-kl", "1"])
    _assert_user_error(r, "evaluation windows www vs xxx")


def test_bad_input_exits_2(tmp_path):
    base, enc = _report(tmp_path, "base"), _report(tmp_path, "enc", kl_mean=None, top1_agreement=None)
    (tmp_path / "bad.yaml").write_text("max_kl: 0.05\nmin_top1: [0.9\n")
    (tmp_path / "key.yaml").write_text("max_kl: 0.05\nmax_klx: 1\n")
    (tmp_path / "junk.json").write_text("{}")
    cases = [
        (["--candidate", enc, "--max-kl", "0.05"], "has no kl_mean for --max-kl"),
        (["--candidate", base, "--thresholds", str(tmp_path / "bad.yaml")], "malformed YAML at line 3"),
        (["--candidate", base, "--thresholds", str(tmp_path / "key.yaml")], "line 2, unknown key 'max_klx'"),
        (["--candidate", base], "no thresholds given"),
        (["--candidate", str(tmp_path / "junk.json"), "--max-kl", "1"], "not an EvalReport"),
        (["--candidate", str(tmp_path / "gone.json"), "--max-kl", "1"], "no such file"),
        (["--candidate", base, "--max-ppl-increase", "lots"], "expected a number"),
        (["--candidate", base, "--min-accuracy", "0.5"], "no task accuracy"),
    ]
    for extra, needle in cases:
        _assert_user_error(runner.invoke(app, ["gate", "--baseline", base, *extra]), needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml", "base.json", "enc.json", "junk.json",
                                                          "key.yaml"]


def test_artifact_dir_metrics_are_a_report(tmp_path):
    art = tmp_path / "art"
    art.mkdir()
    body = json.loads(Path(_report(tmp_path, "m")).read_text())
    (art / "compress.json").write_text(json.dumps({"format": "x", "metrics": body}))
    rep = load_report(art, "candidate")
    assert rep["kl_mean"] == 0.03
    res = run_gate(rep, rep, {"max_kl": 0.03})
    assert res.passed and res.checks[0].margin == 0
