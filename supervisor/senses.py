"""Sensing: the one owner of the latest readings (host memory, the supervisor's own share).

Each tick reads the host once and every worker's process tree once, through the ``Sampler``, and
hands the trees to the worker table. A host reading that fails is said once (and its recovery
once) and leaves ``host`` as None, which the policy takes as "admit nothing new", never as room.
Nothing here decides or acts.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from supervisor.sampler import HostMem, ProcSampler, Sampler

MiB = 2**20
OVERHEAD_S = 10.0  # static memory: an exact read of the supervisor's own share now and then is enough


def default_sampler() -> ProcSampler:
    # Exact smaps reads walk page tables (~11 ms per GiB): ration them; status-based estimates
    # track anonymous growth in between.
    return ProcSampler(exact_share=0.002, min_exact_interval=5.0)


class Senses:
    def __init__(self, sampler: Sampler, emit: Callable[..., None],
                 extra_pids: Callable[[], list[int]] = lambda: []) -> None:
        self.sampler = sampler
        self.emit = emit
        self.extra_pids = extra_pids  # our processes that hold memory but are not workers (the zygote)
        self.host: HostMem | None = None
        self.host_error: str | None = None
        self.overhead_mb = 0.0
        self._overhead_at = -1e9

    def sample(self, now: float, workers: Any) -> None:
        """Read the host and every present worker's tree; the worker table gets the trees."""
        self._read_host()
        for w in workers.present():
            mem = self.sampler.tree(w.pid) if w.pid else None
            if mem is not None:
                workers.observe(w, mem)
        if now - self._overhead_at >= OVERHEAD_S:
            self._overhead_at = now
            self.overhead_mb = self._overhead()

    def exact(self, pid: int) -> Any:
        """A real smaps read of one tree (a baseline at READY), not an estimate."""
        return self.sampler.tree(pid, exact=True)

    @property
    def available_mb(self) -> float | None:
        return self.host.available / MiB if self.host is not None else None

    def _read_host(self) -> None:
        try:
            self.host = self.sampler.host()
        except (OSError, KeyError, ValueError) as exc:
            self.host = None
            if self.host_error is None:
                self.host_error = f"{type(exc).__name__}: {exc}"
                self.emit("host_memory_unreadable", level="error", error=self.host_error,
                          effect="admitting nothing new until host memory can be read again")
            return
        if self.host_error is not None:
            self.emit("host_memory_readable", after_error=self.host_error)
            self.host_error = None

    def _overhead(self) -> float:
        """The supervisor's own PSS and the zygote's (its workers are counted on their own)."""
        read = getattr(self.sampler, "process_pss", None)
        if read is None:
            return 0.0
        return sum(read(pid) or 0 for pid in (os.getpid(), *self.extra_pids())) / MiB
