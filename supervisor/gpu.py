"""GPU memory readings over NVML: the only code that asks the driver about VRAM.

Like ``sampler.py`` for host memory, this module only reads; what to do about a reading is the
policy's job. ``pynvml`` (package ``nvidia-ml-py``, the ``gpu`` extra) is imported lazily, when a
run on a CUDA device opens a reader, so a CPU run never needs it. Without NVML (no driver, no
package, a container that hides it) ``open_reader`` returns None and the run has no VRAM budget;
the per-file VRAM figures the workers report themselves (torch's allocator) still teach the model.

NVML reports per-process GPU memory by the pid it sees; inside a container whose pid namespace
differs from the driver's, a worker's pid is not among them and its reading falls back to what the
worker reported at READY.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Protocol

MiB = 2**20


@dataclass(frozen=True)
class GpuDevice:
    """One device's memory in bytes."""

    index: int
    name: str
    total: int
    free: int
    used: int


@dataclass(frozen=True)
class GpuReading:
    """The devices a run uses and the GPU memory each process holds on them (bytes)."""

    devices: tuple[GpuDevice, ...]
    processes: dict[int, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(d.total for d in self.devices)

    @property
    def free(self) -> int:
        return sum(d.free for d in self.devices)

    def of(self, pids: list[int] | tuple[int, ...]) -> int | None:
        """GPU memory of a process tree; None when NVML lists none of its pids."""
        got = [self.processes[p] for p in pids if p in self.processes]
        return sum(got) if got else None


class VramReader(Protocol):
    """What the supervisor reads VRAM through; tests pass ``FakeVramReader``."""

    def read(self) -> GpuReading: ...

    def close(self) -> None: ...


def device_indices(device: str) -> list[int] | None:
    """GPU indices a ``--device`` names: ``cuda`` -> [0], ``cuda:2`` -> [2]; None for anything else."""
    m = re.fullmatch(r"cuda(?::(\d+))?", (device or "").strip().lower())
    if m is None:
        return None
    return [int(m.group(1) or 0)]


class NvmlReader:
    """Device totals/free and per-process used memory from NVML for the given device indices."""

    def __init__(self, indices: list[int], nvml: Any = None) -> None:
        if nvml is None:
            import pynvml as nvml  # noqa: PLC0415 - the optional 'gpu' extra, only on CUDA runs
        self.nvml = nvml
        nvml.nvmlInit()
        self.handles = [(i, nvml.nvmlDeviceGetHandleByIndex(i)) for i in indices]

    def read(self) -> GpuReading:
        n = self.nvml
        devices, procs = [], {}
        for i, h in self.handles:
            info = n.nvmlDeviceGetMemoryInfo(h)
            name = n.nvmlDeviceGetName(h)
            devices.append(GpuDevice(i, name.decode() if isinstance(name, bytes) else str(name),
                                     int(info.total), int(info.free), int(info.used)))
            try:
                running = n.nvmlDeviceGetComputeRunningProcesses(h)
            except Exception:  # noqa: BLE001 - an unsupported query: no per-process figures
                running = []
            for p in running:
                used = getattr(p, "usedGpuMemory", None)
                if isinstance(used, int) and 0 <= used < 1 << 60:  # None / NOT_AVAILABLE when hidden
                    procs[int(p.pid)] = procs.get(int(p.pid), 0) + used
        return GpuReading(tuple(devices), procs)

    def close(self) -> None:
        try:
            self.nvml.nvmlShutdown()
        except Exception:  # noqa: BLE001 - shutting down a driver that went away
            pass


class FakeVramReader:
    """A device of ``total_mb`` whose per-process figures tests set: ``procs[pid] = mb``."""

    def __init__(self, total_mb: float, *, others_mb: float = 0.0, name: str = "fake GPU") -> None:
        self.total_mb = total_mb
        self.others_mb = others_mb  # memory of processes that are not ours
        self.procs: dict[int, float] = {}
        self.name = name
        self.fail: Exception | None = None

    def read(self) -> GpuReading:
        if self.fail is not None:
            raise self.fail
        used = sum(self.procs.values()) + self.others_mb
        total = int(self.total_mb * MiB)
        dev = GpuDevice(0, self.name, total, max(0, total - int(used * MiB)), int(used * MiB))
        return GpuReading((dev,), {pid: int(mb * MiB) for pid, mb in self.procs.items()})

    def close(self) -> None:
        return None


def open_reader(device: str) -> tuple[VramReader | None, str]:
    """A reader for a CUDA ``device`` and why (or why not): (None, reason) on a CPU run, without
    the ``gpu`` extra or without a working driver."""
    indices = device_indices(device)
    if indices is None:
        return None, "not a CUDA device"
    try:
        return NvmlReader(indices), "nvml"
    except ImportError:
        return None, "nvidia-ml-py is not installed (pip install 'batchalign-supervise[gpu]')"
    except Exception as exc:  # noqa: BLE001 - NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return None, f"NVML unavailable: {type(exc).__name__}: {exc}"
