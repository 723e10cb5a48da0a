"""matplotlib (optional, the ``plot`` extra) with the file-only Agg backend, or None when it is not installed."""

from __future__ import annotations


def pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt
