"""Run processes inside a real memory-limited cgroup.

Tests and benchmarks use this to check behaviour under a hard limit the kernel enforces (OOM kills
included) without needing a machine that small; users can use it to confine a whole pool. The
cgroup is created under the caller's own memory cgroup when that is writable (so any limit above
still applies), else under the hierarchy root. Both cgroup v1 and v2 are handled.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from supervisor.sampler import CgroupView, cgroup_oom_kills, memory_cgroup

_PROCS = "cgroup.procs"


def _write(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _v2_memory_delegated(directory: Path) -> bool:
    """Whether children of ``directory`` get the memory controller, enabling it if we may.

    Enabling fails (EBUSY) on a non-root v2 cgroup that holds processes itself, which is why the
    hierarchy root is the fallback parent.
    """
    control = directory / "cgroup.subtree_control"
    try:
        if "memory" in control.read_text().split():
            return True
        _write(control, "+memory")
    except OSError:
        return False
    return True


def _writable(directory: Path) -> bool:
    return os.access(directory, os.W_OK) and os.access(directory / _PROCS, os.W_OK)


def _default_parent() -> tuple[Path, int]:
    view: CgroupView | None = memory_cgroup()
    if view is None:
        raise OSError(errno.ENOENT, "no memory cgroup hierarchy is mounted (v1 memory controller or v2)")
    candidates = [view.path] if view.path == view.mount else [view.path, view.mount]
    for directory in candidates:
        if not _writable(directory):
            continue
        if view.version == 2 and not _v2_memory_delegated(directory):
            continue
        return directory, view.version
    raise PermissionError(
        errno.EACCES,
        f"no writable memory cgroup: neither {view.path} nor {view.mount} accepts new cgroups (needs root)",
    )


def _version_of(directory: Path) -> int:
    if (directory / "memory.limit_in_bytes").exists():
        return 1
    if (directory / "cgroup.controllers").exists():
        if not _v2_memory_delegated(directory):
            raise OSError(errno.EINVAL, f"{directory}: the memory controller is not enabled for its children")
        return 2
    raise OSError(errno.ENOENT, f"{directory} is not a memory cgroup directory")


class MemoryCgroup:
    """A memory cgroup with a hard limit that swap cannot dodge; removed (tasks killed) on exit."""

    def __init__(self, name: str, limit_bytes: int, root: str | Path | None = None) -> None:
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"invalid cgroup name {name!r}: one path component expected")
        if limit_bytes <= 0:
            raise ValueError(f"invalid cgroup limit {limit_bytes}: must be positive")
        if root is None:
            parent, version = _default_parent()
        else:
            parent = Path(root)
            version = _version_of(parent)
        self.name = name
        self.limit = int(limit_bytes)
        self.version = version
        self.parent = parent
        self.path = parent / name
        self._created = False

    # lifecycle -----------------------------------------------------------------------------------

    def create(self) -> MemoryCgroup:
        """Make the directory and set the limit (FileExistsError if the name is taken)."""
        os.mkdir(self.path)
        self._created = True
        try:
            if self.version == 1:
                # memsw (memory + swap) may never be below the memory limit, so that goes first.
                _write(self.path / "memory.limit_in_bytes", str(self.limit))
                memsw = self.path / "memory.memsw.limit_in_bytes"
                if memsw.exists():
                    _write(memsw, str(self.limit))
            else:
                _write(self.path / "memory.max", str(self.limit))
                swap = self.path / "memory.swap.max"
                if swap.exists():
                    _write(swap, "0")
        except BaseException:
            self.close()
            raise
        return self

    def close(self, timeout: float = 5.0) -> bool:
        """Kill what is left inside and remove the directory; False if it is still busy."""
        if not self._created:
            return True
        deadline = time.monotonic() + timeout
        me = os.getpid()
        while True:
            pids = self.pids()
            if me in pids:  # never kill the caller: hand it back to the parent cgroup
                try:
                    _write(self.parent / _PROCS, str(me))
                except OSError:
                    pass
            others = [p for p in pids if p != me]
            if not others and me not in pids:
                break
            kill_file = self.path / "cgroup.kill"
            if others and kill_file.exists() and me not in pids:
                try:
                    _write(kill_file, "1")
                except OSError:
                    pass
            for pid in others:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        while True:
            try:
                os.rmdir(self.path)
            except FileNotFoundError:
                break
            except OSError as exc:
                # EBUSY while exiting tasks release their charge.
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    return False
                time.sleep(0.02)
            else:
                break
        self._created = False
        return True

    def __enter__(self) -> MemoryCgroup:
        return self.create()

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if not self.close() and exc_type is None:
            raise OSError(errno.EBUSY, f"cgroup {self.path} is still busy after killing its tasks")

    # membership ----------------------------------------------------------------------------------

    def add(self, pid: int) -> None:
        """Move a running process in; memory it already has stays charged where it was."""
        _write(self.path / _PROCS, str(pid))

    def preexec(self) -> Callable[[], None]:
        """A ``preexec_fn`` that moves the forked child in before it execs, so all of it is charged."""
        procs = os.fsencode(self.path / _PROCS)

        def enter() -> None:
            fd = os.open(procs, os.O_WRONLY)
            try:
                os.write(fd, str(os.getpid()).encode())
            finally:
                os.close(fd)

        return enter

    def pids(self) -> list[int]:
        try:
            return [int(x) for x in (self.path / _PROCS).read_text().split()]
        except (OSError, ValueError):
            return []

    # readings -------------------------------------------------------------------------------------

    def usage(self) -> int:
        name = "memory.usage_in_bytes" if self.version == 1 else "memory.current"
        return _read_int(self.path / name) or 0

    def max_usage(self) -> int | None:
        """Peak usage since creation (v2 ``memory.peak`` needs Linux 5.19)."""
        name = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        return _read_int(self.path / name)

    def oom_kills(self) -> int:
        return cgroup_oom_kills(self.path)


def cgroups_available() -> bool:
    """True when a memory cgroup can actually be created and removed here (root, writable mount)."""
    try:
        probe = MemoryCgroup(f"bas-probe-{os.getpid()}-{time.monotonic_ns()}", 64 << 20)
        probe.create()
    except (OSError, ValueError):
        return False
    return probe.close()
