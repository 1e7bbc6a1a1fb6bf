"""Figures written like every other output: atomically, marked as this tool's (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path


def save_png(fig, path: Path) -> None:
    """Write the figure atomically as PNG (marked as this tool's in its Software field); close it."""
    import matplotlib.pyplot as plt

    from compress.atomic import atomic_file
    from compress.outputs import signature

    fig.tight_layout()
    try:
        with atomic_file(Path(path)) as tmp:
            fig.savefig(tmp, dpi=110, format="png", metadata={"Software": signature()})
    finally:
        plt.close(fig)
