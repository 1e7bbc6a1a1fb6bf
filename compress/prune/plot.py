"""Which units pruning removed: a type × depth grid (FinerCut's figure), numbered in removal order, and the
calibration divergence after each step."""

from __future__ import annotations

from pathlib import Path


def plot_removed(result: dict, path: Path) -> None:
    """Grid of rows (block, or attn / mlp) × block index, removed cells coloured and numbered by step (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from compress.plotting import save_png

    if result["mode"] == "width":
        _plot_width(result, path, plt)
        return
    if result["mode"] == "sparsity":
        _plot_sparsity(result, path, plt)
        return
    n = result["num_blocks"]
    rows = ["block"] if result["mode"] == "blocks" else result["sublayer_names"]
    order = result["selection"]["removed"]
    grid = [[0] * n for _ in rows]
    for step, unit in enumerate(order, 1):
        block, _, name = unit.partition(".")
        grid[rows.index(name or "block")][int(block)] = step
    divergence = [d for d in result["selection"]["divergence"] if d is not None]
    panels = 2 if len(divergence) > 1 else 1
    fig, axes = plt.subplots(panels, 1, figsize=(max(6.0, 0.3 * n + 2), 1.2 + 0.5 * len(rows) + 2.2 * (panels - 1)),
                             squeeze=False, gridspec_kw={"height_ratios": [len(rows) + 1] + [4] * (panels - 1)})
    ax = axes[0, 0]
    cmap = plt.get_cmap("viridis_r").with_extremes(under="#eeeeee")
    ax.imshow([[v if v else 0.5 for v in r] for r in grid], aspect="auto", cmap=cmap, vmin=1,
              vmax=max(len(order), 1))
    for y, r in enumerate(grid):
        for x, v in enumerate(r):
            if v:
                ax.text(x, y, str(v), ha="center", va="center", fontsize=6, color="black" if v < len(order) * 0.6
                        else "white")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xticks(range(n), [str(i) for i in range(n)], fontsize=7)
    ax.set_xlabel("block (depth)")
    ax.set_title(f"{Path(str(result['model'])).name}: {result['method']} removed {len(order)} of {result['of']} "
                 f"{result['mode']} (number = removal step)", fontsize=9, loc="left")
    if panels == 2:
        ax2 = axes[1, 0]
        ax2.plot(range(1, len(divergence) + 1), divergence, marker="o", ms=3)
        ax2.set_yscale("log")
        ax2.xaxis.get_major_locator().set_params(integer=True)
        ax2.set_xlabel("removal step")
        ax2.set_ylabel(f"calibration {result.get('divergence', 'kl')}")
    save_png(fig, path)


def _plot_width(result: dict, path: Path, plt) -> None:
    """Bars per block: the share of attention (KV groups) and FFN channels removed."""
    from compress.plotting import save_png

    rows = result["removed"]
    x = [d["block"] for d in rows]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * len(x) + 2), 3.2))
    ax.bar([i - 0.2 for i in x], [d["attention_ratio"] for d in rows], width=0.4, label="attention (KV groups)")
    ax.bar([i + 0.2 for i in x], [d["ffn_ratio"] for d in rows], width=0.4, label="FFN channels")
    ax.set_xticks(x, [str(i) for i in x], fontsize=7)
    ax.set_xlabel("block (depth)")
    ax.set_ylabel("share removed")
    ax.legend(fontsize=7)
    ax.set_title(f"{Path(str(result['model'])).name}: width {result['requested']} ({result['method']}), params "
                 f"{result['params_after']:,} of {result['params_before']:,}", fontsize=9, loc="left")
    save_png(fig, path)


def _plot_sparsity(result: dict, path: Path, plt) -> None:
    """Bars per block: the share of the block Linears' weights that are zero."""
    from compress.plotting import save_png

    rows = result["removed"]
    x = [d["block"] for d in rows]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * len(x) + 2), 3.2))
    ax.bar(x, [d["sparsity"] for d in rows], width=0.7)
    ax.set_xticks(x, [str(i) for i in x], fontsize=7)
    ax.set_xlabel("block (depth)")
    ax.set_ylabel("share of weights zero")
    sp = result["sparsity"]
    ax.set_title(f"{Path(str(result['model'])).name}: sparsity {result['requested']} {sp['pattern']} "
                 f"({result['method']}), {sp['sparsity']:.1%} overall", fontsize=9, loc="left")
    save_png(fig, path)
