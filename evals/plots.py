"""Pictures of reports: per-block importance of every method, and per-sublayer scores where measured."""

from __future__ import annotations

import tempfile
from pathlib import Path

from compress.importance.report import ImportanceReport


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
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".png", delete=False) as tmp:
        fig.savefig(tmp.name, dpi=110)
    plt.close(fig)
    Path(tmp.name).replace(path)
