"""Outcomes: a result, an error or a worker's exit becomes one ``Outcome``, applied in one place.

``apply`` is the only code that moves a running file on (done, requeued, failed, quarantined),
and it does everything that follows from it: the queue, the predictor and lower bounds (through
the estimator), the manifest (through intake), the telemetry record (through the sink) and the
event that says what happened.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from supervisor.backend import NOT_RETRIED, FileError, FileResult, WorkerExited, signal_name
from supervisor.estimates import Estimator
from supervisor.intake import Intake
from supervisor.queue import FileJob, FileState, WorkQueue
from supervisor.sink import TelemetrySink
from supervisor.workers import WorkerRecord
from telemetry.store import Attempt

# Kill reasons that mean "this file needed more memory than it was given".
MEMORY_KILLS = ("over the guard", "host memory nearly exhausted")
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_HALTED, EXIT_INTERRUPTED = 0, 1, 2, 3, 4


@dataclass
class RunSummary:
    exit_code: int
    counts: dict[str, int]
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # (file, state, reason)
    halted: str | None = None


def exit_code(counts: dict[str, int], *, failed: bool, halted: bool, draining: bool, stopping: bool) -> int:
    left = counts["pending"] or counts["running"]
    if halted:
        return EXIT_HALTED
    if (draining or stopping) and left:
        return EXIT_INTERRUPTED  # asked to stop with files left: re-running finishes them
    if draining:
        return EXIT_OK  # a drain that left nothing undone (watch mode's stop): a success
    return EXIT_FAILED if failed or left else EXIT_OK


@dataclass(frozen=True)
class Outcome:
    job: FileJob
    worker: WorkerRecord | None
    outcome: str  # done | failed | killed | crashed | timeout | memory | stopped
    reason: str | None = None
    growth_mb: float | None = None
    peak_mb: float | None = None  # observed peak, baseline included
    retry: bool = True
    memory: bool = False  # a memory failure: the peak is a lower bound for the next attempt
    spared: bool = False  # killed for memory while within its own prediction: a bystander, not the cause
    result: FileResult | None = None
    kind: str | None = None  # the failure kind the event names (default: the outcome)
    extra: dict = field(default_factory=dict)  # more figures for its event (VRAM on a CUDA run)


class Outcomes:
    def __init__(self, *, queue: WorkQueue, estimator: Estimator, intake: Intake, sink: TelemetrySink,
                 emit: Callable[..., None], run_id: str, forget: Callable[[str], None]) -> None:
        self.queue = queue
        self.estimator = estimator
        self.intake = intake
        self.sink = sink
        self.emit = emit
        self.run_id = run_id
        self.forget = forget
        self.audio_done_s = 0.0
        self._started_wall: dict[str, float] = {}

    def summary(self, *, halted: str | None, draining: bool, stopping: bool,
                **figures: Any) -> tuple[RunSummary, dict[str, Any]]:
        """What the run came to: its exit status and the ``run_finished`` figures."""
        c = self.queue.counts()
        failures = [(j.rel, j.state.value, j.reason or "")
                    for j in self.queue.in_state(FileState.FAILED, FileState.QUARANTINED)]
        code = exit_code(c, failed=bool(failures), halted=bool(halted), draining=draining, stopping=stopping)
        summary = {"done": c["done"], "failed": c["failed"], "quarantined": c["quarantined"], "skipped": c["skipped"],
                   "pending": c["pending"], **figures, "audio_seconds": round(self.audio_done_s, 1),
                   "exit_code": code, "halted": halted, "drained": draining,
                   "telemetry": "unavailable" if self.sink.failed else "ok"}
        return RunSummary(exit_code=code, counts=c, failures=failures, halted=halted), summary

    def started(self, job: FileJob) -> None:
        self._started_wall[job.rel] = time.time()

    # -- building outcomes ---------------------------------------------------------------------
    @staticmethod
    def _peak(w: WorkerRecord, growth: float) -> float:
        return (w.baseline_pss_mb or 0.0) + growth

    def from_result(self, w: WorkerRecord, job: FileJob, ev: FileResult) -> Outcome:
        growth = w.growth_seen_mb(ev.peak_mb, ev.growth_mb)
        return Outcome(job, w, "done", growth_mb=growth, peak_mb=self._peak(w, growth), result=ev)

    def from_error(self, w: WorkerRecord, job: FileJob, ev: FileError) -> Outcome:
        growth = w.growth_seen_mb()
        if ev.kind == "memory":
            return Outcome(job, w, "memory", f"out of memory: {ev.reason}", growth, self._peak(w, growth),
                           memory=True, kind="memory")
        return Outcome(job, w, "failed", ev.reason, growth, self._peak(w, growth),
                       retry=ev.kind not in NOT_RETRIED, kind=ev.kind)

    def from_exit(self, w: WorkerRecord, job: FileJob, ev: WorkerExited, stopping: bool) -> Outcome:
        growth = w.growth_seen_mb()
        peak = self._peak(w, growth)
        killed = w.kill_reason
        if stopping or w.by_us:
            return Outcome(job, w, "stopped", killed or "supervisor stopping", growth, peak)
        if killed in MEMORY_KILLS:
            # The guard takes the newest file when no file has outgrown its prediction: memory ran
            # short for the others' sake (another user, another supervisor), not because of this file.
            bystander = job.estimate is not None and growth <= job.estimate.growth_mb
            return Outcome(job, w, "killed", f"killed: {killed} at {peak:.0f} MiB", growth, peak,
                           memory=not bystander, spared=bystander)
        if killed:
            timeout = "heartbeat" in killed or "timeout" in killed
            return Outcome(job, w, "timeout" if timeout else "killed", f"killed: {killed}", growth, peak)
        how = f"signal {signal_name(ev.signal)}" if ev.signal else f"exit code {ev.exitcode}"
        # A SIGKILL from outside (the kernel's OOM killer, most often) is a memory failure too.
        return Outcome(job, w, "crashed", f"worker died ({how})", growth, peak, memory=ev.signal == 9)

    # -- the one place a running file moves on -------------------------------------------------------
    def apply(self, o: Outcome) -> FileState:
        job, w = o.job, o.worker
        wf = {"worker": w.id, "pid": w.pid} if w is not None else {}
        if o.outcome == "stopped":
            self.queue.requeue(job, o.reason or "supervisor stopping")
            self._record(o, "killed")
            return job.state
        if o.outcome == "done":
            return self._done(o, wf)
        if o.spared and job.spared < self.queue.max_attempts:
            return self._spare(o)
        if o.memory and o.peak_mb is not None:
            self.estimator.killed_at(job, o.peak_mb, o.growth_mb)
            self.sink.lower_bound(job.info.input_hash, o.peak_mb)
        state = self.queue.fail(job, o.reason or "failed", retry=o.retry, observed_mb=o.peak_mb)
        self._record(o, "failed" if o.outcome == "memory" else o.outcome)
        self.emit("file_failed", level="warning", **wf, file=job.rel, reason=o.reason,
                  kind=o.kind or ("memory" if o.memory else o.outcome), attempt=job.attempts, **o.extra)
        self._after_failure(job, state, o.reason or "", for_good=o.kind != "output")
        return state

    def _spare(self, o: Outcome) -> FileState:
        """A bystander's kill costs no attempt and teaches no bound, up to ``max_attempts`` times,
        so pressure from outside cannot quarantine a file that never outgrew its prediction."""
        job = o.job
        job.spared += 1
        self.queue.requeue(job, o.reason or "killed", observed_mb=o.peak_mb)
        self._record(o, "killed")
        self._after_failure(job, job.state, o.reason or "", for_good=False, spared=job.spared)
        return job.state

    def _done(self, o: Outcome, wf: dict) -> FileState:
        job, ev = o.job, o.result
        info = job.info
        if info.audio_seconds is None and ev.audio_seconds:
            info.audio_seconds = float(ev.audio_seconds)
        self.queue.finish(job, o.peak_mb)
        self.audio_done_s += float(ev.audio_seconds or info.audio_seconds or 0.0)
        sample = self.estimator.learn(job, o.growth_mb or 0.0, ev.features_run)
        self._record(o, "done", sample=sample)
        est = job.estimate
        fields = dict(**wf, file=info.rel, peak_mb=round(o.peak_mb or 0.0, 1), growth_mb=round(o.growth_mb or 0.0, 1),
                      predicted_mb=round(est.peak_mb, 1) if est else None,
                      predicted_growth_mb=round(est.growth_mb, 1) if est else None, audio_seconds=info.audio_seconds,
                      wall_s=ev.wall_s, cpu_s=ev.cpu_s, warnings=len(ev.warnings), stats=ev.stats, sample=sample,
                      **o.extra)

        def announce(recorded: bool) -> None:
            # Said once the manifest holds the file: "done" in the log means a re-run skips it.
            self.emit("file_done", **fields, **({} if recorded else {"recorded": False}))
            for line in ev.warnings[:20]:
                self.emit("file_warning", level="warning", file=info.rel, warning=line)

        self.intake.done(job, announce)
        return job.state

    def reject(self, job: FileJob, reason: str) -> None:
        """The policy found a file that cannot fit even alone."""
        if job.attempts:
            self.queue.quarantine(job, reason)
            self.emit("file_quarantined", level="warning", file=job.rel, reason=reason, attempts=job.attempts,
                      observed_mb=job.last_peak_mb and round(job.last_peak_mb, 1))
        else:
            self.queue.fail(job, reason, retry=False)
            self.emit("file_failed", level="warning", file=job.rel, reason=reason, kind="too_big", attempt=0)
        self.intake.failed_for_good(job)

    def _after_failure(self, job: FileJob, state: FileState, reason: str, for_good: bool = True,
                       **figures: Any) -> None:
        if state is FileState.PENDING:
            self.forget(job.rel)
            est = self.estimator.estimate(job)
            self.emit("file_requeued", file=job.rel, reason=reason, attempt=job.attempts,
                      estimate_mb=round(est.peak_mb, 1), observed_mb=job.last_peak_mb and round(job.last_peak_mb, 1),
                      **figures)
            return
        if state is FileState.QUARANTINED:
            self.emit("file_quarantined", level="warning", file=job.rel, reason=reason, attempts=job.attempts,
                      observed_mb=job.last_peak_mb and round(job.last_peak_mb, 1))
            self._record(Outcome(job, None, "quarantined", reason, peak_mb=job.last_peak_mb), "quarantined")
        if for_good:  # an output that could not be written is tried again once there is room
            self.intake.failed_for_good(job)

    def _record(self, o: Outcome, outcome: str, sample: bool = True) -> None:
        job, w, ev = o.job, o.worker, o.result
        info, e, now = job.info, self.sink.key, time.time()
        started = self._started_wall.pop(job.rel, now) if w is not None else now
        self.sink.attempt(Attempt(
            run_id=self.run_id, file=info.rel, path=str(info.path), input_hash=info.input_hash, engine=e[0],
            model=e[1], device=e[2], audio_seconds=(ev.audio_seconds if ev and ev.audio_seconds else info.audio_seconds),
            media_bytes=info.media_bytes, transcript_bytes=info.transcript_bytes,
            worker_baseline_mb=w.baseline_pss_mb if w else None, peak_mb=o.peak_mb,
            # Not a sample (answered from the cache, or the model never ran): no growth to learn from.
            growth_mb=o.growth_mb if sample and w is not None else None,
            predicted_mb=job.estimate.peak_mb if job.estimate else None, wall_s=ev.wall_s if ev else None,
            cpu_s=ev.cpu_s if ev else None, outcome=outcome, reason=o.reason, worker_pid=w.pid if w else None,
            started_at=started, finished_at=now))

