"""Where every file stands: pending, running, done, failed or quarantined, with its attempts.

The queue knows nothing about processes or memory readings; it holds each file's latest estimate
(which a cluster backend could turn into a per-task memory request) and decides, from the attempt
count, whether a failure means "try again" or "quarantine".
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from supervisor.corpus import FileInfo
from telemetry.model import Estimate


class FileState(enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"  # failed for good at once (bad input, missing media, cannot fit)
    QUARANTINED = "quarantined"  # failed max_attempts times
    SKIPPED = "skipped"  # already done by an earlier run


@dataclass
class FileJob:
    info: FileInfo
    state: FileState = FileState.PENDING
    attempts: int = 0
    estimate: Estimate | None = None
    lower_bound_mb: float | None = None  # peak (MiB, baseline included) an attempt was killed at
    failures: list[str] = field(default_factory=list)
    last_peak_mb: float | None = None
    worker: int | None = None
    seq: int = 0  # discovery order; ties in scheduling order
    features: Any = None  # telemetry.model.FileFeatures from the file's plan

    @property
    def rel(self) -> str:
        return self.info.rel

    @property
    def reason(self) -> str | None:
        return self.failures[-1] if self.failures else None


class WorkQueue:
    """Files by state. Pending files are served largest predicted peak first (longest work first
    keeps the makespan short and lets big files start while memory is still free)."""

    def __init__(self, max_attempts: int) -> None:
        self.max_attempts = max_attempts
        self.jobs: dict[str, FileJob] = {}
        self._order: list[FileJob] | None = None  # pending, sorted; rebuilt after a change

    def touch(self) -> None:
        """Something that orders pending files changed (a state, an estimate): sort again."""
        self._order = None

    def add(self, info: FileInfo, state: FileState = FileState.PENDING) -> FileJob:
        job = FileJob(info=info, state=state, seq=len(self.jobs))
        self.jobs[info.rel] = job
        self._order = None
        return job

    def __iter__(self) -> Iterator[FileJob]:
        return iter(self.jobs.values())

    def __len__(self) -> int:
        return len(self.jobs)

    def get(self, rel: str) -> FileJob | None:
        return self.jobs.get(rel)

    def pending(self) -> list[FileJob]:
        """Pending files in run order. Cached: the supervisor asks several times a second."""
        if self._order is None:
            jobs = [j for j in self.jobs.values() if j.state is FileState.PENDING]
            jobs.sort(key=lambda j: (-(j.estimate.peak_mb if j.estimate else 0.0), j.seq))
            self._order = jobs
        return list(self._order)

    def in_state(self, *states: FileState) -> list[FileJob]:
        return [j for j in self.jobs.values() if j.state in states]

    def counts(self) -> dict[str, int]:
        out = {s.value: 0 for s in FileState}
        for j in self.jobs.values():
            out[j.state.value] += 1
        out["total"] = len(self.jobs)
        return out

    @property
    def unfinished(self) -> bool:
        return any(j.state in (FileState.PENDING, FileState.RUNNING) for j in self.jobs.values())

    def start(self, job: FileJob, worker: int) -> None:
        if job.state is not FileState.PENDING:
            raise ValueError(f"{job.rel}: cannot start a file that is {job.state.value}")
        job.state = FileState.RUNNING
        job.worker = worker
        job.attempts += 1
        self._order = None

    def finish(self, job: FileJob, peak_mb: float | None) -> None:
        job.state = FileState.DONE
        job.worker = None
        job.last_peak_mb = peak_mb

    def fail(self, job: FileJob, reason: str, *, retry: bool, observed_mb: float | None = None,
             lower_bound_mb: float | None = None) -> FileState:
        """Record a failed attempt; retryable failures requeue until ``max_attempts``."""
        job.failures.append(reason)
        job.worker = None
        self._order = None
        if observed_mb is not None:
            job.last_peak_mb = observed_mb
        if lower_bound_mb is not None:
            job.lower_bound_mb = max(job.lower_bound_mb or 0.0, lower_bound_mb)
        if not retry:
            job.state = FileState.FAILED
        elif job.attempts >= self.max_attempts:
            job.state = FileState.QUARANTINED
        else:
            job.state = FileState.PENDING
        return job.state

    def requeue(self, job: FileJob, reason: str) -> None:
        """Put a running file back without counting the attempt (drain, supervisor stop)."""
        if job.state is FileState.RUNNING:
            job.attempts = max(0, job.attempts - 1)
            job.state = FileState.PENDING
            job.worker = None
            job.failures.append(reason)
            self._order = None

    def quarantine(self, job: FileJob, reason: str) -> None:
        job.failures.append(reason)
        job.state = FileState.QUARANTINED
        job.worker = None
        self._order = None

    def extend(self, infos: Iterable[FileInfo]) -> list[FileJob]:
        return [self.add(i) for i in infos]
