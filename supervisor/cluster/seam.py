"""The backend seam's records (``Backend``, ``JobSpec``, ``BackendEvent``s), as the run core and the
backends agree on them: a backend is told which file to run and reports what happened, nothing more.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Protocol


@dataclass(frozen=True)
class JobSpec:
    file: str  # relative path: the run's key for the file
    cha: str
    media: str | None
    out: str
    options: dict[str, Any]
    attempt: int
    predicted_peak_mb: float
    predicted_growth_mb: float


@dataclass(frozen=True)
class WorkerReady:
    worker_id: str
    pid: int | None
    baseline_mb: float
    calibration: list = field(default_factory=list)
    host: str | None = None


@dataclass(frozen=True)
class FileStarted:
    worker_id: str
    file: str
    pid: int | None = None


@dataclass(frozen=True)
class FileProgress:
    worker_id: str
    file: str
    progress: dict


@dataclass(frozen=True)
class FileResult:
    worker_id: str
    file: str
    peak_mb: float
    growth_mb: float
    wall_s: float | None
    cpu_s: float | None
    features_run: dict | None
    warnings: list
    output: str
    pid: int | None = None
    baseline_mb: float | None = None
    audio_seconds: float | None = None
    stats: dict | None = None


@dataclass(frozen=True)
class FileError:
    worker_id: str | None
    file: str
    reason: str
    kind: str  # "bad_input" | "memory" | "crash" | "timeout" | "lost"
    pid: int | None = None
    observed_mb: float | None = None  # a lower bound on the peak when the attempt was cut short
    baseline_mb: float | None = None


@dataclass(frozen=True)
class WorkerExited:
    worker_id: str
    pid: int | None
    exitcode: int | None
    signal: str | None
    reason: str


BackendEvent = WorkerReady | FileStarted | FileProgress | FileResult | FileError | WorkerExited


class Backend(Protocol):
    name: str

    async def start(self) -> None: ...

    def spawn(self) -> None: ...

    def assign(self, worker_id: str | None, job: JobSpec) -> None: ...

    def signal(self, worker_id: str, action: str) -> None: ...

    def events(self) -> AsyncIterator[BackendEvent]: ...

    async def close(self) -> None: ...
