"""Slurm through dask-jobqueue: a ``SLURMCluster`` of standard jobs from ``[cluster.slurm]``, plus one
job sized for each file that needs more than a standard worker offers.

Standard jobs (``memory`` and ``cores`` each, ``processes`` workers per job) are scaled up to
``max_jobs`` while files wait. A file whose request (its predicted peak, raised past the peak it was
killed at) is above what a standard worker offers gets its own job of about that size, up to
``max_memory``: the retry asks Slurm for the memory the prediction says it needs, instead of
repeating the guess that was killed. Each job runs ``python -m supervisor.cluster.worker`` (the
``batchalign-supervise worker`` command) with ``--memory-limit`` = the job's memory per process, so
the nanny restarts a worker before Slurm's own limit is reached.
"""

from __future__ import annotations

import math
import sys
from typing import Any, Callable

from supervisor.cluster.worker import JOB_OVERHEAD_MB, TERMINATE_FRACTION, offered_mb

MiB = 2**20
STEP_MB = 64  # sized jobs are rounded up to this


class SlurmPool:
    def __init__(self, settings: Any, emit: Callable[..., None] | None = None) -> None:
        self.s = settings
        self.emit = emit or (lambda *a, **k: None)
        self.cluster: Any = None
        self.sized: list[Any] = []  # SLURMJob objects started for large files
        self._sized_offers: list[float] = []
        self._reported: set[str] = set()
        self._ended: set[str] = set()
        self._free_needed = 0  # standard jobs to retire (when idle) to make room for sized ones
        self._target = 0

    # -- set-up ----------------------------------------------------------------------------------------
    def job_kwargs(self, memory: int | None = None) -> dict[str, Any]:
        s = self.s
        processes = max(1, s.processes)
        kw: dict[str, Any] = dict(
            cores=s.cores, processes=processes, memory=f"{(memory or s.memory) // MiB}MiB",
            walltime=s.walltime or None, queue=s.partition or None, account=s.account or None,
            python=s.python or sys.executable, worker_command="supervisor.cluster.worker",
            worker_extra_args=["--nworkers", str(processes)], job_extra_directives=list(s.job_extra),
            death_timeout=60, local_directory=s.local_directory or None, log_directory=s.log_directory or None,
            job_name="batchalign")
        return kw

    async def start(self) -> Any:
        try:
            from dask_jobqueue import SLURMCluster
        except ImportError:
            from supervisor.cluster import ClusterUnavailable

            raise ClusterUnavailable("--cluster slurm needs dask-jobqueue: pip install 'batchalign-supervise[cluster]'"
                                     ) from None
        scheduler = {"dashboard_address": None}
        if self.s.scheduler_host:
            scheduler["host"] = self.s.scheduler_host
        self.cluster = await SLURMCluster(asynchronous=True, scheduler_options=scheduler, **self.job_kwargs())
        self.emit("slurm_cluster_started", scheduler=self.cluster.scheduler_address,
                  memory_mb=self.s.memory // MiB, cores=self.s.cores, processes=self.s.processes,
                  max_jobs=self.s.max_jobs, max_memory_mb=self.max_memory // MiB,
                  job_script=self.cluster.job_script())
        return self.cluster

    @property
    def max_memory(self) -> int:
        return self.s.max_memory or 4 * self.s.memory

    @staticmethod
    def offer_of(job_memory: int, processes: int = 1) -> float:
        """What each worker of a job with this ``--mem`` offers (see ``worker.slurm_job_limit``)."""
        return offered_mb(max(64 * MiB, job_memory - JOB_OVERHEAD_MB * MiB) // max(1, processes))

    def standard_offer_mb(self) -> float:
        return self.offer_of(self.s.memory, self.s.processes)

    def max_offer_mb(self) -> float:
        return self.offer_of(self.max_memory)

    def target_workers(self) -> int:
        return self._target * max(1, self.s.processes) + len(self.sized)

    # -- scaling -----------------------------------------------------------------------------------------
    def scale_for(self, pending: int) -> None:
        """Scale standard jobs up for what waits; never down mid-run (that would cut a file short)."""
        if self.cluster is None:
            return
        room = max(0, self.s.max_jobs - len(self.sized) - self._free_needed)
        want = min(room, math.ceil(pending / max(1, self.s.processes)))
        if want > self._target:
            self._target = want
            self.cluster.scale(jobs=want)

    def ensure(self, request_mb: float, live_offer_mb: float | None) -> None:
        """Start a job sized for a file whose request no standard worker (or sized job) can hold."""
        if request_mb <= self.standard_offer_mb():
            return
        if any(offer >= request_mb for offer in self._sized_offers):
            return
        need = math.ceil((request_mb / TERMINATE_FRACTION + JOB_OVERHEAD_MB) / STEP_MB) * STEP_MB * MiB
        memory = min(max(need, self.s.memory), self.max_memory)
        if self._target + len(self.sized) + 1 > self.s.max_jobs:
            self._free_needed += 1  # max_jobs is the user's cap: an idle standard job makes room
        from dask_jobqueue.slurm import SLURMJob

        kw = self.job_kwargs(memory)
        kw.update(processes=1, worker_extra_args=["--nworkers", "1"])
        job = SLURMJob(scheduler=self.cluster.scheduler_address, name=f"batchalign-sized-{len(self.sized)}", **kw)
        self.sized.append(job)
        self._sized_offers.append(self.offer_of(memory))
        import asyncio

        asyncio.get_running_loop().create_task(self._start_sized(job, memory, request_mb))

    async def _start_sized(self, job: Any, memory: int, request_mb: float) -> None:
        try:
            await job.start()
        except Exception as exc:
            self.emit("slurm_job_failed", level="error", error=f"{type(exc).__name__}: {exc}"[:2000])
            return
        self.emit("slurm_job_submitted", job_id=job.job_id, memory_mb=memory // MiB, cores=self.s.cores,
                  sized_for_mb=round(request_mb, 1), kind="sized")

    def poll(self, idle_names: list[str] | None = None) -> None:
        """Log each standard job once it has a Slurm job id; retire idle ones a sized job waits for."""
        if self.cluster is None:
            return
        for name, job in list(getattr(self.cluster, "workers", {}).items()):
            jid = getattr(job, "job_id", None)
            if jid and jid not in self._reported:
                self._reported.add(jid)
                self.emit("slurm_job_submitted", job_id=jid, name=str(name), memory_mb=self.s.memory // MiB,
                          cores=self.s.cores, kind="standard")
        retire = []
        for name in idle_names or []:
            if self._free_needed <= 0 or self._target <= 0:
                break
            if name in self.cluster.worker_spec or any(name.startswith(str(k) + "-") for k in self.cluster.worker_spec):
                retire.append(name)
                self._free_needed -= 1
                self._target -= 1
        if retire:
            import asyncio

            self.emit("slurm_job_retired", names=retire, reason="room for a job sized for a larger file")
            asyncio.get_running_loop().create_task(self.cluster.scale_down(retire))

    async def describe_loss(self, worker_addr: str) -> str | None:
        """Slurm's word on the jobs that ended (OUT_OF_MEMORY, FAILED, TIMEOUT...), when it can be had."""
        import asyncio

        jobs = [j for j in [*getattr(self.cluster, "workers", {}).values(), *self.sized] if getattr(j, "job_id", None)]
        states = []
        for job in jobs:
            if job.job_id in self._ended:
                continue
            try:
                proc = await asyncio.create_subprocess_exec("scontrol", "-o", "show", "job", str(job.job_id),
                                                            stdout=asyncio.subprocess.PIPE,
                                                            stderr=asyncio.subprocess.DEVNULL)
                out, _ = await asyncio.wait_for(proc.communicate(), 5)
            except (OSError, asyncio.TimeoutError):
                return None
            for token in out.decode(errors="replace").split():
                if token.startswith("JobState=") and token.split("=", 1)[1] not in ("RUNNING", "PENDING", "CONFIGURING"):
                    self._ended.add(job.job_id)
                    states.append(f"Slurm job {job.job_id} {token.split('=', 1)[1]}")
        return "; ".join(states) or None

    async def close(self) -> None:
        for job in self.sized:
            try:
                await job.close()
            except Exception:
                pass
        if self.cluster is not None:
            try:
                await self.cluster.close(timeout=20)
            except Exception:
                pass
