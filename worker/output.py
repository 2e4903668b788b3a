"""Atomic file writes.

A transcript is written next to its target under a hidden temporary name, synced, then renamed over
the target, so a reader (or a supervisor that kills the worker mid-write) only ever sees the old
file or the complete new one, never a truncated mix. The directory is synced after the rename so
the new name survives a power cut. A writer killed between the two leaves its temporary file
behind; the next run removes it (``remove_stale_temps``, called by intake for each output folder).
"""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path

__all__ = ["OutputError", "atomic_write_bytes", "atomic_write_text", "remove_stale_temps"]

_MAX_NAME_TRIES = 100


class OutputError(OSError):
    """The target cannot be written (a full disk, a read-only folder, no permission): one line that
    names the target, not the temporary file, so a run says which output failed and why."""

    def __init__(self, target: Path, exc: OSError) -> None:
        super().__init__(exc.errno, f"{target}: cannot write output: {exc.strerror or exc}")
        self.target = target

    def __str__(self) -> str:
        return str(self.strerror)


def _temp_name(name: str, pid: int) -> str:
    return f".{name}.{pid}.{os.urandom(4).hex()}.tmp"


_TEMP_RE = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{8}\.tmp$")  # what _temp_name makes


def pid_exists(pid: int) -> bool:
    """Whether a process of this pid exists (signal 0), another user's included."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def remove_stale_temps(folder: Path, before: float) -> list[Path]:
    """Remove the temporary files a writer killed mid-write (SIGKILL, a power cut) left in
    ``folder``: ours by name, older than ``before`` (epoch seconds; a run's start) and of a process
    that is gone. A live writer's file (here, or one made after ``before`` by a writer elsewhere on
    a shared filesystem) is never touched. Returns what was removed."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP_RE.match(entry.name)
        if m is None:
            continue
        try:
            if entry.stat(follow_symlinks=False).st_mtime >= before or pid_exists(int(m.group(1))):
                continue
            os.unlink(entry.path)
        except OSError:
            continue
        removed.append(Path(entry.path))
    return removed


def _open_temp(folder: Path, name: str) -> tuple[int, Path]:
    """Create a fresh temp file beside the target; O_EXCL so two writers never share one."""
    pid = os.getpid()
    for _ in range(_MAX_NAME_TRIES):
        tmp = folder / _temp_name(name, pid)
        try:
            # 0o666 lets the process umask decide a new file's mode, as a plain open() would.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        except FileExistsError:
            continue
        return fd, tmp
    raise FileExistsError(errno.EEXIST, "could not find a free temporary name", str(folder / name))


def _fsync_dir(folder: Path) -> None:
    """Sync a directory so a rename inside it is durable; skipped where directories cannot be opened."""
    try:
        dfd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError as exc:
        # Some file systems (and Windows) refuse fsync on a directory; the rename already happened.
        if exc.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP, errno.EACCES):
            raise
    finally:
        os.close(dfd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, mode: int | None = None) -> None:
    """Replace ``path`` with ``data`` atomically.

    Parent folders are created. An existing target keeps its permission bits (an in-place run must
    not turn a group-readable transcript private) unless ``mode`` says otherwise. A symlinked target
    is followed so the link stays a link. On any error the temporary file is removed and the target
    is left as it was.
    """
    target = Path(path)
    if target.is_symlink():
        target = target.resolve()
    folder = target.parent
    folder.mkdir(parents=True, exist_ok=True)
    if mode is None:
        try:
            mode = stat.S_IMODE(os.stat(target).st_mode)
        except FileNotFoundError:
            mode = None

    fd, tmp = _open_temp(folder, target.name)
    try:
        try:
            if mode is not None:
                os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(folder)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    """Encode ``text`` and write it atomically; newline characters are written exactly as given.
    A write that fails raises ``OutputError`` naming ``path``."""
    try:
        atomic_write_bytes(path, text.encode(encoding))
    except OSError as exc:
        raise OutputError(Path(path), exc) from exc
