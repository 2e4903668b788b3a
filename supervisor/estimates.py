"""Estimates: the one owner of the predictor and of every file's lower bound.

A file's estimate comes from the predictor and the highest peak an attempt at it was killed at
(stored by earlier runs, or seen in this one). Learning goes through here too: a finished file
teaches the model only when the model really ran on it (``features_run`` not null). A running
file's remaining growth is corrected from its progress here, and only here.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from supervisor.queue import FileJob, FileState, WorkQueue
from telemetry import model as model_mod
from telemetry.model import Estimate, Predictor

REESTIMATE_S = 2.0  # re-estimating a whole large queue: at most this often, not per finished file
HEAD = 256  # the files the policy looks at next are re-estimated at once after the model learned


class Estimator:
    def __init__(self, predictor: Predictor, queue: WorkQueue, *, stored_bounds: dict[str, float] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.predictor = predictor
        self.queue = queue
        self.stored_bounds = stored_bounds or {}
        self.clock = clock
        self._changed = self._head_stale = False
        self._refit_at = -1e9

    def estimate(self, job: FileJob) -> Estimate:
        stored = self.stored_bounds.get(job.info.input_hash)
        if stored is not None:
            job.lower_bound_mb = max(job.lower_bound_mb or 0.0, stored)
        info = job.info
        job.estimate = self.predictor.estimate(info.audio_seconds, info.media_mb, job.lower_bound_mb)
        self.queue.touch()
        return job.estimate

    def killed_at(self, job: FileJob, peak_mb: float) -> None:
        """An attempt was killed for memory at ``peak_mb``: the file needs more than that."""
        job.lower_bound_mb = max(job.lower_bound_mb or 0.0, peak_mb)
        self.stored_bounds[job.info.input_hash] = job.lower_bound_mb

    def learn(self, job: FileJob, growth_mb: float, features_run: dict | None) -> bool:
        """A finished file is a memory sample only when the model ran on it; True when it was one."""
        if features_run is None:
            return False
        audio = features_run.get("audio_s", job.info.audio_seconds) if features_run else job.info.audio_seconds
        media = features_run.get("media_mb", job.info.media_mb) if features_run else job.info.media_mb
        self.predictor.observe_growth(audio, media, growth_mb)
        self._changed = self._head_stale = True
        return True

    def learn_baseline(self, pss_mb: float) -> None:
        self.predictor.observe_baseline(pss_mb)

    def refresh(self, now: float) -> None:
        """Re-estimate pending files after the model learned: the head of the queue at once (the
        next admission must not use a stale guess), the whole queue at most every ``REESTIMATE_S``."""
        if self._changed and now - self._refit_at >= REESTIMATE_S:
            self._changed = self._head_stale = False
            self._refit_at = now
            jobs = self.queue.in_state(FileState.PENDING)
        elif self._head_stale:
            self._head_stale = False  # the rest of the queue waits for its turn
            jobs = self.queue.pending()[:HEAD]
        else:
            return
        for job in jobs:
            self.estimate(job)

    @property
    def baseline_mb(self) -> float:
        return self.predictor.baseline_mb

    def params(self) -> dict[str, Any]:
        return self.predictor.model.params()


def remaining_growth(estimate: Estimate | None, progress: Any, seen_mb: float) -> float:
    """What a running file may still grow by, corrected from its progress.

    ``progress`` is the worker's progress report (``spans_done``/``spans_total``/``growth_mb``) or
    its heartbeat fraction. The model's own correction is used when it provides one. Otherwise a
    file still within its prediction may grow by the rest of it; one that has already grown past
    its whole prediction was under-predicted and is taken to keep growing at the rate seen over
    the work left (at most as much again as it grew so far: streaming engines peak early).
    """
    if estimate is None:
        return 0.0
    model_fn = getattr(model_mod, "remaining_growth", None)
    report = progress if isinstance(progress, dict) else None
    if model_fn is not None:
        return max(0.0, float(model_fn(estimate, report, seen_mb)))
    if report is not None:
        seen_mb = max(seen_mb, float(report.get("growth_mb") or 0.0))
        total = report.get("spans_total") or 0
        fraction = (report.get("spans_done") or 0) / total if total else None
    else:
        fraction = float(progress) if isinstance(progress, (int, float)) else None
    if seen_mb <= estimate.growth_mb:
        return estimate.growth_mb - seen_mb
    if fraction is None or not 0.0 < fraction < 1.0:
        return 0.25 * seen_mb if fraction is None else 0.0
    return min(seen_mb, seen_mb * (1.0 - fraction) / fraction)
