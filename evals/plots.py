"""Pictures of reports: per-block importance of every method, and per-sublayer scores where measured."""

from __future__ import annotations

from pathlib import Path

from compress.importance.report import ImportanceReport
from compress.plotting import save_png


def plot_importance(report: ImportanceReport, path: Path) -> None:
    """One panel per method: block scores as bars, attention/FFN sublayer scores as lines (PNG, atomic)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in report.methods if any(v is not None for v in report.block_scores(m))]
    fig, axes = plt.subplots(len(methods), 1, figsize=(max(6.0, 0.3 * report.num_blocks + 2), 2.4 * len(methods)),
                             squeeze=False, sharex=True)
    x = list(range(report.num_blocks))
    for ax, m in zip(axes[:, 0], methods, strict=True):
        ax.bar(x, [v or 0.0 for v in report.block_scores(m)], color="#4c72b0", label="block")
        for name, color in (("attn", "#dd8452"), ("mlp", "#55a868")):
            pts = [(s["block"], s["scores"].get(m)) for s in report.sublayers if s["name"] == name]
            pts = [(b, v) for b, v in pts if v is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", ms=3, lw=1, color=color, label=name)
        ax.set_ylabel(m)
        ax.set_title(f"{m} ({report.direction.get(m, '')})", fontsize=9, loc="left")
        if m == "ablation":
            ax.set_yscale("log")
        ax.legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("block")
    fig.suptitle(f"{report.model}: importance per block ({report.divergence})", fontsize=10)
    save_png(fig, path)


def plot_bits(result: dict, path: Path) -> None:
    """Bits per weight chosen for each unit (bars) beside its measured divergence at each width (lines, log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    units = result["plan"]["meta"].get("units") or {}
    dist = result.get("distortion") or {}
    if not units:
        return
    names = list(units)
    bpw = [_label_bpw(units[n]) for n in names]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(names) + 2), 3.6))
    ax.bar(range(len(names)), bpw, color="#4c72b0", label="chosen bits/weight")
    ax.set_ylabel("bits per weight")
    ax.set_xticks(range(len(names)), [n.replace("block ", "") if n.startswith("block") else "emb" for n in names],
                  fontsize=7)
    ax.set_xlabel("unit (block index, emb = embedding)")
    if dist:
        ax2 = ax.twinx()
        labels = list(next(iter(dist.values())))
        for lab in labels:
            ax2.plot(range(len(names)), [dist[n].get(lab) for n in names], lw=0.8, marker=".", ms=3, label=lab)
        ax2.set_yscale("log")
        ax2.set_ylabel("divergence if only this unit is quantized")
        ax2.legend(fontsize=6, loc="upper right", ncol=2)
    ax.set_title(f"{result['model']}: bits per unit ({result['plan']['meta'].get('allocator', '')})", fontsize=9)
    save_png(fig, path)


def _label_bpw(label: str) -> float:
    """Bits per weight of a spec label such as 'q4g32s' (fp16/fp32 as 16/32), for a wide matrix."""
    from compress.quantize.spec import QuantSpec

    if label.startswith("fp"):
        return float(label[2:])
    import re

    m = re.match(r"q(\d+)g(\d+|ch)([as])(?:-(\w+))?", label)
    bits, group, sym, method = int(m.group(1)), m.group(2), m.group(3) == "s", m.group(4) or "rtn"
    return QuantSpec(bits, 0 if group == "ch" else int(group), sym, method).bits_per_weight(4096 if group == "ch"
                                                                                               else int(group) * 64)
