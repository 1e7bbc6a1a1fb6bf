"""`compress report`: one self-contained HTML page from whatever compress wrote — importance scores, bits or pruning
per layer, before/after metrics, ONNX validation, gate results and a size (or latency) vs KL Pareto plot.

Each input is recognised by its keys (see `classify`): an artifact directory (compress.json, prune.json or
validation.json inside), or a JSON file written by `compress score / quantize / prune / eval / gate / export --json`,
or a list of Pareto points. Every input becomes one section; the page is written atomically.
"""

from __future__ import annotations

import io
import json
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compress.errors import UserError
from evals import report_html as h
from evals.report_html import Num, Raw, Section

EXPECTED = ("expected an artifact dir (compress.json, prune.json or validation.json inside) or a JSON file from "
            "`compress score`, `quantize`, `prune`, `eval`, `gate` or `export` (--json), or a list of Pareto points "
            "{label, size_bytes or latency_ms, kl_mean}")
TITLES = {"importance": "Per-layer importance", "quantize": "Bits per layer", "prune": "Pruning per layer",
          "eval": "Before / after metrics", "validation": "ONNX export validation", "gate": "Gate",
          "pareto": "Pareto front"}
DIR_FILES = ("compress.json", "prune.json", "validation.json")
PRUNE_FORMATS = ("compress-pruned-v1", "compress-width-v1")
PARETO_EXTRA = (("avg_bits", "avg bits"), ("bpw", "bits/weight"), ("kl_p99", "KL p99"), ("top1_agreement", "top-1"),
                ("top1", "top-1"), ("ppl", "ppl"))


@dataclass
class Input:
    """One recognised input: what it is and its content, normalised where outputs of one kind differ in shape."""

    path: Path  # as the user gave it
    source: Path  # the file read
    kind: str
    data: Any


def build_report(inputs: list[Path], out: Path, title: str | None = None) -> dict:
    """Read and recognise every input (all before writing anything), render one section each, write `out`
    atomically; returns {out, title, bytes, sections: [{kind, title, input, plots}]}."""
    from compress.atomic import write_text
    from compress.version import __version__

    if not inputs:
        raise UserError("compress report: give at least one input; " + EXPECTED)
    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out {out}: is a directory; give a file name such as report.html")
    items = [load_input(Path(p)) for p in inputs]
    sections = [_render(item) for item in items]
    title = title or "compress report"
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    meta = f"{len(sections)} input{'s' if len(sections) != 1 else ''} · generated {when} · compress {__version__}"
    text = h.page(title, meta, sections)
    write_text(out, text)
    return {"out": str(out), "title": title, "bytes": len(text.encode("utf-8")),
            "sections": [{"kind": s.kind, "title": s.title, "input": s.source, "plots": s.plots} for s in sections]}


# --- recognising inputs --------------------------------------------------------------------------------------------


def load_input(path: Path) -> Input:
    """A directory (its compress.json / prune.json / validation.json) or a JSON file, recognised by its keys."""
    if path.is_dir():
        for name in DIR_FILES:
            if (path / name).is_file():
                return classify(path, path / name, _read_json(path / name))
        raise UserError(f"{path}: a directory with no {', '.join(DIR_FILES)}; {EXPECTED}")
    if not path.exists():
        raise UserError(f"{path}: no such file or directory; {EXPECTED}")
    return classify(path, path, _read_json(path))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UserError(f"{path}: cannot read it ({exc.strerror or exc}); {EXPECTED}") from exc
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not a text file; {EXPECTED}") from exc
    except ValueError as exc:
        raise UserError(f"{path}: not valid JSON ({exc}); {EXPECTED}") from exc


def classify(path: Path, source: Path, data: Any) -> Input:
    """Which compress output `data` is, by its keys; UserError naming the file otherwise."""
    def made(kind: str, value: Any) -> Input:
        return Input(path, source, kind, value)

    if isinstance(data, list) or (isinstance(data, dict) and isinstance(data.get("points"), list)
                                  and "format" not in data):
        return made("pareto", _pareto_points(source, data if isinstance(data, list) else data["points"]))
    if not isinstance(data, dict):
        raise UserError(f"{source}: holds a JSON {type(data).__name__}; {EXPECTED}")
    keys = set(data)
    fmt = data.get("format")
    if fmt == "compress-packed-v1":
        return made("quantize", _quant_from_manifest(data))
    if fmt in PRUNE_FORMATS:
        result = dict(data.get("prune") or {})
        result.setdefault("model", data.get("base"))
        result.setdefault("metrics", data.get("metrics"))
        result["_format"] = fmt
        return made("prune", result)
    if isinstance(fmt, str) and fmt.startswith("compress-"):
        raise UserError(f"{source}: a {fmt} artifact, which the report does not show; {EXPECTED}")
    if {"methods", "direction", "blocks"} <= keys:
        return made("importance", data)
    if {"passed", "checks", "baseline", "candidate"} <= keys:
        return made("gate", data)
    if {"export", "validation"} <= keys:
        return made("validation", data)
    if {"checks", "tolerance", "graph"} <= keys:  # `compress validate --json`: one report
        return made("validation", {"model": data.get("onnx_path"), "format": data.get("fmt"), "export": {},
                                   "validation": {"vs reference": data}, "passed": data.get("passed")})
    if {"mode", "selection", "params_before"} <= keys:
        return made("prune", data)
    if "plan" in keys and ({"specs", "layers"} & keys):
        return made("quantize", _quant_from_result(data))
    if {"kl_mean", "provenance"} <= keys:
        return made("eval", data)
    shown = ", ".join(sorted(map(str, keys))[:8]) + (", …" if len(keys) > 8 else "")
    raise UserError(f"{source}: not a compress output this report knows (keys: {shown or 'none'}); {EXPECTED}")


