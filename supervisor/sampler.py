"""Memory readings: the only code that reads /proc, cgroups (v1 and v2) and PSI.

Everything here returns plain readings; deciding what to do about them is ``policy.py``'s job. All
paths are injectable so tests can build fake /proc and cgroup trees.

Cost matters because the supervisor polls every worker four times a second and must stay under 2%
of one core. Two readings are expensive and are therefore rationed:

* USS/PSS need ``/proc/PID/smaps_rollup``, which walks the page tables: about 12 ms of CPU per
  GiB resident on a virtualised host, so 8 workers of 4 GiB polled 4 times a second would need
  more than a whole core, against about 20 us for ``/proc/PID/status``. ``ProcSampler`` reads smaps_rollup for a process when it first sees it and
  then on a schedule that keeps those reads under ``exact_share`` of one core. In between, USS and
  PSS are the last exact values plus the change in anonymous RSS (private), and PSS also takes the
  change in file/shmem RSS in full (it may be shared: counting it whole errs on the safe side). A
  change of ``shared_drift`` in file/shmem RSS (a model being mapped) brings the next walk forward.
  ``tree(pid, exact=True)`` forces a walk, e.g. for a baseline at READY; it and a polled root
  disappearing also schedule early walks of the other roots, staggered one per poll, because the
  shared pages are now split differently among them.
* Descendants are found through ``/proc/PID/task/*/children`` (or, on kernels without it, one scan
  of every ``/proc/*/stat``) at most once per ``children_interval``; members that vanish in between
  are skipped.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from supervisor.units import format_size

GiB = 1 << 30
UNLIMITED = 1 << 62  # cgroup v1 reports "no limit" as a huge page-rounded number near 2^63
_READ_CHUNK = 65536


@dataclass(frozen=True)
class ProcMem:
    """Memory of a process tree (root + all descendants), in bytes.

    ``hwm`` is the root's VmHWM (peak RSS since start or since ``clear_hwm``). ``exact`` is False
    when USS/PSS of some member were extrapolated from its RSS counters rather than read from
    smaps_rollup in this call.
    """

    pid: int
    rss: int
    uss: int
    pss: int
    swap: int
    hwm: int | None
    exact: bool = True


@dataclass(frozen=True)
class HostMem:
    """Host memory in bytes. ``available`` is already capped by the cgroup headroom, if any;
    ``mem_available`` is the host's own MemAvailable and ``cgroup_headroom`` the smallest headroom
    along this process's cgroup path (None outside a limited cgroup), so that other supervisors'
    promises can be charged to the memory they would come from."""

    total: int
    available: int
    psi_some_avg10: float | None
    psi_full_avg10: float | None
    swap_free: int
    mem_available: int | None = None
    cgroup_headroom: int | None = None
    cgroup_path: str | None = None


@dataclass(frozen=True)
class Limits:
    """The memory the pool may use.

    ``limit``: what the pool must never exceed (machine limit, or an explicit budget below it).
    ``budget``: what the policy plans with. ``reserve``: memory to keep available on the host for
    everything else; without an explicit budget, ``budget + reserve == limit``.
    """

    limit: int
    budget: int
    reserve: int
    source: str
    host_total: int
    cgroup_limit: int | None
    cgroup_path: str | None


class Sampler(Protocol):
    """What the supervisor reads memory through; tests pass fakes."""

    def host(self) -> HostMem: ...

    def tree(self, pid: int, *, exact: bool = False) -> ProcMem | None: ...


@dataclass(frozen=True)
class CgroupView:
    """Where a process's memory cgroup lives on this machine.

    ``path`` is the process's own memory cgroup directory, or ``mount`` when that path is not
    visible (containers that mount only their own subtree).
    """

    version: int
    mount: Path
    path: Path

    def lineage(self) -> list[Path]:
        """``path`` and its ancestors up to and including ``mount``: every level whose limit applies."""
        dirs = [self.path]
        p = self.path
        while p != self.mount and self.mount in p.parents:
            p = p.parent
            dirs.append(p)
        return dirs

    def level_limit(self, directory: Path) -> tuple[int, str] | None:
        """The tightest limit set on one level and the file it came from, or None if unlimited."""
        best: tuple[int, str] | None = None
        names = ("memory.limit_in_bytes",) if self.version == 1 else ("memory.max", "memory.high")
        for name in names:
            value = _read_limit(directory / name)
            if value is not None and (best is None or value < best[0]):
                best = (value, name)
        return best

    def smallest_limit(self) -> tuple[int, Path, str] | None:
        """The smallest limit along the lineage: (bytes, directory, file)."""
        best: tuple[int, Path, str] | None = None
        for directory in self.lineage():
            found = self.level_limit(directory)
            if found is not None and (best is None or found[0] < best[0]):
                best = (found[0], directory, found[1])
        return best

    def headroom(self, directory: Path, limit: int) -> int | None:
        """limit - usage + inactive file cache (reclaimable before the limit bites) for one level."""
        usage_name = "memory.usage_in_bytes" if self.version == 1 else "memory.current"
        inactive_key = b"total_inactive_file" if self.version == 1 else b"inactive_file"
        try:
            usage = int(_read(str(directory / usage_name)))
        except (OSError, ValueError):
            return None
        inactive = 0
        try:
            stat = _read(str(directory / "memory.stat"))
        except OSError:
            stat = b""
        value = _find_int(stat, inactive_key, sep=b" ")
        if value is not None:
            inactive = value
        return max(0, limit - usage + inactive)


def cgroup_headroom(view: CgroupView) -> int | None:
    """The smallest headroom over the limited levels of a cgroup's lineage; None when unlimited."""
    best: int | None = None
    for directory in view.lineage():
        found = view.level_limit(directory)
        if found is None:
            continue
        room = view.headroom(directory, found[0])
        if room is not None and (best is None or room < best):
            best = room
    return best


