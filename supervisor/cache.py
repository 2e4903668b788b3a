"""The on-disk caches under ``<state_dir>/cache``: what they hold, a size bound, and clearing them.

``results/`` holds word times of aligned utterances (keyed by audio, words, engine, model, dtype,
language and the aligner's version); ``audio/`` holds recordings ffmpeg decoded once. Both are safe
to delete at any time. The supervisor prunes them to ``run.cache_max`` (oldest first) when a run
starts and finishes, and every few minutes in a long-running service, from a thread so the loop
never waits on a directory walk.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CacheStats", "Pruner", "clear", "prune", "stats", "PARTS"]

PARTS = ("results", "audio")


@dataclass
class CacheStats:
    part: str
    path: str
    entries: int
    bytes: int
    oldest: float | None  # mtime, seconds since the epoch
    newest: float | None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _files(root: Path) -> list[tuple[float, int, Path]]:
    out = []
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            if name.startswith(".") and name.endswith(".tmp"):
                continue  # a writer's temporary file, renamed into place in a moment
            p = Path(dirpath) / name
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            out.append((st.st_mtime, st.st_size, p))
    return out


def stats(cache_dir: Path) -> list[CacheStats]:
    rows = []
    for part in PARTS:
        files = _files(Path(cache_dir) / part)
        times = [f[0] for f in files]
        rows.append(CacheStats(part, str(Path(cache_dir) / part), len(files), sum(f[1] for f in files),
                               min(times) if times else None, max(times) if times else None))
    return rows


def clear(cache_dir: Path, parts: tuple[str, ...] = PARTS) -> int:
    """Delete the cached entries of ``parts``; returns the bytes freed."""
    freed = 0
    for part in parts:
        root = Path(cache_dir) / part
        freed += sum(f[1] for f in _files(root))
        shutil.rmtree(root, ignore_errors=True)
    return freed


def prune(cache_dir: Path, max_bytes: int | None) -> tuple[int, int]:
    """Remove the oldest entries (both parts together) until at most ``max_bytes`` remain.
    Returns (files removed, bytes freed); ``max_bytes`` None means unbounded."""
    if max_bytes is None:
        return 0, 0
    files = sorted(f for part in PARTS for f in _files(Path(cache_dir) / part))
    total = sum(f[1] for f in files)
    removed = freed = 0
    for _mtime, size, path in files:
        if total - freed <= max_bytes:
            break
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        removed += 1
        freed += size
    return removed, freed


class Pruner:
    """Prunes in a background thread, at most once per ``interval_s``; ``maybe()`` never blocks."""

    def __init__(self, cache_dir: Path, max_bytes: int | None, interval_s: float = 300.0,
                 on_pruned=None) -> None:
        self.cache_dir, self.max_bytes, self.interval_s = Path(cache_dir), max_bytes, interval_s
        self._last = -1e18
        self._thread: threading.Thread | None = None
        self._on_pruned = on_pruned

    def _run(self) -> None:
        removed, freed = prune(self.cache_dir, self.max_bytes)
        if removed and self._on_pruned is not None:
            self._on_pruned(removed, freed)

    def maybe(self, _status: object = None, force: bool = False) -> None:
        now = time.monotonic()
        if self.max_bytes is None or (self._thread is not None and self._thread.is_alive()):
            return
        if not force and now - self._last < self.interval_s:
            return
        self._last = now
        self._thread = threading.Thread(target=self._run, name="cache-prune", daemon=True)
        self._thread.start()

    def join(self, timeout: float = 30.0) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