def _pareto_points(source: Path, points: list) -> list[dict]:
    """Each point: a label, kl_mean, and size_bytes and/or latency_ms, all numbers."""
    if not points:
        raise UserError(f"{source}: an empty list; {EXPECTED}")
    out = []
    for i, p in enumerate(points):
        ok = (isinstance(p, dict) and "label" in p and _is_number(p.get("kl_mean"))
              and (_is_number(p.get("size_bytes")) or _is_number(p.get("latency_ms"))))
        if not ok:
            raise UserError(f"{source}: point {i} is not {{label, size_bytes or latency_ms, kl_mean}} with numbers; "
                            f"{EXPECTED}")
        out.append(p)
    return out


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _quant_from_manifest(m: dict) -> dict:
    """compress.json of a packed artifact -> the common quantize shape."""
    from compress.quantize.spec import QuantSpec

    layers = {n: (d.get("spec"), d.get("bpw")) for n, d in (m.get("layers") or {}).items()}
    if not layers:
        layers = {n: (QuantSpec(**d).label(), None) for n, d in (m.get("modules") or {}).items()}
    dist = m.get("distortion")
    if isinstance(dist, dict) and isinstance(dist.get("units"), list):  # DistortionTable.to_dict()
        labels = [QuantSpec(**c).label() for c in dist["candidates"]]
        dist = {u["name"]: dict(zip(labels, row, strict=True))
                for u, row in zip(dist["units"], dist["distortion"], strict=True)}
    return {"model": m.get("base"), "format": m.get("format"), "plan": m.get("plan") or {}, "layers": layers,
            "distortion": dist or {}, "metrics": m.get("metrics"), "bpw": m.get("bpw"),
            "size_bytes": m.get("size_bytes"), "notes": m.get("notes") or [], "file_bytes": None}


def _quant_from_result(r: dict) -> dict:
    """`compress quantize --json` output -> the common quantize shape (bpw per layer from the spec label)."""
    specs = r.get("specs") or {n: d.get("spec") for n, d in (r.get("layers") or {}).items()}
    return {"model": r.get("model"), "format": r.get("backend", "packed"), "plan": r.get("plan") or {},
            "layers": {n: (label, label_bpw(label)) for n, label in specs.items()},
            "distortion": r.get("distortion") or {}, "metrics": r.get("metrics"), "bpw": r.get("bpw"),
            "size_bytes": r.get("size_bytes"), "notes": r.get("notes") or [], "file_bytes": r.get("file_bytes")}


LABEL = re.compile(r"^q(\d+)g(\d+|ch)([asp])(?:-(\w+))?$")


def label_bpw(label: str | None) -> float | None:
    """Bits per weight of a spec label ('q4g32s' -> 4.5, 'fp16' -> 16); per-channel labels for a 4096-wide row."""
    from compress.quantize.spec import QuantSpec

    if not label:
        return None
    if label.startswith("fp") and label[2:].isdigit():
        return float(label[2:])
    m = LABEL.match(label)
    if not m:
        return None
    group = 0 if m.group(2) == "ch" else int(m.group(2))
    spec = QuantSpec(int(m.group(1)), group, m.group(3) != "a", m.group(4) or "rtn", positive_scale=m.group(3) == "p")
    return round(spec.bits_per_weight(4096 if group == 0 else group * 64), 4)


# --- sections ------------------------------------------------------------------------------------------------------


def _render(item: Input) -> Section:
    section = Section(item.kind, TITLES[item.kind], str(item.source))
    try:
        RENDERERS[item.kind](section, item.data)
    except UserError as exc:
        raise UserError(f"{item.source}: {exc}") from exc
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise UserError(f"{item.source}: looks like {TITLES[item.kind].lower()} but cannot be read "
                        f"({type(exc).__name__}: {exc}); {EXPECTED}") from exc
    return section