@dataclass(frozen=True)
class ProcStat:
    """The fields of ``/proc/PID/stat`` this project needs."""

    state: str
    ppid: int
    start_time: int | None  # clock ticks since boot (field 22): tells a reused pid apart


@dataclass(frozen=True)
class ProcScope:
    pid: int
    uid: int
    start_time: int | None
    cgroup: str | None
    headroom: int | None  # bytes its memory cgroup can still take; None when unlimited


def parse_stat(data: bytes) -> ProcStat | None:
    """Parse ``/proc/PID/stat``; the command name (field 2) may hold spaces and parentheses."""
    try:
        fields = data.rsplit(b")", 1)[1].split()
        start = int(fields[19]) if len(fields) > 19 else None
        return ProcStat(state=fields[0].decode(), ppid=int(fields[1]), start_time=start)
    except (IndexError, ValueError, UnicodeDecodeError):
        return None


def proc_stat(pid: int, proc: str | Path = "/proc") -> ProcStat | None:
    """State, parent and start time of ``pid``; None when it is gone."""
    try:
        return parse_stat(_read(f"{proc}/{int(pid)}/stat"))
    except OSError:
        return None


def proc_uid(pid: int, proc: str | Path = "/proc") -> int | None:
    """The real uid of ``pid`` (``Uid:`` in /proc/PID/status); None when it is gone."""
    try:
        return _find_int(_read(f"{proc}/{int(pid)}/status"), b"Uid", sep=b":\t")
    except OSError:
        return None


def process_scope(pid: int, proc: Path = Path("/proc"),
                  cgroup_root: Path = Path("/sys/fs/cgroup")) -> ProcScope | None:
    """Who ``pid`` is and what it could still take: its uid, start time, memory cgroup and that
    cgroup's headroom, read from /proc and the cgroup files (never from what it claims)."""
    stat = proc_stat(pid, proc)
    uid = proc_uid(pid, proc)
    if stat is None or uid is None or stat.state in "ZX":
        return None
    view = memory_cgroup(Path(proc), Path(cgroup_root), pid)
    return ProcScope(pid=pid, uid=uid, start_time=stat.start_time,
                     cgroup=str(view.path) if view is not None else None,
                     headroom=cgroup_headroom(view) if view is not None else None)


def pid_alive(pid: int, proc: str | Path = "/proc") -> bool:
    """True while ``pid`` exists and is not a zombie."""
    st = proc_stat(pid, proc)
    return st is not None and st.state not in "ZX"


