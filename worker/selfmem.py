"""The worker's view of its own memory: cheap reads of /proc/self, no psutil.

A file's growth is measured twice: by the supervisor polling the worker's USS, and by the worker
itself through VmHWM (cleared when a file or a probe starts), so a spike between two polls is not
missed. Probes at READY and ``progress`` messages use the same reads.
"""

from __future__ import annotations

import functools


def read_status_kb(field: str, pid: int | str = "self") -> float | None:
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(field.encode() + b":"):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


def rss_mb() -> float | None:
    kb = read_status_kb("VmRSS")
    return None if kb is None else kb / 1024


def hwm_mb() -> float | None:
    """Peak RSS since the last ``clear_hwm`` (or since the process started)."""
    kb = read_status_kb("VmHWM")
    return None if kb is None else kb / 1024


def clear_hwm() -> None:
    """Reset VmHWM to the current RSS (``/proc/self/clear_refs`` <- 5); a no-op where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def own_memory_mb(pid: int | str = "self") -> dict[str, float]:
    """RSS/USS/PSS of this process (or of ``pid``) from smaps_rollup, and its private dirty pages
    (``dirty_mb``: what no other process can share; memory-mapped weights are clean)."""
    out = {"rss_mb": 0.0, "uss_mb": 0.0, "pss_mb": 0.0, "dirty_mb": 0.0}
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as fh:
            for line in fh:
                key, _, rest = line.partition(b":")
                kb = rest.split()[0] if rest.split() else b"0"
                if key == b"Rss":
                    out["rss_mb"] = int(kb) / 1024
                elif key == b"Pss":
                    out["pss_mb"] = int(kb) / 1024
                elif key in (b"Private_Clean", b"Private_Dirty"):
                    out["uss_mb"] += int(kb) / 1024
                    if key == b"Private_Dirty":
                        out["dirty_mb"] = int(kb) / 1024
    except OSError:
        rss = read_status_kb("VmRSS", pid)
        out["rss_mb"] = out["uss_mb"] = out["pss_mb"] = out["dirty_mb"] = (rss or 0.0) / 1024
    return out


class PeakWatch:
    """Growth over a block of work, measured as the supervisor measures a file's: the larger of
    peak RSS (VmHWM, cleared at the start) above the RSS before, and the highest USS read every
    ``interval`` seconds above the USS before. USS matters in a worker forked from the zygote:
    pages it shares copy-on-write become private as they are written, which RSS does not show."""

    def __init__(self, interval: float = 0.05) -> None:
        import threading

        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="peak-watch", daemon=True)
        self.rss0 = self.uss0 = 0.0
        self.uss_peak = 0.0

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self.uss_peak = max(self.uss_peak, own_memory_mb()["uss_mb"])

    def __enter__(self) -> "PeakWatch":
        mem = own_memory_mb()
        self.rss0, self.uss0 = mem["rss_mb"], mem["uss_mb"]
        self.uss_peak = self.uss0
        clear_hwm()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.uss_peak = max(self.uss_peak, own_memory_mb()["uss_mb"])
        self.hwm = hwm_mb() or self.rss0

    @property
    def growth_mb(self) -> float:
        return max(0.0, self.hwm - self.rss0, self.uss_peak - self.uss0)


def pin_mmap_threshold(threshold: int | str | None) -> bool:
    """Fix glibc's mmap threshold for this process (``M_MMAP_THRESHOLD``) before any file runs.

    glibc starts at 128 KiB and raises the threshold to the size of each mapped block freed, up
    to 32 MiB: after one large file, a worker serves the tensors of its later, smaller files from
    the heap, whose freed pieces linger between allocations, so a 4.4 s wav2vec2 file that follows
    larger ones peaked 159 MiB above READY instead of the 66 it takes on its own. Fixed, every
    large tensor is mapped and unmapped whole, and a file's growth follows what it holds.
    Below a model's span-sized buffers is enough: lower, every per-op temporary is mapped and
    faulted in anew (at 128 KiB, 11% more CPU for wav2vec2 and 34% for Whisper tiny.en).
    True when set (glibc only; elsewhere, or with no threshold, nothing changes)."""
    if not threshold or threshold == "auto" or int(threshold) <= 0:
        return False  # "auto": the engine sets it once its model is loaded
    try:
        return bool(libc().mallopt(-3, int(threshold)))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


@functools.lru_cache(maxsize=1)
def libc():
    """The C library (glibc's malloc controls: ``mallopt``, ``malloc_trim``)."""
    import ctypes  # noqa: PLC0415

    return ctypes.CDLL("libc.so.6")