def _importance(s: Section, d: dict) -> None:
    from compress.importance.report import ImportanceReport

    fields = ("model", "family", "kind", "divergence", "data", "methods", "direction", "blocks", "sublayers",
              "linears", "timings_s", "checks", "tool_version")
    report = ImportanceReport(**{k: d[k] if k in d else _IMPORTANCE_DEFAULTS[k] for k in fields})
    methods = list(report.methods)
    data = report.data or {}
    timing = ", ".join(f"{m} {h.fmt(float(t))} s" for m, t in (report.timings_s or {}).items())
    s.summary = (f"{report.model} ({report.family}, {report.kind}): {report.num_blocks} blocks scored by "
                 f"{', '.join(methods)} on {h.fmt(data.get('tokens'))} {data.get('source', '')} calibration tokens, "
                 f"divergence {report.divergence}" + (f"; took {timing}" if timing else "") + ".")
    if any(v is not None for m in methods for v in report.block_scores(m)):
        from evals.plots import plot_importance

        _plot_file(s, plot_importance, report, alt="importance per block, one panel per method")
    ranks = {m: _ranks(report.block_scores(m), report.direction.get(m, "")) for m in methods}
    s.add(h.h3("Blocks"), h.para("Each score with its rank (1 = most important by that method's direction: "
                                 + "; ".join(f"{m}: {report.direction.get(m, '?')}" for m in methods) + ").",
                                 "note"))
    rows = [[b.get("index", i), b.get("path", ""), b.get("params")]
            + [_scored(b["scores"].get(m), ranks[m][i]) for m in methods] for i, b in enumerate(report.blocks)]
    s.add(h.table(["block", "path", "params", *methods], rows, mono=(1,)))
    if report.sublayers:
        sub_methods = [m for m in methods if any(x["scores"].get(m) is not None for x in report.sublayers)]
        rows = [[x["block"], x["name"], x.get("path", ""), x.get("params")] + [x["scores"].get(m) for m in sub_methods]
                for x in report.sublayers]
        s.add(h.details(f"Sublayers ({len(rows)})",
                        h.table(["block", "sublayer", "path", "params", *sub_methods], rows, mono=(2,))))
    if report.linears:
        lin_methods = [m for m in methods if any(x["scores"].get(m) is not None for x in report.linears)]
        rows = [[x["block"], x["path"]] + [x["scores"].get(m) for m in lin_methods] for x in report.linears]
        s.add(h.details(f"Linear layers ({len(rows)})", h.table(["block", "path", *lin_methods], rows, mono=(1,))))
    checks = {k: v for k, v in (report.checks or {}).items() if isinstance(v, dict)}
    if checks:
        s.add(h.h3("Agreement with measured sensitivity"), h.para(str(report.checks.get("against", "")), "note"),
              h.table(["method", "Spearman ρ", "p-value"], [[m, v.get("spearman"), v.get("p_value")]
                                                            for m, v in checks.items()]))


_IMPORTANCE_DEFAULTS = {"model": "?", "family": "?", "kind": "?", "divergence": "?", "data": {}, "sublayers": [],
                        "linears": [], "timings_s": {}, "checks": {}, "tool_version": ""}


def _ranks(values: list, direction: str) -> list[int | None]:
    """Rank of each value (1 = most important) given 'higher = more important' or 'lower = ...'; None stays None."""
    higher = direction.startswith("higher")
    order = sorted((i for i, v in enumerate(values) if v is not None), key=lambda i: -values[i] if higher
                   else values[i])
    ranks: list[int | None] = [None] * len(values)
    for r, i in enumerate(order, 1):
        ranks[i] = r
    return ranks


def _scored(value, rank) -> Num | None:
    if value is None:
        return None
    return Num(f"{h.fmt(float(value))}  #{rank}", strong=rank == 1)


def _quantize(s: Section, q: dict) -> None:
    plan = q["plan"] or {}
    meta = plan.get("meta") or {}
    layers: dict = q["layers"]
    units: dict = meta.get("units") or {}
    specs = [spec for spec, _ in layers.values()]
    counts = {sp: specs.count(sp) for sp in dict.fromkeys(specs)}
    mode = meta.get("mode") or ("layer-wise" if units else "plan")
    s.title = f"{TITLES['quantize']}: {mode}"
    budget = (f"budget {h.fmt(meta['budget_avg_bits'])} bits/weight" if meta.get("budget_avg_bits") is not None
              else "")
    s.summary = (f"{q['model']}: {len(layers)} layers quantized ({mode}"
                 + (f", {meta['allocator']} allocator" if meta.get("allocator") else "") + ")"
                 + (f", {budget}" if budget else "") + f": {h.fmt(q.get('bpw'))} bits/weight overall, "
                 f"{h.fmt_bytes(q.get('size_bytes'))} of weights. Specs: "
                 + ", ".join(f"{sp} × {n}" for sp, n in counts.items()) + ".")
    calib = meta.get("calibration") or {}
    s.add(h.facts([("model", q["model"]), ("format", q.get("format")), ("target", meta.get("target")),
                   ("allocator", meta.get("allocator")), ("granularity", meta.get("granularity")),
                   ("measure", meta.get("measure")), ("candidates", ", ".join(meta.get("candidates") or []) or None),
                   ("budget", _budget(meta)),
                   ("planned average", None if meta.get("planned_avg_bits") is None
                    else Num(f"{h.fmt(meta['planned_avg_bits'])} bits/weight")),
                   ("bits per weight", q.get("bpw")), ("stored weights", Num(h.fmt_bytes(q.get("size_bytes")))),
                   ("file on disk", None if not q.get("file_bytes") else Num(h.fmt_bytes(q["file_bytes"]))),
                   ("calibration", _describe_data(calib) or None)]))
    dist = q["distortion"] or {}
    if units:
        unit_bpw = _unit_bpw(units, layers, plan)
        _plot_fig(s, _bits_figure, q["model"], units, unit_bpw, dist, meta.get("allocator", ""),
                  alt="bits per weight chosen per unit, with each unit's measured divergence per candidate")
        labels = list(next(iter(dist.values()))) if dist else []
        rows = [[u, units[u], unit_bpw.get(u)] + [_chosen(dist.get(u, {}).get(lab), lab == units[u]) for lab in labels]
                for u in units]
        s.add(h.h3("Per unit"),
              h.para("Divergence columns: calibration divergence with only that unit quantized to that candidate; "
                     "bold = chosen." if labels else "No distortion table was stored.", "note"),
              h.table(["unit", "spec", "bits/weight", *labels], rows))
    elif len({b for _, b in layers.values()}) > 1:
        _plot_fig(s, _layer_bits_figure, q["model"], layers, alt="bits per weight of every quantized layer")
    rows = [[name, spec, bpw] for name, (spec, bpw) in layers.items()]
    by_spec = [[sp, n, label_bpw(sp), Num(h.fmt_pct(n / len(layers)))] for sp, n in counts.items()]
    s.add(h.h3("Per layer"), h.table(["spec", "layers", "bits/weight", "share of layers"], by_spec),
          h.details(f"All {len(rows)} layers", h.table(["layer", "spec", "bits/weight"], rows, mono=(0,))))
    _metrics_part(s, q.get("metrics"))
    if q.get("notes"):
        s.add(h.h3("Notes"), h.bullets([str(n) for n in q["notes"]]))


