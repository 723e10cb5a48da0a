"""tqdm progress bars (optional, the ``plot`` extra): None when tqdm is absent or the bar is switched off.
``enabled``: True / False forces it; None shows it on a terminal only (DESIGN.md §7)."""

from __future__ import annotations


def progress_bar(total: int, desc: str, enabled: bool | None = None):
    if enabled is False:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, disable=None if enabled is None else not enabled)
