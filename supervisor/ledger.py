"""A host-wide ledger of memory reservations shared by every supervisor on the machine.

Each supervisor sees the host's free memory, but free memory is a promise to nobody: two
supervisors (often started by different people on a shared lab server) that both see 20 GiB free
would both admit files that grow into it. Each therefore writes what it has committed but not yet
used into one small JSON file, and subtracts what the others reserved before admitting.

Concurrency: every read-modify-write happens under an exclusive ``flock`` on a separate lock file,
so readers never see a half-written ledger. Writes go to a temporary file renamed over the ledger;
in a sticky world-writable directory a user may not rename over another user's file, so then the
ledger is rewritten in place, which the lock makes just as safe for readers. A supervisor about to
raise its promise (admit a file, start a worker) ``claim``s it: the others are read and the new
promise written under one lock, and the claim is refused if the others took more room since it
last looked, so two supervisors never both admit into the same free memory.

Liveness and trust: the ledger is a world-writable file, so an entry is believed only as far as it
can be checked. Its pid must be alive with the start time recorded (``/proc/PID/stat``: a reused
pid is not the writer) and owned by the uid the entry claims; and its reservation counts for at
most what that process could still take: its own memory cgroup's headroom and the host's
MemAvailable, both read here, never taken from the entry. Entries not refreshed for
``stale_after`` seconds are dropped (a hung supervisor must not pin memory forever). Each entry
records its writer's memory cgroup so that a reader can tell where the promise will be drawn
from; ``charged`` turns the believed reservations into what they take from *this* supervisor's
room: all of them reduce the host's MemAvailable, only those inside its own cgroup reduce the
cgroup's headroom. The ledger is soft state: losing it costs at most one refresh.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import pwd
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from supervisor.paths import is_within
from supervisor.sampler import ProcScope, memory_cgroup, proc_stat, process_scope
from worker.output import atomic_write_bytes, pid_exists

__all__ = ["HostLedger", "Reservation", "charged", "default_ledger_path", "proc_start_time"]

MIB = 1024 * 1024
RUN_DIR = Path("/run/batchalign-supervise")
TMP_DIR = Path("/tmp/batchalign-supervise")
LEDGER_NAME = "ledger.json"
VERSION = 1


@dataclass(frozen=True)
class Reservation:
    """A believed entry: what it may still take (capped) and the cgroup it would take it from."""

    owner: str
    pid: int
    uid: int
    cgroup: str | None
    claimed_bytes: int
    reserved_bytes: int


def charged(reservations: Iterable[Reservation], *, host_available: int, cgroup_headroom: int | None,
            own_cgroup: str | None) -> int:
    """Bytes other supervisors' promises take from this supervisor's room (pure).

    This supervisor's room is min(host MemAvailable, its cgroup's headroom). Every promise comes
    out of the host's MemAvailable; only promises made from inside this supervisor's cgroup come
    out of its headroom. The result is the room before minus the room after.
    """
    rs = list(reservations)
    on_host = sum(r.reserved_bytes for r in rs)
    if cgroup_headroom is None or own_cgroup is None:
        return on_host
    inside = sum(r.reserved_bytes for r in rs if r.cgroup is not None and is_within(r.cgroup, own_cgroup))
    before = min(host_available, cgroup_headroom)
    after = min(host_available - on_host, cgroup_headroom - inside)
    return max(0, before - after)


def default_ledger_path() -> Path:
    """``/run/batchalign-supervise/ledger.json`` when usable, else the same name under /tmp.

    An existing, writable ``/run/batchalign-supervise`` (made by tmpfiles.d or the service unit)
    wins, so root and unprivileged supervisors end up in the same file.
    """
    if RUN_DIR.is_dir() and os.access(RUN_DIR, os.W_OK | os.X_OK):
        return RUN_DIR / LEDGER_NAME
    if not RUN_DIR.exists() and os.access("/run", os.W_OK | os.X_OK):
        return RUN_DIR / LEDGER_NAME
    return TMP_DIR / LEDGER_NAME


def proc_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (field 22 of /proc/PID/stat), or None."""
    st = proc_stat(pid)
    return None if st is None else st.start_time


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