def _budget(meta: dict) -> str | None:
    parts = []
    if meta.get("budget_avg_bits") is not None:
        parts.append(f"{h.fmt(meta['budget_avg_bits'])} bits/weight")
    if meta.get("budget_bytes") is not None:
        parts.append(h.fmt_bytes(meta["budget_bytes"]))
    return Num(" = ".join(parts)) if parts else None


def _unit_bpw(units: dict, layers: dict, plan: dict) -> dict[str, float | None]:
    """Bits/weight of each unit: the mean over its layers when known, else from its spec label."""
    out = {}
    for unit, label in units.items():
        block = re.match(r"^block (\d+)$", unit)
        if block:
            members = [b for n, (_, b) in layers.items() if _block_of(n) == int(block.group(1)) and b is not None]
        elif unit in layers:
            members = [layers[unit][1]] if layers[unit][1] is not None else []
        else:
            members = []
        out[unit] = round(sum(members) / len(members), 4) if members else label_bpw(label)
    return out


def _block_of(name: str) -> int | None:
    """Block index of a module path ('model.layers.3.mlp.up_proj' -> 3), or None outside the block stack."""
    m = re.search(r"\.(?:layers|layer|h|blocks|block)\.(\d+)\.", f".{name}.")
    return int(m.group(1)) if m else None


def _short_unit(name: str) -> str:
    """Axis label of a unit: block index, 'emb', 'head', or 'block.leaf' for one Linear."""
    if name.startswith("block "):
        return name[6:]
    if name.startswith("embedding"):
        return "emb"
    if name == "head":
        return "head"
    b = _block_of(name)
    leaf = name.rsplit(".", 1)[-1]
    return f"{b}.{leaf}" if b is not None else leaf


def _chosen(value, chosen: bool):
    if value is None:
        return None
    return Num(h.fmt(float(value)), strong=chosen)


def _bits_figure(plt, model: str, units: dict, unit_bpw: dict, dist: dict, allocator: str):
    names = list(units)
    x = list(range(len(names)))
    fig, ax = plt.subplots(figsize=(max(8.0, min(0.3 * len(names) + 3.5, 11.0)), 3.8), layout="constrained")
    ax.bar(x, [unit_bpw.get(n) or 0.0 for n in names], color="#4c72b0", alpha=0.85, label="chosen bits/weight")
    ax.set_ylabel("bits per weight")
    ax.set_xticks(x, [_short_unit(n) for n in names], fontsize=7, rotation=90 if len(names) > 40 else 0)
    ax.set_xlabel("unit (block index; emb = embedding, head = LM head)")
    ax.set_ylim(0, max([v or 0 for v in unit_bpw.values()] + [1]) * 1.15)
    if dist:
        ax2 = ax.twinx()
        labels = list(next(iter(dist.values())))
        for lab in labels:
            ys = [dist.get(n, {}).get(lab) for n in names]
            ax2.plot(x, [float("nan") if y is None or y <= 0 else y for y in ys], lw=0.9, marker=".", ms=4,
                     label=lab)
        chosen = [(i, dist.get(n, {}).get(units[n])) for i, n in enumerate(names)]
        chosen = [(i, y) for i, y in chosen if y is not None and y > 0]
        if chosen:
            ax2.scatter(*zip(*chosen, strict=True), s=40, facecolors="none", edgecolors="black", zorder=5,
                        label="chosen")
        ax2.set_yscale("log")
        ax2.set_ylabel("divergence, this unit alone")
    fig.legend(fontsize=7, loc="outside right upper", title="candidate" if dist else None, title_fontsize=7)
    ax.set_title(f"{Path(str(model)).name}: bits per unit ({allocator or 'plan'})", fontsize=9, loc="left")
    return fig


def _layer_bits_figure(plt, model: str, layers: dict):
    names = list(layers)
    specs = list(dict.fromkeys(sp for sp, _ in layers.values()))
    colors = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(max(8.0, min(0.12 * len(names) + 3.5, 11.0)), 3.4), layout="constrained")
    for k, sp in enumerate(specs):
        idx = [i for i, n in enumerate(names) if layers[n][0] == sp]
        ax.bar(idx, [layers[names[i]][1] or 0.0 for i in idx], color=colors(k % 10), label=sp, width=0.9)
    ax.set_xticks(range(len(names)), [_short_unit(n) for n in names], fontsize=6, rotation=90)
    ax.set_ylabel("bits per weight")
    fig.legend(fontsize=7, loc="outside right upper", title="spec", title_fontsize=7)
    ax.set_title(f"{Path(str(model)).name}: bits per layer", fontsize=9, loc="left")
    return fig


def _prune(s: Section, r: dict) -> None:
    mode, method = r.get("mode"), r.get("method")
    if not mode:
        s.summary = f"{r.get('model')}: pruned artifact ({r.get('_format')}) with no pruning record in compress.json."
        _metrics_part(s, r.get("metrics"))
        return
    before, after = r.get("params_before"), r.get("params_after")
    cut = f" ({h.fmt_change(after, before)})" if before and after is not None and after != before else ""
    removed = r.get("removed") or []
    what = {"blocks": f"removed {len(removed)} of {r.get('of')} blocks",
            "sublayers": f"removed {len(removed)} of {r.get('of')} attention/FFN sublayers",
            "width": f"removed {r.get('requested')} of each block's width",
            "sparsity": f"zeroed {r.get('requested')} of the block weights"}.get(mode, f"{mode} pruning")
    s.title = f"{TITLES['prune']}: {mode}"
    final = _last((r.get("selection") or {}).get("divergence"))
    s.summary = (f"{r.get('model')}: {method} {what}; parameters {h.fmt(before)} → {h.fmt(after)}{cut}"
                 + (f"; calibration {r.get('divergence', 'divergence')} after pruning {h.fmt(final)}"
                    if final is not None else "") + ".")
    s.add(h.facts([("model", r.get("model")), ("mode", mode), ("method", method), ("requested", r.get("requested")),
                   ("parameters before", before), ("parameters after", after),
                   ("blocks after", r.get("blocks_after")),
                   ("calibration", _describe_data(r.get("calibration")) or None),
                   ("selection time", None if r.get("select_seconds") is None
                    else Num(f"{h.fmt(float(r['select_seconds']))} s"))]))
    if mode in ("blocks", "sublayers", "width"):
        from compress.prune.plot import plot_removed

        if r.get("selection") and r.get("num_blocks"):
            _plot_file(s, plot_removed, r, alt=f"what {mode} pruning removed, by depth")
    elif mode == "sparsity" and removed:
        _plot_fig(s, _sparsity_figure, r, alt="share of weights zeroed per block")
    selection = r.get("selection") or {}
    divergence = selection.get("divergence") or []
    if mode == "blocks":
        order = [int(u) for u in selection.get("removed") or removed]
        rows = [[step, b, divergence[step - 1] if step - 1 < len(divergence) else None]
                for step, b in enumerate(order, 1)]
        s.add(h.h3("Removed blocks, in removal order"),
              h.table(["step", "block", f"calibration {r.get('divergence', 'kl')} after"], rows))
    elif mode == "sublayers":
        rows = [[step, d.get("block"), d.get("sublayer"), d.get("params"),
                 divergence[step - 1] if step - 1 < len(divergence) else None] for step, d in enumerate(removed, 1)]
        s.add(h.h3("Removed sublayers, in removal order"),
              h.table(["step", "block", "sublayer", "params", f"calibration {r.get('divergence', 'kl')} after"], rows))
    elif mode == "width":
        rows = [[d.get("block"), Num(h.fmt_pct(d.get("attention_ratio"))), Num(h.fmt_pct(d.get("ffn_ratio"))),
                 d.get("kept_heads"), d.get("kept_channels"), d.get("distortion_alone")] for d in removed]
        s.add(h.h3("Per block"), h.table(["block", "attention removed", "FFN removed", "heads kept", "channels kept",
                                          "divergence, this block alone"], rows))
    elif mode == "sparsity":
        rows = [[d.get("block"), d.get("zeros"), d.get("weights"), Num(h.fmt_pct(d.get("sparsity")))] for d in removed]
        record = r.get("sparsity") or {}
        s.add(h.h3("Per block"), h.para(f"Pattern {record.get('pattern', '?')}, weights scored by "
                                        f"{record.get('scored_by', '?')}.", "note"),
              h.table(["block", "zeroed", "weights", "sparsity"], rows))
        linears = record.get("linears") or {}
        if linears:
            rows = [[n, v.get("zeros"), v.get("weights"), Num(h.fmt_pct(v.get("sparsity")))]
                    for n, v in linears.items()]
            s.add(h.details(f"All {len(rows)} layers", h.table(["layer", "zeroed", "weights", "sparsity"], rows,
                                                                mono=(0,))))
    heal = r.get("heal") or {}
    _metrics_part(s, r.get("metrics"), heal.get("metrics_before"))
    if r.get("notes"):
        s.add(h.h3("Notes"), h.bullets([str(n) for n in r["notes"]]))


