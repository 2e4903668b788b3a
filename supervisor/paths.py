"""Path questions several parts ask the same way."""

from __future__ import annotations

import os


def is_within(path: str | os.PathLike[str], folder: str | os.PathLike[str]) -> bool:
    """True when ``path`` is ``folder`` or lies below it (by path, without touching the disk)."""
    p, f = os.path.normpath(str(path)), os.path.normpath(str(folder))
    return p == f or p.startswith(f.rstrip(os.sep) + os.sep)

