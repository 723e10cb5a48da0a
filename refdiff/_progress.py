"""tqdm progress bars (optional, the ``plot`` extra): None when tqdm is absent or the bar is switched off.
``enabled``: True / False forces it; None shows it on a terminal only (README, "The command line")."""

from __future__ import annotations


def progress_bar(total: int, desc: str, enabled: bool | None = None, leave: bool = True):
    """A tqdm bar, or None. Callers test ``bar is not None``: a tqdm of total 0 is falsy (it has a length)."""
    if enabled is False:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, disable=None if enabled is None else not enabled, leave=leave)


def ticker(bar):
    """A callback advancing ``bar`` by one (whatever it is called with), or None without a bar."""
    return None if bar is None else (lambda *args: bar.update(1))