def _last(values) -> float | None:
    vals = [v for v in values or [] if v is not None]
    return vals[-1] if vals else None


def _sparsity_figure(plt, r: dict):
    rows = r["removed"]
    x = [d["block"] for d in rows]
    fig, ax = plt.subplots(figsize=(max(7.0, min(0.3 * len(x) + 3, 11.0)), 3.0))
    ax.bar(x, [d["sparsity"] for d in rows], color="#4c72b0")
    ax.set_xticks(x, [str(i) for i in x], fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_xlabel("block (depth)")
    ax.set_ylabel("share of weights zeroed")
    ax.set_title(f"{Path(str(r.get('model'))).name}: sparsity {r.get('requested')} ({r.get('method')})",
                 fontsize=9, loc="left")
    return fig


METRIC_ROWS = (("ppl", "perplexity"), ("kl_mean", "KL mean (reference ‖ candidate)"), ("kl_median", "KL median"),
               ("kl_p99", "KL p99"), ("top1_agreement", "top-1 agreement"),
               ("emb_cosine", "embedding cosine to the reference"), ("accuracy", "task accuracy"),
               ("size_bytes", "stored weight bytes"), ("bpw", "bits per weight"), ("tokens", "evaluation tokens"))


def _metric_cell(key: str, value):
    if value is None:
        return None
    if key in ("top1_agreement", "top1", "accuracy"):
        return Num(h.fmt_pct(value, 2))
    if key == "size_bytes":
        return Num(h.fmt_bytes(value))
    if key == "emb_cosine":
        return _cosine(value)
    return value


def _cosine(value) -> Num | None:
    """Cosines near 1 need their decimals: 0.99999 is not 1."""
    return None if value is None else Num(f"{float(value):.6f}")


def metrics_table(m: dict, before: dict | None = None) -> str:
    """Reference (before) vs candidate (after) for every metric present; with `before`, a 'before healing' column."""
    headers = ["metric", "reference", *(["before healing"] if before else []), "candidate", "change"]
    rows = []
    for key, label in METRIC_ROWS:
        value = m.get(key)
        if value is None:
            continue
        ref = m.get("ppl_ref") if key == "ppl" else None
        change = Num(h.fmt_change(value, ref)) if key == "ppl" and ref else None
        rows.append([label, _metric_cell(key, ref), *([_metric_cell(key, before.get(key))] if before else []),
                     _metric_cell(key, value), change])
    return h.table(headers, rows)


def _metrics_part(s: Section, m: dict | None, before: dict | None = None) -> None:
    if not m:
        s.add(h.para("No before/after metrics were stored with this result.", "note"))
        return
    s.add(h.h3("Before / after"), h.para(_metrics_line(m), "note"), metrics_table(m, before))


def _metrics_line(m: dict) -> str:
    data = (m.get("provenance") or {}).get("data") or {}
    where = _describe_data(data)
    return (f"Candidate {m.get('model')} against reference {m.get('reference') or '(none)'}"
            + (f" on {where}" if where else "") + ".")


def _describe_data(d: dict | None) -> str:
    if not d:
        return ""
    parts = [f"{h.fmt(d['tokens'])} tokens" if d.get("tokens") is not None else None,
             f"{d['windows']} windows of {d.get('seq_len')}" if d.get("windows") is not None else None,
             f"source {d['source']}" if d.get("source") else None, f"split {d['split']}" if d.get("split") else None,
             f"sha256 {str(d['sha256'])[:12]}" if d.get("sha256") else None]
    return ", ".join(p for p in parts if p)


def _eval(s: Section, m: dict) -> None:
    bits = []
    if m.get("kl_mean") is not None:
        bits.append(f"KL mean {h.fmt(m['kl_mean'])}")
    if m.get("top1_agreement") is not None:
        bits.append(f"top-1 {h.fmt_pct(m['top1_agreement'], 2)}")
    if m.get("ppl") is not None:
        bits.append(f"perplexity {h.fmt(m.get('ppl_ref'))} → {h.fmt(m['ppl'])}"
                    + (f" ({h.fmt_change(m['ppl'], m['ppl_ref'])})" if m.get("ppl_ref") else ""))
    if m.get("emb_cosine") is not None:
        bits.append(f"embedding cosine {m['emb_cosine']:.6f}")
    bits.append(f"{h.fmt(m.get('bpw'))} bits/weight")
    s.summary = f"{m.get('model')} vs {m.get('reference') or '(no reference)'}: " + ", ".join(bits) + "."
    prov = m.get("provenance") or {}
    s.add(metrics_table(m), h.facts([("evaluation data", _describe_data(prov.get("data")) or None),
                                     ("model sha256", _short(prov.get("model_sha256"))),
                                     ("reference sha256", _short(prov.get("reference_sha256"))),
                                     ("tool version", prov.get("tool_version"))]))


def _short(v) -> str | None:
    return None if not v else str(v)[:16] + "…"


def _validation(s: Section, v: dict) -> None:
    exp = v.get("export") or {}
    reports = v.get("validation")
    s.verdict = v.get("passed")
    graph = f"{h.fmt_bytes(v['size_bytes'])} of graph" if v.get("size_bytes") is not None else "graph"
    head = (f"{v.get('model')} exported as {v.get('format') or exp.get('fmt', '?')} ONNX"
            + (f" (opset {exp['opset']}, task {exp.get('task')})" if exp.get("opset") else "") + f", {graph}")
    if not reports:
        s.summary = head + ": not validated (--no-validate)."
        return
    checks = [c for rep in reports.values() for c in rep.get("checks") or []]
    failed = sum(not c.get("passed") for c in checks)
    took = f" in {h.fmt(float(v['validation_seconds']))} s" if v.get("validation_seconds") is not None else ""
    s.summary = head + f": {len(checks) - failed}/{len(checks)} checks passed ({'; '.join(reports)}){took}."
    rw = (exp.get("extra") or {}).get("rewrite")
    if rw:
        s.add(h.para(f"Quantized layers carry the artifact's own codes ({rw.get('kind')}): {len(rw.get('layers', []))} "
                     f"layers, bits {rw.get('bits')}; weight bytes {h.fmt(rw.get('weight_bytes_before'))} → "
                     f"{h.fmt(rw.get('weight_bytes_after'))}.", "note"))
    for ref, rep in reports.items():
        tol = rep.get("tolerance") or {}
        tol_text = ", ".join(f"{k} {x:.6g}" if _is_number(x) else f"{k} {x}" for k, x in tol.items()
                             if x is not None and k != "elementwise")
        inputs = rep.get("inputs") or {}
        s.add(h.h3(f"{ref}"), h.para(f"{rep.get('graph', '')} graph; tolerance {tol_text or '–'}"
                                      + (f"; inputs: {', '.join(f'{k} {x}' for k, x in inputs.items())}"
                                         if inputs else "") + ".", "note"))
        rows = [[c.get("name"), c.get("max_abs"), c.get("atol"), _cosine(c.get("cosine")), c.get("kl_mean"),
                 c.get("kl_p99"),
                 None if c.get("top1") is None else Num(h.fmt_pct(c["top1"], 2)),
                 h.verdict(bool(c.get("passed")), c.get("failures"))] for c in rep.get("checks") or []]
        s.add(h.table(["check", "max abs diff", "tolerance", "cosine", "KL mean", "KL p99", "top-1", "result"], rows,
                      mono=(0,)))


def _gate(s: Section, g: dict) -> None:
    checks = g.get("checks") or []
    failed = [c for c in checks if not c.get("passed")]
    s.verdict = bool(g.get("passed"))
    s.summary = (f"{'PASSED' if g.get('passed') else 'FAILED'}: {len(checks) - len(failed)}/{len(checks)} thresholds "
                 f"met by candidate {g.get('candidate')} against baseline {g.get('baseline')}.")
    rows = [[h.verdict(bool(c.get("passed"))), c.get("name"), c.get("metric"), _gate_value(c, c.get("value")),
             Num(f"{c.get('op', '')} {h.fmt(c.get('limit'))}"), _gate_value(c, c.get("baseline")), c.get("margin")]
            for c in checks]
    s.add(h.table(["result", "threshold", "metric", "candidate", "limit", "baseline", "margin"], rows))
    if failed:
        s.add(h.h3("Failed"), h.bullets([f"{c.get('name')}: {c.get('message')}" for c in failed], "fail-list"))


def _gate_value(c: dict, v):
    if v is None:
        return None
    return Num(h.fmt_bytes(v)) if c.get("name") == "max_size_bytes" else v


def _pareto(s: Section, points: list[dict]) -> None:
    axes = [k for k in ("size_bytes", "latency_ms") if any(_is_number(p.get(k)) for p in points)]
    fronts = {k: frontier(points, k) for k in axes}
    on_any = set().union(*fronts.values()) if fronts else set()
    desc = []
    for k in axes:
        best = [points[i] for i in fronts[k]]
        desc.append(f"{len(best)} on the {'size' if k == 'size_bytes' else 'latency'}–KL frontier")
    s.summary = f"{len(points)} candidates; " + ", ".join(desc) + " (lower is better on both axes)."
    _plot_fig(s, _pareto_figure, points, axes, fronts, alt="Pareto plot: KL mean against " + " and ".join(
        "size" if k == "size_bytes" else "latency" for k in axes))
    extra = [(k, lab) for k, lab in PARETO_EXTRA if any(p.get(k) is not None for p in points)]
    key = axes[0]
    order = sorted(range(len(points)), key=lambda i: (points[i].get(key) is None, points[i].get(key) or 0))
    rows = []
    for i in order:
        p = points[i]
        rows.append([Raw("<strong>✓</strong>") if i in on_any else "", p.get("label"),
                     *([None if p.get("size_bytes") is None else Num(h.fmt_bytes(p["size_bytes"]))]
                       if "size_bytes" in axes else []),
                     *([p.get("latency_ms")] if "latency_ms" in axes else []), p.get("kl_mean"),
                     *[(_metric_cell(k, p.get(k)) if _is_number(p.get(k)) else p.get(k)) for k, _ in extra]])
    headers = ["frontier", "label", *(["size"] if "size_bytes" in axes else []),
               *(["latency (ms)"] if "latency_ms" in axes else []), "KL mean", *[lab for _, lab in extra]]
    if any(isinstance(p.get("passed"), bool) for p in points):  # `compress tune`: the gate's verdict per point
        headers.append("gate")
        for row, i in zip(rows, order, strict=True):
            passed = points[i].get("passed")
            row.append(h.verdict(passed) if isinstance(passed, bool) else None)
    s.add(h.table(headers, rows))


def frontier(points: list[dict], key: str) -> list[int]:
    """Indices of the points no other point beats on both `key` and kl_mean (ties kept), by increasing `key`."""
    idx = sorted((i for i, p in enumerate(points) if _is_number(p.get(key))),
                 key=lambda i: (points[i][key], points[i]["kl_mean"]))
    out, best = [], float("inf")
    for i in idx:
        if points[i]["kl_mean"] < best or (out and points[i]["kl_mean"] == best
                                           and points[i][key] == points[out[-1]][key]):
            out.append(i)
            best = min(best, points[i]["kl_mean"])
    return out


def _pareto_figure(plt, points: list[dict], axes: list[str], fronts: dict):
    fig, panels = plt.subplots(1, len(axes), figsize=(8.5 if len(axes) == 1 else 11.0, 4.2), squeeze=False)
    kl = [p["kl_mean"] for p in points]
    positive = [v for v in kl if v > 0]
    spread = bool(positive) and max(positive) / min(positive) > 20
    for ax, key in zip(panels[0], axes, strict=True):
        pts = [(i, p) for i, p in enumerate(points) if _is_number(p.get(key))]
        scale, unit = _x_unit(key, [p[key] for _, p in pts])
        front = fronts[key]
        others = [(p[key] / scale, p["kl_mean"]) for i, p in pts if i not in front]
        if others:
            ax.scatter(*zip(*others, strict=True), s=22, color="#9aa5b1", label="dominated", zorder=2)
        fx = [points[i][key] / scale for i in front]
        fy = [points[i]["kl_mean"] for i in front]
        ax.step(fx, fy, where="post", color="#4c72b0", lw=1.2, zorder=3)
        ax.scatter(fx, fy, s=34, color="#4c72b0", label="Pareto front", zorder=4)
        failed = [(p[key] / scale, p["kl_mean"]) for _, p in pts if p.get("passed") is False]
        if failed:
            ax.scatter(*zip(*failed, strict=True), s=70, marker="x", color="#cf222e", label="failed the gate",
                       zorder=5)
        labelled = front if len(pts) > 12 else [i for i, _ in pts]
        spots: dict[tuple[float, float], list[str]] = {}  # points at the same place share one label
        for i in sorted(labelled, key=lambda i: (points[i][key], points[i]["kl_mean"])):
            spots.setdefault((points[i][key] / scale, points[i]["kl_mean"]), []).append(str(points[i]["label"]))
        for n, (xy, names) in enumerate(spots.items()):  # alternate above / below so neighbours do not collide
            ax.annotate(" / ".join(names), xy, textcoords="offset points", xytext=(5, 5 if n % 2 == 0 else -11),
                        fontsize=7)
        if spread and min(kl) > 0:
            ax.set_yscale("log")
        elif spread:  # a float reference at KL 0: linear near zero, logarithmic above the smallest positive KL
            ax.set_yscale("symlog", linthresh=min(positive))
            ax.set_ylim(bottom=0)
        ax.set_xlabel(unit)
        ax.set_ylabel("KL mean (reference ‖ candidate)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
        ax.set_title(f"{'size' if key == 'size_bytes' else 'latency'} vs KL", fontsize=9, loc="left")
    return fig


def _x_unit(key: str, values: list[float]) -> tuple[float, str]:
    if key == "latency_ms":
        return 1.0, "latency (ms)"
    top = max(values) if values else 0
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if top >= size:
            return size, f"size ({unit})"
    return 1.0, "size (bytes)"


RENDERERS = {"importance": _importance, "quantize": _quantize, "prune": _prune, "eval": _eval,
             "validation": _validation, "gate": _gate, "pareto": _pareto}


# --- plots ---------------------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_fig(s: Section, make, *args, alt: str) -> None:
    """Draw a figure with make(plt, *args) and embed it; a figure that cannot be drawn becomes a note."""
    plt = _pyplot()
    fig = None
    try:
        fig = make(plt, *args)
        if fig.get_layout_engine() is None:
            fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    except Exception as exc:  # a picture must not cost the tables
        s.add(h.para(f"(plot not drawn: {type(exc).__name__}: {exc})", "note"))
        return
    finally:
        if fig is not None:
            plt.close(fig)
    s.add(h.png(buf.getvalue(), alt))
    s.plots += 1


def _plot_file(s: Section, fn, *args, alt: str) -> None:
    """Embed the PNG that fn(*args, path) writes (the existing plot functions of `score` and `prune`)."""
    plt = _pyplot()
    with tempfile.TemporaryDirectory(prefix="compress-report-") as tmp:
        path = Path(tmp) / "plot.png"
        try:
            fn(*args, path)
        except Exception as exc:  # a picture must not cost the tables
            plt.close("all")
            s.add(h.para(f"(plot not drawn: {type(exc).__name__}: {exc})", "note"))
            return
        if not path.is_file():
            return
        data = path.read_bytes()
    s.add(h.png(data, alt))
    s.plots += 1
