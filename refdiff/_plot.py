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


MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "<", ">", "h", "p")
LINESTYLES = ("-", "--", "-.", ":")


def styles(n: int) -> list:
    """n distinct (color, marker, linestyle) triples for one figure: 20 colours (tab20, dark and light of 10 hues)
    times 12 markers times 4 line styles, no two lines alike for up to 240 lines."""
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    return [(cmap(k % 20), MARKERS[k % len(MARKERS)], LINESTYLES[(k // 20) % len(LINESTYLES)]) for k in range(n)]


def finish(fig, ax, path, xlabel: str, ylabel: str, title: str, legend_size: int = 8, ncol: int = 1,
           outside: bool = False):
    """Label, grid and legend the axes, write the figure to ``path`` and close it; returns ``path``. ``outside``
    puts the legend to the right of the axes, where many entries do not cover the lines."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    if outside:
        ax.legend(fontsize=legend_size, ncol=ncol, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    else:
        ax.legend(fontsize=legend_size, ncol=ncol)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    pyplot().close(fig)
    return path
