"""What every engine offers the worker loop: load once, then run one job at a time."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

Progress = Callable[[float], None]


def report_spans(progress: Progress, done: int, total: int) -> None:
    """Tell the worker loop how many of a file's spans are done, if it listens (it then sends a
    ``progress`` message with the growth so far: the supervisor corrects a hot file from it)."""
    spans = getattr(progress, "spans", None)
    if spans is not None:
        spans(done, total)


@dataclass(frozen=True)
class Job:
    """One file to align, as the supervisor sent it (see ``worker.protocol.JOB``)."""

    job: str
    input: Path
    output: Path
    media: Path | None
    rel: str
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_message(cls, msg: dict[str, Any]) -> "Job":
        return cls(
            job=str(msg["job"]),
            input=Path(msg["input"]),
            output=Path(msg["output"]),
            media=Path(msg["media"]) if msg.get("media") else None,
            rel=str(msg.get("rel") or msg["input"]),
            options=dict(msg.get("options") or {}),
        )


@dataclass
class JobResult:
    """``features_run``: the ``FileFeatures`` dict of the work the model really did, or None when
    nothing ran through it (every span answered by the result cache): only real work teaches."""

    output: Path
    audio_seconds: float | None
    stats: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    features_run: dict[str, Any] | None = None


class JobError(Exception):
    """A file that cannot be aligned. ``str()`` is one line naming the file (and line, if known).

    ``kind`` is ``input`` (bad CHAT), ``media`` (missing/unreadable audio), ``engine`` (the model
    failed on this file) or ``internal``. The worker stays usable after a JobError.
    """

    def __init__(self, message: str, kind: str = "input") -> None:
        super().__init__(message.replace("\n", " "))
        self.kind = kind


class BootError(Exception):
    """The engine cannot start (model missing, offline, wrong type): respawning will not help."""


class Engine(abc.ABC):
    """An alignment engine held by one worker for its whole life."""

    name: str = ""
    model: str = ""
    device: str = "cpu"
    # Whether a first, unmeasured pass changes what later files find (allocator pools, paged-in
    # weights, lazily built kernels): warm workers run one before READY so their baseline is the
    # one files meet. An engine whose buffers are freed whole has nothing to warm.
    warms_up: bool = True

    @abc.abstractmethod
    def run(self, job: Job, progress: Progress) -> JobResult:
        """Align ``job.input`` against ``job.media`` and write ``job.output`` atomically."""

    def release(self) -> None:
        """Give memory back between files (drop caches, collect, trim the heap)."""

    def probe(self, lengths: list[float]) -> list[dict[str, Any]]:
        """Growth measured on probe spans of these lengths at load (the READY ``calibration``).
        Engines built on a ``SpanAligner`` get this from the worker loop; others may override."""
        return []


class AlignerEngine(Engine):
    """An engine that hands each file to the shared driver (``worker.align.align_file``) with its
    one :class:`~worker.align.SpanAligner`; the real engines differ only in how they load it."""

    aligner: Any = None
    cache_dir: str | None = None

    def run(self, job: Job, progress: Progress) -> JobResult:
        from worker.align import align_file  # noqa: PLC0415 - worker.align imports this module

        return align_file(job, self.aligner, progress, cache=self.cache_dir)

    def release(self) -> None:
        from worker.engines.loading import release_memory  # noqa: PLC0415 - keeps torch out of base

        release_memory(self.device)
