"""The worker's own GPU memory, from torch's caching allocator (CUDA runs only).

The supervisor reads per-process GPU memory from NVML; these figures are the worker's own view,
reported at READY and with each result, and stand in where NVML cannot see the process (a
container's pid namespace). Nothing here imports torch: on a CPU run every function returns None.
"""

from __future__ import annotations

import sys

MiB = 2**20


def _cuda():
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        return torch.cuda if torch.cuda.is_initialized() else None
    except Exception:  # noqa: BLE001 - a torch without CUDA support
        return None


def reserved_mb() -> float | None:
    """What the allocator holds on the GPU now (MiB), or None when CUDA is not in use."""
    cuda = _cuda()
    return round(cuda.memory_reserved() / MiB, 1) if cuda is not None else None


def reset_peak() -> None:
    cuda = _cuda()
    if cuda is not None:
        cuda.reset_peak_memory_stats()


def peak_mb() -> float | None:
    """The allocator's peak reservation since ``reset_peak`` (MiB), or None without CUDA."""
    cuda = _cuda()
    return round(cuda.max_memory_reserved() / MiB, 1) if cuda is not None else None
