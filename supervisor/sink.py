"""The telemetry sink: the only part that writes to the telemetry store during a run.

Writes go off the loop (one lane, in order). The store is a side job of the run: when it fails
(disk full, locked for too long, removed) the sink says so once, naming the store and the error,
and drops later writes; the predictor keeps learning in memory and alignment goes on.
"""

from __future__ import annotations

from typing import Any, Callable

from supervisor.sidejobs import SideJobs
from telemetry.store import Attempt, TelemetryStore

LANE = "store"


class TelemetrySink:
    def __init__(self, store: TelemetryStore | None, jobs: SideJobs, emit: Callable[..., None],
                 key: tuple[str, str, str], model_key: str | None = None) -> None:
        self.store = store
        self.model_key = model_key or key[1]  # the learned model's key (model, dtype, profile)
        self.jobs = jobs
        self.emit = emit
        self.key = key  # (engine, model, device) of the running engine: nothing is filed under another
        self.failed: str | None = None

    @property
    def path(self) -> str | None:
        return str(self.store.path) if self.store is not None else None

    def _submit(self, what: str, fn: Callable[..., Any], *args: Any) -> None:
        if self.store is None or self.failed is not None:
            return

        def guarded() -> None:
            if self.failed is None:
                fn(*args)

        self.jobs.submit(LANE, guarded, what=what, on_error=self._failed)

    def _failed(self, exc: BaseException) -> None:
        if self.failed is not None:
            return
        self.failed = f"{type(exc).__name__}: {exc}"
        self.emit("telemetry_unavailable", level="warning", store=self.path, error=self.failed,
                  effect="learning continues in memory for this run; alignment goes on")

    def start_run(self, run_id: str, corpus: str, settings: dict) -> None:
        e, m, d = self.key
        self._submit("start_run", lambda: self.store.start_run(run_id, corpus=corpus, engine=e, model=m, device=d,
                                                               settings=settings))

    def attempt(self, a: Attempt) -> None:
        self._submit("record_attempt", self.store.record_attempt if self.store else None, a)

    def baseline(self, uss_mb: float, rss_mb: float | None, pss_mb: float | None) -> None:
        self._submit("record_baseline", self.store.record_baseline if self.store else None, *self.key,
                     uss_mb, rss_mb, pss_mb)

    def lower_bound(self, input_hash: str, mb: float) -> None:
        self._submit("set_lower_bound", self.store.set_lower_bound if self.store else None, input_hash,
                     *self.key, mb)

    def finish(self, run_id: str, model_params: dict, summary: dict) -> None:
        e, _, d = self.key
        self._submit("save_model", self.store.save_model if self.store else None, e, self.model_key, d, model_params)
        self._submit("finish_run", self.store.finish_run if self.store else None, run_id, summary)
