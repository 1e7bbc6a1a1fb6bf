"""`compress gate`: a candidate EvalReport against thresholds and a baseline EvalReport -> pass/fail per threshold.

Both reports must come from the same reference model and the same evaluation windows (their provenance hashes say
so); otherwise the comparison is meaningless and is refused. Results render as a table, JSON, JUnit XML and Markdown.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, make_dataclass
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

from compress.errors import UserError
from compress.outputs import signature

# threshold key -> (metric read from the candidate, comparison, what it means)
THRESHOLDS: dict[str, tuple[str, str, str]] = {
    "max_kl": ("kl_mean", "<=", "mean per-token KL(reference ‖ candidate)"),
    "max_kl_p99": ("kl_p99", "<=", "99th percentile of per-token KL"),
    "min_top1": ("top1_agreement", ">=", "top-1 agreement with the reference"),
    "max_ppl_increase": ("ppl", "<=", "perplexity increase over the baseline's, in %"),
    "min_accuracy": ("accuracy", ">=", "task accuracy"),
    "min_emb_cosine": ("emb_cosine", ">=", "embedding cosine to the reference (encoders)"),
    "max_size_bytes": ("size_bytes", "<=", "bytes of stored weights"),
}
# what a recipe's gate step accepts for each (annotations as strings: the recipe coerces YAML values by them)
THRESHOLD_TYPES = {k: "int | None" if k == "max_size_bytes" else "float | str | None" if k == "max_ppl_increase"
                   else "float | None" for k in THRESHOLDS}
GateOptions = make_dataclass(
    "GateOptions", [*((k, t, field(default=None)) for k, t in THRESHOLD_TYPES.items()),
                    ("thresholds", "Path | None", field(default=None))])
GateOptions.__doc__ = ("`gate`: THRESHOLDS on the last eval, against its baseline; a YAML file of thresholds may be "
                       "given too (options override it).")
PROVENANCE_KEYS = (("reference_sha256", "reference model"), ("windows_sha256", "evaluation windows"))
PERCENT = re.compile(r"^\s*([+-]?\d+(?:\.\d*)?(?:[eE][+-]?\d+)?)\s*%?\s*$")


@dataclass
class Check:
    """One threshold: the candidate's value, the limit, the baseline's value, the margin (positive = passing)."""

    name: str
    metric: str
    op: str
    limit: float
    value: float | None
    baseline: float | None
    margin: float | None
    passed: bool
    message: str


@dataclass
class GateResult:
    """Every check of one gate run, and the inputs they came from."""

    baseline: str
    candidate: str
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """True when every check passed (a gate with no checks is refused before it gets here)."""
        return all(c.passed for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"passed": self.passed, "baseline": self.baseline, "candidate": self.candidate,
                "checks": [asdict(c) for c in self.checks]}


def load_report(path: Path, role: str) -> dict[str, Any]:
    """An EvalReport from `compress eval --json`, or the `metrics` of an artifact's compress.json (file or dir)."""
    path = Path(path)
    if path.is_dir():
        path = path / "compress.json"
    if not path.is_file():
        raise UserError(f"--{role} {path}: no such file; write one with `compress eval ... --json > {role}.json`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise UserError(f"--{role} {path}: not valid JSON ({exc})") from exc
    if isinstance(data, dict) and "provenance" not in data and isinstance(data.get("metrics"), dict):
        data = data["metrics"]
    if not isinstance(data, dict) or "provenance" not in data or "kl_mean" not in data:
        raise UserError(f"--{role} {path}: not an EvalReport (no kl_mean/provenance); make it with "
                        "`compress eval MODEL --reference REF --json`")
    data["_path"] = str(path)
    return data


def load_thresholds(path: Path) -> dict[str, float]:
    """Thresholds from a YAML (or JSON) mapping of THRESHOLDS keys; errors name the line and key."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--thresholds {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "unknown position"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"--thresholds {path}: malformed YAML at {where}: {problem}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"--thresholds {path}: expected a mapping of thresholds (e.g. `max_kl: 0.05`), got "
                        f"{type(data).__name__}")
    data = data.get("gate", data) if isinstance(data.get("gate"), dict) else data
    out = {}
    lines = path.read_text(encoding="utf-8").splitlines()
    for key, value in data.items():
        k = str(key).replace("-", "_")
        line = next((i + 1 for i, t in enumerate(lines) if re.match(rf"\s*{re.escape(str(key))}\s*:", t)), None)
        where = f"line {line}, " if line else ""
        if k not in THRESHOLDS:
            raise UserError(f"--thresholds {path}: {where}unknown key '{key}'; use {', '.join(THRESHOLDS)}")
        out[k] = parse_limit(value, f"--thresholds {path}: {where}{key}")
    return out


def parse_limit(value: Any, what: str) -> float:
    """A finite number; '5%' and '5' both mean 5 (percent keys)."""
    if isinstance(value, bool):
        raise UserError(f"{what}: expected a number, got {value!r}")
    if isinstance(value, int | float):
        number = float(value)
    else:
        m = PERCENT.match(str(value))
        if not m:
            raise UserError(f"{what}: expected a number (e.g. 0.05 or 5%), got {value!r}")
        number = float(m.group(1))
    if not math.isfinite(number):
        raise UserError(f"{what}: expected a finite number, got {value!r}")
    return number


def check_comparable(baseline: dict[str, Any], candidate: dict[str, Any]) -> None:
    """Refuse reports measured against different references or on different windows, naming what differs."""
    bp, cp = baseline.get("provenance") or {}, candidate.get("provenance") or {}
    differ = [(label, bp.get(key), cp.get(key)) for key, label in PROVENANCE_KEYS if bp.get(key) != cp.get(key)]
    if differ:
        parts = "; ".join(f"{label} {str(a)[:12]} vs {str(b)[:12]}" for label, a, b in differ)
        raise UserError(f"--baseline {baseline['_path']} and --candidate {candidate['_path']} were measured on "
                        f"different inputs ({parts}): evaluate both with the same --reference and --data")


def run_gate(baseline: dict[str, Any], candidate: dict[str, Any], limits: dict[str, float]) -> GateResult:
    """Check `candidate` against every threshold in `limits` (ppl increase relative to `baseline`)."""
    if not limits:
        raise UserError("no thresholds given: pass e.g. --max-kl 0.05 --min-top1 0.9, or --thresholds gate.yaml")
    check_comparable(baseline, candidate)
    result = GateResult(baseline["_path"], candidate["_path"])
    for name, limit in limits.items():
        metric, op, meaning = THRESHOLDS[name]
        if name == "max_ppl_increase":
            value, base = _ppl_increase(baseline, candidate), baseline.get("ppl")
        else:
            value, base = candidate.get(metric), baseline.get(metric)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            hint = ("no task accuracy in this report" if metric == "accuracy" else
                    "encoders report emb_cosine; decoders kl, top-1 and ppl (with a --reference)")
            raise UserError(f"--candidate {candidate['_path']} has no {metric} for --{name.replace('_', '-')}: "
                            f"{hint}")
        value = float(value)
        margin = limit - value if op == "<=" else value - limit
        passed = margin >= 0
        v, lim = fmt_number(value), fmt_number(limit)
        message = (f"{meaning}: {v} {op} {lim}" if passed else
                   f"{meaning} is {v}, limit {op} {lim} (off by {fmt_number(abs(margin))})")
        label = "ppl increase % (baseline: ppl)" if name == "max_ppl_increase" else metric
        result.checks.append(Check(name, label, op, limit, value, None if base is None else float(base), margin,
                                   passed, message))
    return result


def _ppl_increase(baseline: dict[str, Any], candidate: dict[str, Any]) -> float | None:
    """Candidate perplexity over the baseline's, as a percentage increase."""
    b, c = baseline.get("ppl"), candidate.get("ppl")
    if b is None or c is None:
        return None
    return 100.0 * (float(c) / float(b) - 1.0)


def fmt_number(v: float) -> str:
    if abs(v) >= 1e4 and float(v).is_integer():
        return f"{int(v):,}"
    return f"{v:.4g}"


def junit_xml(result: GateResult) -> str:
    """JUnit XML: one testsuite, one testcase per threshold, <failure> on the failing ones."""
    failures = sum(not c.passed for c in result.checks)
    suite = ET.Element("testsuite", name="compress gate", tests=str(len(result.checks)), failures=str(failures),
                       errors="0", skipped="0")
    props = ET.SubElement(suite, "properties")
    for k in ("baseline", "candidate"):
        ET.SubElement(props, "property", name=k, value=getattr(result, k))
    for c in result.checks:
        case = ET.SubElement(suite, "testcase", classname="compress.gate", name=c.name, time="0")
        if not c.passed:
            ET.SubElement(case, "failure", message=c.message, type="threshold").text = (
                f"{c.metric} = {c.value!r}, limit {c.op} {c.limit!r}, baseline {c.baseline!r}")
        else:
            ET.SubElement(case, "system-out").text = c.message
    ET.indent(suite)
    return ('<?xml version="1.0" encoding="utf-8"?>\n' + f"<!-- {signature()} -->\n"
            + ET.tostring(suite, encoding="unicode") + "\n")


def markdown(result: GateResult) -> str:
    """A Markdown summary fit for a CI job summary: verdict line and one table row per threshold."""
    verdict = "PASSED" if result.passed else "FAILED"
    failed = sum(not c.passed for c in result.checks)
    lines = [f"<!-- {signature()} -->",
             f"### compress gate: {verdict} ({len(result.checks) - failed}/{len(result.checks)} thresholds)", "",
             f"Candidate `{result.candidate}` against baseline `{result.baseline}`.", "",
             "| | threshold | metric | candidate | limit | baseline | margin |", "|---|---|---|---|---|---|---|"]
    for c in result.checks:
        base = "-" if c.baseline is None else fmt_number(c.baseline)
        lines.append(f"| {'✅' if c.passed else '❌'} | {c.name} | {c.metric} | {fmt_number(c.value)} | {c.op} "
                     f"{fmt_number(c.limit)} | {base} | {fmt_number(c.margin)} |")
    return "\n".join(lines) + "\n"
