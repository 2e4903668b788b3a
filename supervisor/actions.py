"""Carrying out the policy's decisions, each through the part that owns what it changes.

The policy decides on a snapshot; by the time a decision is carried out the worker or the file
may have moved on (a result arrived in between), so each action checks that its target is still
in the state the decision assumed and otherwise does nothing. Admitting a file is the one action
that touches two owners: the queue starts the file, the worker table hands it to the worker.
"""

from __future__ import annotations

from typing import Any, Callable

from supervisor.backend import JobSpec
from supervisor.outcomes import Outcomes
from supervisor.policy import Act, Decision
from supervisor.queue import FileJob, FileState, WorkQueue, is_uncertain
from supervisor.workers import WorkerRecord, WorkerState, WorkerTable


def job_spec(job: FileJob, threads: int) -> JobSpec:
    info, est = job.info, job.estimate
    return JobSpec(file=job.rel, cha=str(info.path), media=str(info.media) if info.media else None,
                   out=str(info.out), options={"threads": threads}, attempt=job.attempts,
                   predicted_peak_mb=est.peak_mb, predicted_growth_mb=est.growth_mb,
                   job_id=f"{job.rel}#{job.attempts}")


class Actions:
    def __init__(self, *, workers: WorkerTable, queue: WorkQueue, outcomes: Outcomes, cores: int,
                 fixed_threads: int | None, budget_mb: Callable[[], float],
                 admit_fields: Callable[[str], dict] = lambda rel: {}) -> None:
        self.workers = workers
        self.admit_fields = admit_fields  # what else an admission says (a CUDA run's VRAM estimate)
        self.queue = queue
        self.outcomes = outcomes
        self.cores = cores
        self.fixed_threads = fixed_threads
        self.budget_mb = budget_mb
        self._by_act: dict[Act, Callable[[Decision, Any], None]] = {
            Act.SPAWN: self._spawn, Act.ADMIT: self._admit, Act.PAUSE: self._pause, Act.RESUME: self._resume,
            Act.KILL: self._kill, Act.RETIRE: self._retire, Act.REJECT: self._reject}

    def apply(self, d: Decision) -> None:
        w = self.workers.get(d.worker) if isinstance(d.worker, str) else None
        self._by_act[d.act](d, w)

    def threads(self) -> int:
        """Torch threads for a file starting now: the cores shared by the files that will run."""
        return self.fixed_threads or max(1, self.cores // (len(self.workers.running()) + 1))

    def _spawn(self, d: Decision, _w: None) -> None:
        self.workers.spawn(d.reason, d.figures)

    def _pending(self, d: Decision) -> FileJob | None:
        job = self.queue.get(d.file)
        return job if job is not None and job.state is FileState.PENDING else None

    def _admit(self, d: Decision, w: WorkerRecord | None) -> None:
        job = self._pending(d)
        if w is None or w.state is not WorkerState.READY or job is None:
            return
        threads = self.threads()
        self.queue.start(job, w.id)  # counts the attempt the spec names
        spec = job_spec(job, threads)
        self.outcomes.started(job)
        est = job.estimate
        self.workers.assign(w, job, spec, **self.admit_fields(job.rel), predicted_mb=round(est.peak_mb, 1),
                            predicted_growth_mb=round(est.growth_mb, 1), estimate_source=est.source,
                            estimate_uncertain=is_uncertain(est), audio_seconds=job.info.audio_seconds,
                            attempt=job.attempts, reason=d.reason, committed_mb=d.figures.get("committed_mb"),
                            budget_mb=round(self.budget_mb(), 1))

    def _pause(self, d: Decision, w: WorkerRecord | None) -> None:
        if w is not None and w.state is WorkerState.BUSY:
            self.workers.pause(w, d.reason, d.figures)

    def _resume(self, d: Decision, w: WorkerRecord | None) -> None:
        if w is not None and w.state is WorkerState.PAUSED:
            self.workers.resume(w, d.reason, d.figures)

    def _kill(self, d: Decision, w: WorkerRecord | None) -> None:
        if w is not None and w.live:
            self.workers.kill(w, d.reason, d.figures, budget_mb=round(self.budget_mb(), 1))

    def _retire(self, d: Decision, w: WorkerRecord | None) -> None:
        if w is not None and w.state is WorkerState.READY:
            self.workers.stop(w, f"retired: {d.reason}", "worker_retired", uss_mb=round(w.uss_mb, 1),
                              reason=d.reason)

    def _reject(self, d: Decision, _w: Any) -> None:
        job = self._pending(d)
        if job is not None:
            self.outcomes.reject(job, d.reason)
