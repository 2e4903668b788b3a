"""Estimates: the one owner of the predictor and of every file's lower bound.

A file's estimate comes from the predictor and the highest peak an attempt at it was killed at
(stored by earlier runs, or seen in this one). Learning goes through here too: a finished file
teaches the model only when the model really ran on it (``features_run`` not null). A running
file's remaining growth is corrected from its progress here, and only here.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from supervisor.policy import PendingView
from supervisor.queue import FileJob, FileState, WorkQueue, is_uncertain
from supervisor.settings import Settings
from telemetry.model import Defaults, Estimate, FileFeatures, MemoryModel, Predictor, remaining_growth
from telemetry.store import TelemetryStore

REESTIMATE_S = 2.0  # re-estimating a whole large queue: at most this often, not per finished file
HEAD = 256  # the files the policy looks at next are re-estimated at once after the model learned


def cold_defaults(s: Settings) -> Defaults:
    eng = s.engine_settings
    return Defaults(baseline_mb=eng.cold_baseline_mb, intercept_mb=eng.cold_intercept_mb,
                    mb_per_span_second=eng.cold_mb_per_span_second,
                    mb_per_audio_second=eng.cold_mb_per_audio_second, mb_per_media_mb=eng.cold_mb_per_media_mb)


def model_key(s: Settings) -> str:
    """The learned model's key beside engine and device: the model, its dtype unless fp32, and the
    synthetic engine's profile (different shapes must never share one model)."""
    key = s.model_id
    if s.run.dtype and s.run.dtype != "fp32":
        key += f"@{s.run.dtype}"
    profile = getattr(s.engine_settings, "profile", "total")
    if s.engine_name == "synthetic" and profile != "total":
        key += f"/{profile}"
    return key


def make_predictor(s: Settings, store: TelemetryStore | None) -> Predictor:
    """The learned model of the running key (else the cold defaults) and the learned baseline."""
    eng = s.engine_settings
    kw = dict(quantile=s.memory.quantile, margin=s.memory.margin, min_samples=s.memory.min_samples)
    params = store.load_model(s.engine_name, model_key(s), s.run.device) if store else None
    model = MemoryModel.from_params(params, cold_defaults(s), **kw) if params else MemoryModel(cold_defaults(s), **kw)
    # PSS at READY: what a worker is charged, and close to its whole cost when it runs alone.
    learned = store.baseline(s.engine_name, s.model_id, s.run.device, measure="pss") if store else None
    return Predictor(model, learned if learned is not None else eng.cold_baseline_mb,
                     baseline_measured=learned is not None)


class Estimator:
    def __init__(self, predictor: Predictor, queue: WorkQueue, *, stored_bounds: dict[str, float] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.predictor = predictor
        self.queue = queue
        self.stored_bounds = stored_bounds or {}
        self.clock = clock
        self._changed = self._head_stale = False
        self._refit_at = -1e9
        self._views: tuple[int, int, tuple[PendingView, ...]] | None = None

    def estimate(self, job: FileJob) -> Estimate:
        stored = self.stored_bounds.get(job.info.input_hash)
        if stored is not None:
            job.lower_bound_mb = max(job.lower_bound_mb or 0.0, stored)
        job.estimate = self.predictor.estimate(self.features(job), job.lower_bound_mb)
        self.queue.touch()
        return job.estimate

    @staticmethod
    def features(job: FileJob) -> FileFeatures:
        """The file's planned features (intake plans them off the loop), else its size alone."""
        if job.features is None:
            job.features = FileFeatures(audio_s=job.info.audio_seconds, media_mb=job.info.media_mb)
        return job.features

    def probe_growth_mb(self, span_s: float) -> float | None:
        """What a starting worker may grow by while it runs its READY probes (the longest is one
        span at the cap), or None while nothing has measured probes: cold, the probes are what
        measure it. Once a worker has measured them (in this run or an earlier one), the model's
        figure for that span is its own measurement, even while it is unsure of real files."""
        if not self.predictor.model.n_probes:
            return None
        return self._probe_estimate(span_s).growth_mb

    def _probe_estimate(self, span_s: float) -> Estimate:
        return self.predictor.estimate(FileFeatures(audio_s=span_s, longest_span_s=span_s, n_spans=1, windows=0))

    def probes_learned(self, span_s: float) -> bool:
        """The learned model already holds probe spans and enough real files, and is certain of a
        cap-length span: workers need not measure their probes again (they still warm up). A
        certain estimate is a fitted one from at least ``min_samples`` files."""
        return bool(self.predictor.model.n_probes) and not self._probe_estimate(span_s).uncertain

    def killed_at(self, job: FileJob, peak_mb: float, growth_mb: float | None) -> None:
        """An attempt failed for memory at ``peak_mb``: the file needs more than that, and the model
        learns that files like it grow past ``growth_mb`` (a bound, not a sample)."""
        job.lower_bound_mb = max(job.lower_bound_mb or 0.0, peak_mb)
        self.stored_bounds[job.info.input_hash] = job.lower_bound_mb
        if growth_mb is not None:
            self.predictor.observe_kill(self.features(job), growth_mb)
            self._changed = self._head_stale = True

    def learn(self, job: FileJob, growth_mb: float, features_run: dict | None) -> bool:
        """A finished file is a memory sample only when the model ran on it (``features_run`` not
        null: those are the features of the work it did); True when it was one."""
        if features_run is None:
            return False
        before = self.predictor.model.version
        self.predictor.observe_growth(features_run or self.features(job), growth_mb)
        if self.predictor.model.version != before:  # else every estimate made stands as it is
            self._changed = self._head_stale = True
        return True

    def learn_baseline(self, pss_mb: float, calibration: list | None = None) -> None:
        """A worker is READY: its baseline, and the probe spans it measured on this hardware."""
        self.predictor.observe_baseline(pss_mb)
        if calibration and self.predictor.calibrate(calibration):
            self._changed = self._head_stale = True

    def remaining(self, job: FileJob | None, progress: Any, seen_mb: float) -> float:
        """What a running file may still grow by, corrected from its progress report."""
        if job is None or job.estimate is None:
            return 0.0
        return remaining_growth(job.estimate, progress if isinstance(progress, dict) else None, seen_mb)

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

    def pending_views(self, window: int) -> tuple[PendingView, ...]:
        """The policy's view of the next ``window`` pending files: their estimates (a cold guess
        has no central figure to weigh against the budget). Built again only after the queue
        changed: the loop asks for them several times per tick."""
        if self._views is not None and self._views[:2] == (self.queue.version, window):
            return self._views[2]
        views = tuple(PendingView(file=j.rel, peak_mb=j.estimate.peak_mb, growth_mb=j.estimate.growth_mb,
                                  central_peak_mb=j.estimate.central_mb if j.estimate.source != "cold" else 0.0,
                                  uncertain=is_uncertain(j.estimate))
                      for j in self.queue.pending()[:window] if j.estimate is not None)
        self._views = (self.queue.version, window, views)
        return views

    @property
    def baseline_mb(self) -> float:
        return self.predictor.baseline_mb

    def params(self) -> dict[str, Any]:
        return self.predictor.model.params()

