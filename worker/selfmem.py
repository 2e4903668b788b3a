"""The worker's view of its own memory: cheap reads of /proc/self, no psutil.

A file's growth is measured twice: by the supervisor polling the worker's USS, and by the worker
itself through VmHWM (cleared when a file or a probe starts), so a spike between two polls is not
missed. Probes at READY and ``progress`` messages use the same reads.
"""

from __future__ import annotations


def read_status_kb(field: str) -> float | None:
    try:
        with open("/proc/self/status", "rb") as fh:
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


def own_memory_mb() -> dict[str, float]:
    """RSS/USS/PSS of this process from smaps_rollup."""
    out = {"rss_mb": 0.0, "uss_mb": 0.0, "pss_mb": 0.0}
    try:
        with open("/proc/self/smaps_rollup", "rb") as fh:
            for line in fh:
                key, _, rest = line.partition(b":")
                kb = rest.split()[0] if rest.split() else b"0"
                if key == b"Rss":
                    out["rss_mb"] = int(kb) / 1024
                elif key == b"Pss":
                    out["pss_mb"] = int(kb) / 1024
                elif key in (b"Private_Clean", b"Private_Dirty"):
                    out["uss_mb"] += int(kb) / 1024
    except OSError:
        rss = read_status_kb("VmRSS")
        out["rss_mb"] = out["uss_mb"] = out["pss_mb"] = (rss or 0.0) / 1024
    return out
