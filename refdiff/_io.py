"""Output files of the CLI: paths checked before any compute, files replaced atomically.

A report is written to a temporary file in its own folder and renamed over the target (``os.replace`` is atomic on
POSIX and Windows), so an interrupted run (SIGINT, a crash) leaves either the previous file or the new one, never a
half-written one; the temporaries of an interrupted write are removed.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["OutputError", "check_output_dir", "check_output_file", "write_text", "save_figure"]


class OutputError(ValueError):
    """An output path that cannot be written (a usage error: the CLI exits 2 before computing anything)."""


def check_output_dir(path) -> Path:
    """The folder exists or can be created, is a folder, and is writable. Creates it."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise OutputError(f"output folder {str(out)!r} is a file")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create output folder {str(out)!r}: {exc.strerror or exc}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise OutputError(f"output folder {str(out)!r} is not writable")
    return out


def check_output_file(path) -> Path:
    """The file's folder exists and is writable, and the path is not a folder."""
    p = Path(path)
    if p.is_dir():
        raise OutputError(f"output file {str(p)!r} is a folder")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"the folder of output file {str(p)!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise OutputError(f"output file {str(p)!r} is not writable")
    return p


def _replace_atomically(path: Path, write) -> Path:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:                   # KeyboardInterrupt included: leave no temporary behind
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def write_text(path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (temporary file in the same folder, then rename)."""
    return _replace_atomically(path, lambda tmp: Path(tmp).write_text(text))


def save_figure(fig, path, **kwargs) -> Path:
    """Save a matplotlib figure atomically (the format from ``path``'s suffix)."""
    fmt = Path(path).suffix.lstrip(".") or None
    return _replace_atomically(path, lambda tmp: fig.savefig(tmp, format=fmt, **kwargs))
