"""matplotlib (optional, the ``plot`` extra) with the file-only Agg backend, or None when it is not installed."""

from __future__ import annotations

from ._io import save_figure


def pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def finish(fig, ax, path, xlabel: str, ylabel: str, title: str, legend_size: int = 7, ncol: int = 1):
    """Label, grid and legend the axes, write the figure to ``path`` and close it; returns ``path``."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=legend_size, ncol=ncol)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    pyplot().close(fig)
    return path
