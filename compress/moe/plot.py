"""Expert-load figures: a layer × expert heatmap of load / mean load, and the co-activation matrix of the worst
layer (how often two experts are chosen for the same token)."""

from __future__ import annotations

from pathlib import Path

from compress.moe.stats import MoeStats


def plot_load(stats: MoeStats, path: Path, title: str = "") -> Path:
    """PNG heatmap: rows = MoE layers, columns = experts, colour = load / mean (1 = balanced; 0 = dead)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    from compress.plotting import save_png

    grid = [[n / (sum(s.load) / s.num_experts) if sum(s.load) else 0.0 for n in s.load] for s in stats.layers]
    n_exp = max(s.num_experts for s in stats.layers)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.35 * n_exp + 2.5), max(2.5, 0.3 * len(grid) + 1.5)))
    top = max(2.0, max(max(r) for r in grid))
    img = ax.imshow(grid, aspect="auto", cmap="RdBu_r", norm=TwoSlopeNorm(vcenter=1.0, vmin=0.0, vmax=top))
    fig.colorbar(img, ax=ax, label="load / mean")
    ax.set_yticks(range(len(grid)), [f"{s.index} ({s.max_over_mean:.2f})" for s in stats.layers], fontsize=7)
    ax.set_xticks(range(n_exp), [str(e) for e in range(n_exp)], fontsize=7)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer (max/mean)")
    ax.set_title(title or f"expert load over {stats.tokens} tokens", fontsize=9, loc="left")
    save_png(fig, Path(path))
    return Path(path)


def plot_coactivation(stats: MoeStats, path: Path, layer: int | None = None) -> Path:
    """PNG of the co-activation matrix of `layer` (default: the worst-balanced layer), as a share of tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from compress.plotting import save_png

    s = stats.worst if layer is None else next(x for x in stats.layers if x.index == layer)
    # the diagonal is the load (already in plot_load) and would swamp the pairs: drawn grey
    share = [[v / max(s.tokens, 1) if i != j else float("nan") for j, v in enumerate(row)]
             for i, row in enumerate(s.coactivation)]
    fig, ax = plt.subplots(figsize=(max(4.5, 0.35 * s.num_experts + 2.5), max(4.0, 0.35 * s.num_experts + 2.0)))
    img = ax.imshow(share, cmap=plt.get_cmap("viridis").with_extremes(bad="#dddddd"), vmin=0.0)
    fig.colorbar(img, ax=ax, label="share of tokens choosing both")
    ticks = range(s.num_experts)
    ax.set_xticks(ticks, [str(e) for e in ticks], fontsize=7)
    ax.set_yticks(ticks, [str(e) for e in ticks], fontsize=7)
    ax.set_xlabel("expert")
    ax.set_title(f"layer {s.index} co-activation\n(max/mean load {s.max_over_mean:.2f})", fontsize=9, loc="left")
    save_png(fig, Path(path))
    return Path(path)