class HostLedger:
    """Reservations of every live supervisor on this host, keyed by owner id.

    ``update`` is cheap enough for every loop tick: it skips the write when the value moved by at
    most 1 MiB and this process's entry was refreshed recently. ``scope`` reads who a pid really
    is (tests pass fakes); ``host_available`` the host's MemAvailable in bytes.
    """

    def __init__(
        self,
        path: Path | None = None,
        stale_after: float = 60.0,
        clock: Callable[[], float] = time.time,
        scope: Callable[[int], ProcScope | None] = process_scope,
    ) -> None:
        self.path = Path(path) if path is not None else default_ledger_path()
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.stale_after = float(stale_after)
        self._clock = clock
        self._scope = scope
        self._pid = os.getpid()
        self._start = proc_start_time(self._pid)
        self._uid = os.geteuid()
        self._user = _user_name(self._uid)
        view = memory_cgroup()
        self.cgroup = str(view.path) if view is not None else None
        self._written: dict[str, tuple[int, float]] = {}
        self._ensure_dir()

    # -- public API --------------------------------------------------------------------------------
    def register(self, owner_id: str) -> None:
        """Create (or refresh) this process's entry with nothing reserved yet."""
        self._store(owner_id, 0)

    def update(self, owner_id: str, reserved_bytes: int | float) -> None:
        """Record what this supervisor has committed now (bytes); usually a no-op write-wise."""
        reserved = max(0, int(reserved_bytes))
        last = self._written.get(owner_id)
        if last is not None:
            value, at = last
            if abs(value - reserved) <= MIB and self._clock() - at < self.stale_after / 4:
                return
        self._store(owner_id, reserved)

    def reservations(self, owner_id: str, host_available: int | None = None) -> list[Reservation]:
        """Other owners' believed reservations; stale, dead and reused-pid entries are removed."""
        with self._locked():
            entries = self._read()
            changed = self._prune(entries, keep=owner_id)
            if changed:
                self._write(entries)
        out = []
        for key, entry in entries.items():
            if key == owner_id:
                continue
            r = self._believe(key, entry, host_available)
            if r is not None:
                out.append(r)
        return out

    def claim(self, owner_id: str, reserved_bytes: int | float, host_available: int | None,
              accept: Callable[[list[Reservation]], bool]) -> tuple[bool, list[Reservation]]:
        """Raise this owner's promise to ``reserved_bytes`` only if ``accept`` approves the others'
        believed reservations as read under the same lock; returns (written, those reservations).

        Reading the others at one moment and publishing a promise at another lets two supervisors
        admit into the same free memory between the two; here the read and the write are one step,
        so of two supervisors claiming at once the second sees the first's promise.
        """
        reserved = max(0, int(reserved_bytes))
        now = self._clock()
        with self._locked():
            entries = self._read()
            changed = self._prune(entries, keep=owner_id)
            others = [r for key, entry in entries.items()
                      if key != owner_id and (r := self._believe(key, entry, host_available)) is not None]
            ok = bool(accept(others))
            if ok:
                entries[owner_id] = self._entry(owner_id, reserved, now)
            if ok or changed:
                self._write(entries)
        if ok:
            self._written[owner_id] = (reserved, now)
        return ok, others

    def others(self, owner_id: str, host_available: int | None = None) -> int:
        """Bytes reserved by other live supervisors, as far as they are believed."""
        return sum(r.reserved_bytes for r in self.reservations(owner_id, host_available))

    def unregister(self, owner_id: str) -> None:
        """Remove this owner's entry (on a clean exit; a crash is cleaned up by the others)."""
        self._written.pop(owner_id, None)
        with self._locked():
            entries = self._read()
            removed = entries.pop(owner_id, None) is not None
            if removed or self._prune(entries, keep=None):
                self._write(entries)

    def entries(self) -> list[dict[str, Any]]:
        """Copies of the live entries (stale ones are removed first)."""
        with self._locked():
            entries = self._read()
            if self._prune(entries, keep=None):
                self._write(entries)
        return [dict(e) for e in entries.values()]

    # -- internals -----------------------------------------------------------------------------------
    def _store(self, owner_id: str, reserved: int) -> None:
        now = self._clock()
        with self._locked():
            entries = self._read()
            self._prune(entries, keep=owner_id)
            entries[owner_id] = self._entry(owner_id, reserved, now)
            self._write(entries)
        self._written[owner_id] = (reserved, now)

    def _entry(self, owner_id: str, reserved: int, now: float) -> dict[str, Any]:
        return {
            "owner": owner_id,
            "pid": self._pid,
            "pid_start_time": self._start,
            "user": self._user,
            "uid": self._uid,
            "cgroup": self.cgroup,
            "reserved_bytes": reserved,
            "updated": round(now, 3),
        }

    def _believe(self, key: str, entry: dict[str, Any], host_available: int | None) -> Reservation | None:
        """Sense the claimed pid's owner and headroom, then judge the entry (``believe``)."""
        pid = _pid_of(entry)
        return believe(key, entry, self._scope(pid) if pid else None, host_available)

    def _alive(self, entry: dict[str, Any]) -> bool:
        """Sense the claimed pid's start time (and, when /proc hides it, whether it exists)."""
        pid = _pid_of(entry)
        if not pid:
            return False
        start = proc_start_time(pid)
        return alive(entry, start, pid_exists(pid) if start is None else True)

    def _prune(self, entries: dict[str, dict], keep: str | None) -> bool:
        now = self._clock()
        dead = []
        for key, entry in entries.items():
            if key == keep:
                continue
            if not isinstance(entry, dict):
                dead.append(key)
                continue
            try:
                age = now - float(entry.get("updated", 0))
            except (TypeError, ValueError):
                age = float("inf")
            if age > self.stale_after or not self._alive(entry):
                dead.append(key)
        for key in dead:
            del entries[key]
        return bool(dead)

    def _ensure_dir(self) -> None:
        d = self.path.parent
        if d.is_dir():
            return
        try:
            d.mkdir(parents=True)
        except FileExistsError:
            return
        try:
            # Sticky and world-writable like /tmp: every user may add files, none may delete others'.
            os.chmod(d, 0o1777)
        except PermissionError:
            pass

    @contextmanager
    def _locked(self) -> Iterator[None]:
        fd = self._open_lock()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing drops the lock

    def _open_lock(self) -> int:
        for _ in range(10):
            try:
                return os.open(self.lock_path, os.O_RDWR | os.O_CLOEXEC)
            except PermissionError:
                # flock works on a read-only descriptor; a lock file we cannot write is fine.
                return os.open(self.lock_path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                pass
            try:
                # O_EXCL, never plain O_CREAT: with fs.protected_regular an O_CREAT open of another
                # user's file in a sticky directory fails even when the file is 0666.
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
            except FileExistsError:
                continue
            os.fchmod(fd, 0o666)
            return fd
        raise OSError(errno.EAGAIN, f"cannot open the ledger lock {self.lock_path}")

    def _read(self) -> dict[str, dict]:
        try:
            with open(self.path, "rb") as fh:
                data = json.loads(fh.read() or b"{}")
        except FileNotFoundError:
            return {}
        except (ValueError, UnicodeDecodeError):
            return {}  # torn or foreign content: start over, every live owner rewrites its entry
        entries = data.get("entries") if isinstance(data, dict) else None
        if not isinstance(entries, dict):
            return {}
        return {str(k): v for k, v in entries.items() if isinstance(v, dict)}

    def _write(self, entries: dict[str, dict]) -> None:
        data = json.dumps({"version": VERSION, "entries": entries}, separators=(",", ":")).encode()
        try:
            atomic_write_bytes(self.path, data, mode=0o666)
            return
        except PermissionError:
            pass
        # Another user's ledger in a sticky directory: rewrite it in place, still under the lock.
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
        except PermissionError as exc:
            raise PermissionError(
                exc.errno, f"cannot update the memory ledger {self.path}: not writable by {self._user}"
            ) from None
        try:
            os.pwrite(fd, data, 0)
            os.ftruncate(fd, len(data))
        finally:
            os.close(fd)


def _pid_of(entry: dict[str, Any]) -> int | None:
    try:
        pid = int(entry["pid"])
    except (KeyError, TypeError, ValueError):
        return None
    return pid if pid > 0 else None


def believe(key: str, entry: dict[str, Any], scope: ProcScope | None,
            host_available: int | None) -> Reservation | None:
    """The entry as far as it can be checked: its pid is the uid it claims, its reservation at
    most what that process could still take. None when it cannot be checked (pure)."""
    try:
        pid, uid, claimed = int(entry["pid"]), int(entry["uid"]), max(0, int(entry.get("reserved_bytes", 0)))
    except (KeyError, TypeError, ValueError):
        return None
    if scope is None or scope.uid != uid:
        return None
    cap = [claimed]
    if scope.headroom is not None:
        cap.append(scope.headroom)
    if host_available is not None:
        cap.append(max(0, host_available))
    return Reservation(owner=key, pid=pid, uid=uid, cgroup=scope.cgroup, claimed_bytes=claimed,
                       reserved_bytes=min(cap))


def alive(entry: dict[str, Any], start_time: int | None, exists: bool) -> bool:
    """Whether the entry's process still runs (pure). Without a start time (gone, or hidden by
    /proc's hidepid=) only existence tells: a hidden entry lives until it goes stale, and it is not
    believed meanwhile since it cannot be checked. A start time must match the recorded one (a
    reused pid is another process)."""
    if start_time is None:
        return exists
    recorded = entry.get("pid_start_time")
    return recorded is None or int(recorded) == start_time
