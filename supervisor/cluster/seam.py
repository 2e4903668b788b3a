"""The backend seam's events as the Dask backend tells them: the run core's own classes
(``supervisor.backend``), with what a cluster adds (the worker process's pid, the high-water mark
a lost attempt had reached, the baseline its growth counts from, the worker's host)."""

from __future__ import annotations

from dataclasses import dataclass

from supervisor.backend import FileError, FileResult, FileStarted, WorkerReady


@dataclass(frozen=True)
class ClusterWorkerReady(WorkerReady):
    host: str | None = None


@dataclass(frozen=True)
class ClusterFileStarted(FileStarted):
    pid: int | None = None


@dataclass(frozen=True)
class ClusterFileResult(FileResult):
    pid: int | None = None
    baseline_mb: float | None = None  # the worker's READY RSS, which growth_mb counts from


@dataclass(frozen=True)
class ClusterFileError(FileError):
    pid: int | None = None
    observed_mb: float | None = None  # a lower bound on the peak when the attempt was cut short
    baseline_mb: float | None = None
    bystander: bool = False  # queued on a worker that died under another file: no attempt of it ran