# -- small readers -----------------------------------------------------------------------------


def _read(path: str) -> bytes:
    """Whole file with as few syscalls as possible (proc and cgroup files answer in one read)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.read(fd, _READ_CHUNK)
        if len(data) < _READ_CHUNK:
            return data
        chunks = [data]
        while True:
            data = os.read(fd, _READ_CHUNK)
            if not data:
                return b"".join(chunks)
            chunks.append(data)
    finally:
        os.close(fd)


def _find_int(data: bytes, key: bytes, sep: bytes = b":") -> int | None:
    """First number after ``key`` + ``sep`` at the start of a line, or None."""
    needle = key + sep
    if data.startswith(needle):
        start = len(needle)
    else:
        i = data.find(b"\n" + needle)
        if i < 0:
            return None
        start = i + 1 + len(needle)
    end = data.find(b"\n", start)
    if end < 0:
        end = len(data)
    parts = data[start:end].split()
    try:
        return int(parts[0])
    except (IndexError, ValueError):
        return None


def _kb(data: bytes, key: bytes) -> int | None:
    value = _find_int(data, key)
    return None if value is None else value * 1024


def _read_limit(path: Path) -> int | None:
    """A limit file's value in bytes; None for "max", missing files and v1's near-2^63 "unlimited"."""
    try:
        raw = _read(str(path)).strip()
    except OSError:
        return None
    if not raw or raw == b"max":
        return None
    try:
        value = int(raw)
    except ValueError:
        return None
    if value >= UNLIMITED:
        return None
    return value


@dataclass(frozen=True)
class _Status:
    state: str
    rss: int
    anon: int
    file: int
    swap: int
    hwm: int | None


def _read_status(proc: str, pid: int) -> _Status | None:
    """Cheap per-process counters; None when the process is gone or has no memory (kernel thread)."""
    try:
        data = _read(f"{proc}/{pid}/status")
    except OSError:
        return None
    i = data.find(b"\nState:")
    state = chr(data[i + 8]) if 0 <= i and i + 8 < len(data) else "?"
    anon = _kb(data, b"RssAnon")
    if anon is None:
        return _Status(state, 0, 0, 0, 0, None) if state in "ZX" else None
    file = (_kb(data, b"RssFile") or 0) + (_kb(data, b"RssShmem") or 0)
    return _Status(state, anon + file, anon, file, _kb(data, b"VmSwap") or 0, _kb(data, b"VmHWM"))


def _read_meminfo(proc: str) -> dict[bytes, int]:
    data = _read(f"{proc}/meminfo")
    out: dict[bytes, int] = {}
    for key in (b"MemTotal", b"MemAvailable", b"MemFree", b"Buffers", b"Cached", b"SwapFree"):
        value = _kb(data, key)
        if value is not None:
            out[key] = value
    if b"MemAvailable" not in out:  # kernels before 3.14
        out[b"MemAvailable"] = out.get(b"MemFree", 0) + out.get(b"Buffers", 0) + out.get(b"Cached", 0)
    return out


def _read_psi(proc: str) -> tuple[float | None, float | None]:
    try:
        data = _read(f"{proc}/pressure/memory")
    except OSError:  # absent, or PSI compiled in but disabled at boot (EOPNOTSUPP)
        return None, None
    some = full = None
    for line in data.split(b"\n"):
        kind, _, rest = line.partition(b" ")
        for item in rest.split():
            if item.startswith(b"avg10="):
                try:
                    value = float(item[6:])
                except ValueError:
                    value = None
                if kind == b"some":
                    some = value
                elif kind == b"full":
                    full = value
    return some, full


# -- cgroup discovery ----------------------------------------------------------------------------


def _unescape_mount(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (\\040 ...)."""
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _under(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


_Mounts = list[tuple[Path, str]]


def _cgroup_mounts(proc: Path, pid: int | str, cgroup_root: Path) -> tuple[_Mounts, _Mounts]:
    """(v1 memory mounts, v2 mounts) under ``cgroup_root`` from mountinfo, as (mountpoint, root)."""
    v1: _Mounts = []
    v2: _Mounts = []
    try:
        text = (proc / str(pid) / "mountinfo").read_text(errors="replace")
    except OSError:
        return v1, v2
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        lf, rf = left.split(), right.split()
        if len(lf) < 5 or not rf:
            continue
        mountpoint = Path(_unescape_mount(lf[4]))
        if not _under(mountpoint, cgroup_root):
            continue
        root = _unescape_mount(lf[3])
        if rf[0] == "cgroup" and len(rf) > 2 and "memory" in rf[2].split(","):
            v1.append((mountpoint, root))
        elif rf[0] == "cgroup2":
            v2.append((mountpoint, root))
    return v1, v2


def _place(mount: Path, mount_root: str, cgroup_path: str) -> Path:
    """The directory for ``cgroup_path`` under ``mount``, or ``mount`` itself when not visible."""
    rel = cgroup_path
    if mount_root not in ("", "/") and (rel == mount_root or rel.startswith(mount_root.rstrip("/") + "/")):
        rel = rel[len(mount_root.rstrip("/")) :]
    parts = [p for p in rel.split("/") if p]
    if not parts or ".." in parts:
        return mount
    candidate = mount.joinpath(*parts)
    return candidate if candidate.is_dir() else mount


def memory_cgroup(
    proc: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup"), pid: int | str = "self"
) -> CgroupView | None:
    """The memory cgroup of ``pid`` (v1 preferred on hybrid hosts, where it holds the controller)."""
    try:
        lines = (proc / str(pid) / "cgroup").read_text().splitlines()
    except OSError:
        return None
    v1_path = v2_path = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            v2_path = path
        elif "memory" in controllers.split(","):
            v1_path = path
    v1_mounts, v2_mounts = _cgroup_mounts(proc, pid, cgroup_root)

    if v1_path is not None:
        if not v1_mounts:
            for candidate in (cgroup_root / "memory", cgroup_root):
                if (candidate / "memory.limit_in_bytes").exists():
                    v1_mounts = [(candidate, "/")]
                    break
        if v1_mounts:
            mount, root = v1_mounts[0]
            return CgroupView(1, mount, _place(mount, root, v1_path))

    if v2_path is not None:
        if not v2_mounts:
            candidates = (cgroup_root, cgroup_root / "unified")
            v2_mounts = [(c, "/") for c in candidates if (c / "cgroup.controllers").exists()]
        for mount, root in v2_mounts:
            try:
                controllers = (mount / "cgroup.controllers").read_text().split()
            except OSError:
                continue
            if "memory" in controllers:
                return CgroupView(2, mount, _place(mount, root, v2_path))
    return None


# -- limits ----------------------------------------------------------------------------------------


def default_reserve(limit: int) -> int:
    """max(10% of limit, 2 GiB), but never more than half the limit (small test cgroups)."""
    return min(max(limit // 10, 2 * GiB), limit // 2)


def detect_limits(
    *,
    budget: int | None = None,
    reserve: int | None = None,
    proc: Path = Path("/proc"),
    cgroup_root: Path = Path("/sys/fs/cgroup"),
    pid: int | str = "self",
) -> Limits:
    """How much memory the pool may use.

    The machine limit is min(host MemTotal, the smallest cgroup limit on the process's cgroup
    path). Without ``budget``: limit = machine limit, budget = limit - reserve. An explicit
    ``budget`` is the user's share of the machine and is used as both limit and budget as long as
    it leaves the machine its reserve; a larger one is clamped to machine limit - reserve and
    ``source`` says so. The reserve is the machine's either way: it is what the policy keeps
    available on the host for everyone else.
    """
    proc, cgroup_root = Path(proc), Path(cgroup_root)
    host_total = _read_meminfo(str(proc))[b"MemTotal"]
    hard, source = host_total, "host MemTotal"
    cgroup_limit: int | None = None
    cgroup_path: str | None = None
    view = memory_cgroup(proc, cgroup_root, pid)
    if view is not None:
        found = view.smallest_limit()
        if found is not None:
            cgroup_limit, directory, filename = found
            cgroup_path = str(directory)
            if cgroup_limit < hard:
                hard = cgroup_limit
                source = f"cgroup v{view.version} {directory} ({filename})"

    if reserve is not None:
        if reserve < 0:
            raise ValueError(f"invalid reserve {reserve}: must not be negative")
        if reserve >= hard:
            source += f"; reserve {format_size(reserve)} >= limit, using the default"
            reserve = default_reserve(hard)
    machine_reserve = default_reserve(hard) if reserve is None else reserve

    if budget is None:
        limit, use_budget, use_reserve = hard, hard - machine_reserve, machine_reserve
    elif budget <= 0:
        raise ValueError(f"invalid memory budget {budget}: must be positive")
    elif budget <= hard - machine_reserve:
        limit, use_budget, use_reserve = budget, budget, machine_reserve
        source = f"--memory-budget (machine limit {format_size(hard)} from {source})"
    else:
        limit, use_budget, use_reserve = hard, hard - machine_reserve, machine_reserve
        source += (
            f"; --memory-budget {format_size(budget)} clamped to {format_size(use_budget)}"
            f" (limit {format_size(hard)} - reserve {format_size(machine_reserve)})"
        )
    return Limits(
        limit=limit,
        budget=use_budget,
        reserve=use_reserve,
        source=source,
        host_total=host_total,
        cgroup_limit=cgroup_limit,
        cgroup_path=cgroup_path,
    )


# -- per-process helpers -------------------------------------------------------------------------


def clear_hwm(pid: int, proc: Path = Path("/proc")) -> bool:
    """Reset VmHWM to the current RSS (``clear_refs`` <- 5) so the next peak is per file."""
    try:
        fd = os.open(f"{proc}/{pid}/clear_refs", os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        os.write(fd, b"5")
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


def read_hwm(pid: int, proc: Path = Path("/proc")) -> int | None:
    """VmHWM in bytes; None when the process is gone or has no address space."""
    try:
        data = _read(f"{proc}/{pid}/status")
    except OSError:
        return None
    return _kb(data, b"VmHWM")


def cgroup_oom_kills(cgroup_dir: Path) -> int:
    """OOM kills counted by a cgroup: v1 ``memory.oom_control``, v2 ``memory.events`` (oom_kill)."""
    for name in ("memory.oom_control", "memory.events"):
        try:
            data = _read(str(Path(cgroup_dir) / name))
        except OSError:
            continue
        value = _find_int(data, b"oom_kill", sep=b" ")
        if value is not None:
            return value
    return 0


# -- the real sampler ----------------------------------------------------------------------------


@dataclass
class _Exact:
    """The last smaps_rollup reading of one process, and when the next one is due."""

    at: float
    due: float
    uss: int
    pss: int
    anon: int
    file: int


class ProcSampler:
    """Reads /proc, cgroup files and PSI; see the module docstring for what is rationed and why."""

    def __init__(
        self,
        proc: Path = Path("/proc"),
        cgroup_root: Path = Path("/sys/fs/cgroup"),
        *,
        exact_share: float = 0.005,
        min_exact_interval: float = 1.0,
        max_exact_interval: float = 60.0,
        children_interval: float = 1.0,
        shared_drift: int = 128 << 20,
        cgroup_pid: int | str = "self",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.proc = Path(proc)
        self.cgroup_root = Path(cgroup_root)
        self.exact_share = exact_share
        self.min_exact_interval = min_exact_interval
        self.max_exact_interval = max_exact_interval
        self.children_interval = children_interval
        self.shared_drift = shared_drift
        self._proc = str(self.proc)
        self._cgroup_pid = cgroup_pid
        self._clock = clock
        self._view: CgroupView | None = None
        self._view_resolved = False
        self._children_files: bool | None = None  # /proc/PID/task/TID/children (CONFIG_PROC_CHILDREN)
        self._ppid_map: dict[int, list[int]] | None = None
        self._ppid_map_at = float("-inf")
        self._descendants: dict[int, tuple[float, list[int]]] = {}
        self._exact: dict[int, _Exact] = {}
        self._smaps_rollup: bool | None = None
        self._roots_seen: dict[int, float] = {}
        self._pruned_at = clock()

    # host ---------------------------------------------------------------------------------------

    def host(self) -> HostMem:
        meminfo = _read_meminfo(self._proc)
        host_available = meminfo[b"MemAvailable"]
        view = self._cgroup_view()
        headroom = cgroup_headroom(view) if view is not None else None
        some, full = _read_psi(self._proc)
        return HostMem(
            total=meminfo[b"MemTotal"],
            available=host_available if headroom is None else min(host_available, headroom),
            psi_some_avg10=some,
            psi_full_avg10=full,
            swap_free=meminfo.get(b"SwapFree", 0),
            mem_available=host_available,
            cgroup_headroom=headroom,
            cgroup_path=str(view.path) if view is not None else None,
        )

    def process_scope(self, pid: int) -> "ProcScope | None":
        return process_scope(pid, self.proc, self.cgroup_root)

    def _cgroup_view(self) -> CgroupView | None:
        if not self._view_resolved:
            self._view = memory_cgroup(self.proc, self.cgroup_root, self._cgroup_pid)
            self._view_resolved = True
        return self._view

    # process trees ------------------------------------------------------------------------------

    def tree(self, pid: int, *, exact: bool = False) -> ProcMem | None:
        """Sum over ``pid`` and its descendants; None when ``pid`` is gone (or a zombie)."""
        root = _read_status(self._proc, pid)
        now = self._clock()
        if root is None or root.state in "ZX":
            if pid in self._roots_seen:
                self.forget(pid)
                self._reread_soon(now)
            return None
        self._roots_seen[pid] = now
        if now - self._pruned_at > 30.0:
            self._prune(now)
        members = self._members(pid, now, force=exact)
        if exact:
            # A new walk of this root: others' shares of the pages it maps can only have fallen,
            # so their estimates err high meanwhile; no walk of theirs sooner than its floor.
            self._reread_soon(now, skip=pid, floor=self.min_exact_interval)
        rss = uss = pss = swap = 0
        all_exact = True
        for member in members:
            status = root if member == pid else _read_status(self._proc, member)
            if status is None or status.state in "ZX":
                continue
            reading = self._uss_pss(member, status, now, exact)
            if reading is None:
                continue
            m_uss, m_pss, m_swap, was_exact = reading
            rss += status.rss
            uss += m_uss
            pss += m_pss
            swap += m_swap
            all_exact = all_exact and was_exact
        return ProcMem(pid=pid, rss=rss, uss=uss, pss=pss, swap=swap, hwm=root.hwm, exact=all_exact)

    def forget(self, pid: int) -> None:
        """Drop cached state for a root that is gone or no longer polled."""
        self._roots_seen.pop(pid, None)
        cached = self._descendants.pop(pid, None)
        self._exact.pop(pid, None)
        if cached is not None:
            for member in cached[1]:
                self._exact.pop(member, None)

    def _reread_soon(self, now: float, skip: int | None = None, floor: float = 0.0) -> None:
        """Bring other roots' next walk forward, one per poll rather than all in one tick, and no
        sooner than ``floor`` after a root's last walk (a burst of READYs then costs one walk each)."""
        i = 1
        for root in self._roots_seen:
            entry = self._exact.get(root)
            if root != skip and entry is not None:
                entry.due = min(entry.due, max(now + 0.25 * i, entry.at + floor))
                i += 1

    def _prune(self, now: float) -> None:
        """Forget roots nobody has asked about for a minute, so a long run does not accumulate them."""
        self._pruned_at = now
        for pid, seen in list(self._roots_seen.items()):
            if now - seen > 60.0:
                self.forget(pid)

    def _uss_pss(
        self, pid: int, status: _Status, now: float, force: bool
    ) -> tuple[int, int, int, bool] | None:
        """(USS, PSS, swap, exact) for one process: a fresh smaps walk when due, else an estimate."""
        last = self._exact.get(pid)
        if last is not None and not force:
            d_anon, d_file = status.anon - last.anon, status.file - last.file
            remapped = abs(d_file) >= self.shared_drift and now - last.at >= self.min_exact_interval
            if now < last.due and not remapped:
                uss = min(max(0, last.uss + d_anon), status.rss)
                pss = min(max(0, last.pss + d_anon + d_file), status.rss)
                return uss, pss, status.swap, False
        started = time.thread_time()
        reading = self._read_smaps(pid)
        cost = time.thread_time() - started
        if reading is None:
            self._exact.pop(pid, None)
            return None
        uss, pss, swap, measured = reading
        if not measured:
            return uss, pss, swap, False
        tracked = max(1, len(self._exact) + (last is None))
        interval = cost * tracked / self.exact_share if self.exact_share > 0 else self.max_exact_interval
        interval = min(max(interval, self.min_exact_interval), self.max_exact_interval)
        self._exact[pid] = _Exact(now, now + interval, uss, pss, status.anon, status.file)
        return uss, pss, swap, True

    def process_pss(self, pid: int) -> int | None:
        """PSS of one process alone (not its tree), exact; for the supervisor's and the zygote's
        own share, which the budget must carry too."""
        got = self._read_smaps(pid)
        return None if got is None else got[1]

    def _read_smaps(self, pid: int) -> tuple[int, int, int, bool] | None:
        """(USS, PSS, swap, measured) from smaps_rollup, or psutil (full smaps) without the rollup.

        A process we may not inspect (another user's) gets anonymous RSS as USS and RSS as PSS,
        not measured.
        """
        if self._smaps_rollup is not False:
            try:
                data = _read(f"{self._proc}/{pid}/smaps_rollup")
            except FileNotFoundError:
                if not os.path.exists(f"{self._proc}/{pid}"):
                    return None
                self._smaps_rollup = False
            except PermissionError:
                data = None
            except OSError:
                return None
            else:
                self._smaps_rollup = True
                uss = (_kb(data, b"Private_Clean") or 0) + (_kb(data, b"Private_Dirty") or 0)
                return uss, _kb(data, b"Pss") or 0, _kb(data, b"Swap") or 0, True
        import psutil  # only for kernels without smaps_rollup

        try:
            info = psutil.Process(pid).memory_full_info()
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            return None
        except psutil.AccessDenied:
            status = _read_status(self._proc, pid)
            return None if status is None else (status.anon, status.rss, status.swap, False)
        return info.uss, info.pss, getattr(info, "swap", 0), True

    def _members(self, pid: int, now: float, force: bool) -> list[int]:
        """``pid`` and its descendants, rediscovered at most once per ``children_interval``."""
        cached = self._descendants.get(pid)
        if cached is not None and not force and now - cached[0] < self.children_interval:
            return cached[1]
        members = self._discover(pid, now)
        if cached is not None:
            for gone in set(cached[1]) - set(members):
                self._exact.pop(gone, None)  # its pid may be reused by an unrelated process
        self._descendants[pid] = (now, members)
        return members

    def _discover(self, pid: int, now: float) -> list[int]:
        members = [pid]
        seen = {pid}
        i = 0
        while i < len(members):
            for child in self._children(members[i], now):
                if child not in seen:
                    seen.add(child)
                    members.append(child)
            i += 1
        return members

    def _children(self, pid: int, now: float) -> list[int]:
        if self._children_files is None:
            task = f"{self._proc}/{pid}/task/{pid}"
            if os.path.isdir(task):
                self._children_files = os.path.exists(f"{task}/children")
        if self._children_files:
            try:
                tids = os.listdir(f"{self._proc}/{pid}/task")
            except OSError:
                return []
            kids: list[int] = []
            for tid in tids:
                try:
                    kids.extend(int(x) for x in _read(f"{self._proc}/{pid}/task/{tid}/children").split())
                except (OSError, ValueError):
                    continue
            return kids
        return self._scan_ppids(now).get(pid, [])

    def _scan_ppids(self, now: float) -> dict[int, list[int]]:
        """parent -> children from every /proc/*/stat; shared by all trees for a short while."""
        if self._ppid_map is not None and now - self._ppid_map_at < min(0.2, self.children_interval):
            return self._ppid_map
        parents: dict[int, list[int]] = {}
        try:
            names = os.listdir(self._proc)
        except OSError:
            names = []
        for name in names:
            if not name.isdigit():
                continue
            st = proc_stat(int(name), self._proc)
            if st is not None:
                parents.setdefault(st.ppid, []).append(int(name))
        self._ppid_map, self._ppid_map_at = parents, now
        return parents
