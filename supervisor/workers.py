"""Worker tracking: the one owner of every worker's state.

Each worker is a ``WorkerRecord``; every change of its state goes through ``WorkerTable._to``,
which checks the transition against ``_ALLOWED`` and emits the event that says why. The table
tells the backend what to do to a worker (pause, resume, kill, stop, assign) right after the
state change that calls for it; it never reads /proc (readings are handed to ``observe``) and
decides nothing about memory (the policy does).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Callable

from supervisor.backend import Backend, JobSpec, WorkerExited, WorkerLoaded, WorkerReady, signal_name
from supervisor.policy import WorkerView


class WorkerState(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    BUSY = "busy"
    PAUSED = "paused"
    STOPPING = "stopping"
    KILLED = "killed"
    EXITED = "exited"


_S = WorkerState
_ALLOWED: dict[WorkerState, frozenset[WorkerState]] = {
    _S.STARTING: frozenset({_S.READY, _S.STOPPING, _S.KILLED, _S.EXITED}),
    _S.READY: frozenset({_S.BUSY, _S.STOPPING, _S.KILLED, _S.EXITED}),
    _S.BUSY: frozenset({_S.READY, _S.PAUSED, _S.STOPPING, _S.KILLED, _S.EXITED}),
    _S.PAUSED: frozenset({_S.BUSY, _S.READY, _S.STOPPING, _S.KILLED, _S.EXITED}),
    _S.STOPPING: frozenset({_S.KILLED, _S.EXITED}),
    _S.KILLED: frozenset({_S.EXITED}),
    _S.EXITED: frozenset(),
}
MAX_BOOT_FAILURES = 3


class IllegalTransition(RuntimeError):
    pass


@dataclass(eq=False)
class WorkerRecord:
    id: str
    pid: int | None
    spawned_at: float
    state: WorkerState = WorkerState.STARTING
    ready_at: float | None = None
    loaded_private_mb: float | None = None  # private dirty memory once its model was loaded (probes to run)
    baseline_uss_mb: float | None = None
    baseline_rss_mb: float | None = None
    baseline_pss_mb: float | None = None
    calibration: list = field(default_factory=list)
    job: Any = None  # the FileJob being aligned
    job_id: str | None = None
    threads: int | None = None
    file_started_at: float | None = None
    paused_at: float | None = None
    idle_since: float | None = None
    last_heartbeat: float = 0.0
    progress: Any = None  # heartbeat fraction, or the worker's progress report (spans, growth)
    peak_uss_mb: float = 0.0
    uss_mb: float = 0.0
    held_mb: float = 0.0  # memory above READY the worker still held when its current file started
    pss_mb: float = 0.0
    rss_mb: float = 0.0
    kill_reason: str | None = None
    exit_reason: str | None = None
    by_us: bool = False  # stopped or killed because the run is ending (not the worker's failure)
    boot_failed: bool = False  # already counted as a boot failure

    @property
    def live(self) -> bool:
        return self.state not in (WorkerState.KILLED, WorkerState.EXITED)

    def growth_seen_mb(self, reported_peak_mb: float | None = None, reported_growth_mb: float | None = None) -> float:
        """Private growth on the current file: polled USS peak over the READY baseline, the
        worker's own peak RSS over its baseline RSS, or its own growth figure, whichever is most."""
        polled = self.peak_uss_mb - (self.baseline_uss_mb or 0.0)
        hwm = (reported_peak_mb - (self.baseline_rss_mb or 0.0)) if reported_peak_mb else 0.0
        return max(0.0, polled, hwm, reported_growth_mb or 0.0)


@dataclass(frozen=True)
class Exit:
    """What the table learned from a worker's exit, for the outcome and the halt decision."""

    record: WorkerRecord
    was: WorkerState
    job: Any
    boot_failure: bool


class WorkerTable:
    def __init__(self, backend: Backend, *, emit: Callable[..., None], clock: Callable[[], float]) -> None:
        self.backend = backend
        self.emit = emit
        self.clock = clock
        self.records: dict[str, WorkerRecord] = {}
        self.spawning: list[float] = []  # when each spawn still without a worker was asked for
        self.kills = 0
        self.pauses = 0
        self.boot_failures = 0
        self.last_boot_failure: str | None = None
        self.ready_once = False

    # -- the one place a state changes --------------------------------------------------------
    def _to(self, w: WorkerRecord, new: WorkerState, event: str | None = None, level: str = "info",
            **fields: Any) -> None:
        if new not in _ALLOWED[w.state]:
            raise IllegalTransition(f"worker {w.id}: {w.state.value} -> {new.value} is not allowed")
        w.state = new
        if event is not None:
            self.emit(event, level=level, worker=w.id, pid=w.pid, **fields)

    # -- reading -------------------------------------------------------------------------------
    def get(self, worker_id: str | None) -> WorkerRecord | None:
        return self.records.get(worker_id) if worker_id is not None else None

    def live(self) -> list[WorkerRecord]:
        return [w for w in self.records.values() if w.live]

    def present(self) -> list[WorkerRecord]:
        """Workers that still hold memory (a killed one holds it until it is reaped)."""
        return [w for w in self.records.values() if w.state is not WorkerState.EXITED]

    def running(self) -> list[WorkerRecord]:
        return [w for w in self.live() if w.job is not None]

    def views(self, remaining: Callable[[WorkerRecord], float]) -> tuple[WorkerView, ...]:
        """The policy's view; ``remaining`` gives a running file's corrected remaining growth."""
        out = [WorkerView(id=w.id, state=w.state.value, pss_mb=w.pss_mb, uss_mb=w.uss_mb,
                          baseline_uss_mb=w.baseline_uss_mb, loaded_private_mb=w.loaded_private_mb, file=w.job.rel if w.job else None,
                          growth_mb=max(w.job.estimate.growth_mb, w.held_mb)
                          if w.job is not None and w.job.estimate else 0.0,
                          remaining_mb=remaining(w) if w.job is not None else 0.0,
                          uncertain=bool(w.job is not None and w.job.estimate is not None
                                         and getattr(w.job.estimate, "uncertain", False)),
                          file_started_at=w.file_started_at, paused_at=w.paused_at, idle_since=w.idle_since)
               for w in self.present()]
        # A spawn asked for but not yet started is a starting worker to the policy.
        out += [WorkerView(id=f"spawning-{i}", state="starting", pss_mb=0.0, uss_mb=0.0)
                for i, _ in enumerate(self.spawning)]
        return tuple(out)

    # -- backend events -----------------------------------------------------------------------
    def spawn(self, reason: str, figures: dict) -> None:
        self.spawning.append(self.clock())
        self.backend.spawn()
        self.emit("worker_spawn_requested", level="debug", reason=reason, **figures)

    def spawned(self, worker_id: str, pid: int) -> WorkerRecord:
        if self.spawning:
            self.spawning.pop(0)
        now = self.clock()
        w = WorkerRecord(id=worker_id, pid=pid, spawned_at=now, last_heartbeat=now)
        self.records[worker_id] = w
        self.emit("worker_spawned", worker=w.id, pid=pid)
        return w

    def spawn_failed(self, reason: str) -> None:
        if self.spawning:
            self.spawning.pop(0)
        self._boot_failed(f"worker could not be started: {reason}")
        self.emit("worker_spawn_failed", level="error", reason=reason, boot_failures=self.boot_failures)

    def loaded(self, ev: WorkerLoaded) -> bool:
        """LOADED: the model is in memory and the probes run. What it reports of its private dirty
        memory (its own smaps reading: the supervisor's exact one waits for READY) tells the policy
        whether the next worker may start loading."""
        w = self.records.get(ev.worker_id)
        if (w is None or w.state is not WorkerState.STARTING or w.loaded_private_mb is not None
                or not ev.private_mb > 0):  # nothing known: the next worker waits for this one's READY
            return False
        w.loaded_private_mb = ev.private_mb
        self.emit("worker_loaded", worker=w.id, pid=w.pid, private_mb=round(w.loaded_private_mb, 1),
                  load_s=round(self.clock() - w.spawned_at, 3))
        return True

    def ready(self, ev: WorkerReady, mem: Any) -> WorkerRecord | None:
        """READY: the baseline is a real reading (``mem``, exact), else what the worker reported."""
        w = self.records.get(ev.worker_id)
        if w is None:  # a backend whose workers arrive by themselves (a cluster)
            w = self.spawned(ev.worker_id, ev.pid)
        if w.state is not WorkerState.STARTING:
            self.kill(w, "protocol error: READY twice")
            return None
        now = self.clock()
        mib = 2**20
        w.baseline_uss_mb = mem.uss / mib if mem else ev.baseline_mb
        w.baseline_pss_mb = mem.pss / mib if mem else (ev.pss_mb or ev.baseline_mb)
        w.baseline_rss_mb = mem.rss / mib if mem else (ev.rss_mb or ev.baseline_mb)
        w.uss_mb, w.pss_mb, w.rss_mb = w.baseline_uss_mb, w.baseline_pss_mb, w.baseline_rss_mb
        w.calibration = list(ev.calibration)
        w.ready_at = w.idle_since = w.last_heartbeat = now
        self.boot_failures = 0
        self._to(w, WorkerState.READY, "worker_ready", baseline_mb=round(w.baseline_uss_mb, 1),
                 baseline_pss_mb=round(w.baseline_pss_mb, 1), baseline_rss_mb=round(w.baseline_rss_mb, 1),
                 startup_s=round(now - w.spawned_at, 3), probes=len(w.calibration))
        return w

    def heartbeat(self, worker_id: str, progress: Any) -> None:
        w = self.records.get(worker_id)
        if w is not None:
            w.last_heartbeat = self.clock()
            if not isinstance(w.progress, dict):
                w.progress = progress

    def file_progress(self, worker_id: str, progress: dict) -> None:
        w = self.records.get(worker_id)
        if w is not None and w.job is not None:
            w.last_heartbeat = self.clock()
            w.progress = dict(progress)

    def observe(self, w: WorkerRecord, mem: Any) -> None:
        """A memory reading of the worker's process tree (bytes)."""
        mib = 2**20
        w.uss_mb, w.pss_mb, w.rss_mb = mem.uss / mib, mem.pss / mib, mem.rss / mib
        if w.job is not None:
            w.peak_uss_mb = max(w.peak_uss_mb, w.uss_mb)

    def exited(self, ev: WorkerExited) -> Exit | None:
        w = self.records.get(ev.worker_id)
        if w is None or w.state is WorkerState.EXITED:
            return None
        was = w.state
        w.exit_reason = w.exit_reason or ev.reason
        why = w.kill_reason or w.exit_reason
        quiet = ev.exitcode == 0 or w.kill_reason or was is WorkerState.STOPPING
        self._to(w, WorkerState.EXITED, "worker_exited", level="info" if quiet else "warning", exitcode=ev.exitcode,
                 signal=signal_name(ev.signal), state=was.value, reason=why)
        boot = w.ready_at is None and not w.by_us
        if boot and not w.boot_failed:
            cause = ev.reason or w.kill_reason or (
                f"killed by {signal_name(ev.signal)}" if ev.signal else f"exit code {ev.exitcode}")
            self._boot_failed(cause, fatal=ev.exitcode == 3)
        job = self.release(w) if w.job is not None else None
        return Exit(record=w, was=was, job=job, boot_failure=boot)

    def _boot_failed(self, cause: str, fatal: bool = False) -> None:
        self.boot_failures = MAX_BOOT_FAILURES if fatal else self.boot_failures + 1
        self.last_boot_failure = cause

    # -- commands ------------------------------------------------------------------------------
    def assign(self, w: WorkerRecord, job: Any, spec: JobSpec, **fields: Any) -> None:
        now = self.clock()
        w.job, w.job_id, w.threads = job, spec.job_id, spec.options.get("threads")
        w.file_started_at, w.idle_since, w.last_heartbeat, w.progress = now, None, now, None
        # What earlier files left in the heap (``release``) is this file's to reuse, and its floor:
        # a file that needs less still peaks there, so its peak is the larger of the two.
        growth = spec.predicted_growth_mb or 0.0
        if w.held_mb > growth and fields.get("predicted_mb") is not None:
            fields["predicted_mb"] = round(fields["predicted_mb"] + w.held_mb - growth, 1)
        if w.held_mb >= 1.0:
            fields["held_mb"] = round(w.held_mb, 1)
        # The last reading may predate the previous file's release: start from the baseline.
        w.peak_uss_mb = w.baseline_uss_mb or 0.0
        self._to(w, WorkerState.BUSY, "file_admitted", file=job.rel, threads=w.threads, **fields)
        self.backend.assign(w.id, spec)

    def release(self, w: WorkerRecord, rss_after_mb: float | None = None) -> Any:
        """The worker's file is over (done, failed, or its worker gone): it takes no job any more
        and, if it was paused as the file ended, it is continued so that it can take the next.
        ``rss_after_mb``: what the worker still holds once it released the file (unknown: nothing)."""
        job = w.job
        base = w.baseline_rss_mb
        w.held_mb = max(0.0, rss_after_mb - base) if rss_after_mb is not None and base is not None else 0.0
        if rss_after_mb is not None and base is not None:
            # The last sample may be of the file's peak; what the worker says it holds after the
            # release is newer. Deciding at once on the stale peak would keep the next large file
            # out until the next tick (a file-sized gap in a chain of files too big to pair).
            w.rss_mb = min(w.rss_mb, rss_after_mb)
            if w.baseline_uss_mb is not None:
                w.uss_mb = min(w.uss_mb, w.baseline_uss_mb + w.held_mb)
            if w.baseline_pss_mb is not None:
                w.pss_mb = min(w.pss_mb, w.baseline_pss_mb + w.held_mb)
        w.job = w.job_id = w.file_started_at = w.progress = w.threads = None
        w.paused_at = None
        if w.state is WorkerState.PAUSED:
            self.backend.signal(w.id, "resume")
        if w.state in (WorkerState.BUSY, WorkerState.PAUSED):
            self._to(w, WorkerState.READY)
            w.idle_since = self.clock()
        return job

    def pause(self, w: WorkerRecord, reason: str, figures: dict) -> None:
        self.pauses += 1
        w.paused_at = self.clock()
        self._to(w, WorkerState.PAUSED, "worker_paused", file=w.job.rel if w.job else None, reason=reason,
                 uss_mb=round(w.uss_mb, 1), **figures)
        self.backend.signal(w.id, "pause")

    def resume(self, w: WorkerRecord, reason: str, figures: dict) -> None:
        now = self.clock()
        paused_s = now - (w.paused_at or now)
        w.paused_at, w.last_heartbeat = None, now  # it could not heartbeat while stopped
        self._to(w, WorkerState.BUSY, "worker_resumed", file=w.job.rel if w.job else None, reason=reason,
                 paused_s=round(paused_s, 2), **{k: v for k, v in figures.items() if k != "paused_s"})
        self.backend.signal(w.id, "resume")

    def kill(self, w: WorkerRecord, reason: str, figures: dict | None = None, *, by_us: bool = False,
             **context: Any) -> None:
        if not w.live:
            return
        self.kills += 0 if by_us else 1
        w.kill_reason, w.by_us = reason, by_us
        if w.state is WorkerState.STARTING and not by_us:
            w.boot_failed = True  # counted now, so that no spawn goes out before the halt
            self._boot_failed(reason)
        predicted = w.job.estimate.peak_mb if w.job is not None and w.job.estimate else None
        # Ending the run is not a failure of the worker: said as a stop, not counted as a kill.
        self._to(w, WorkerState.KILLED, "worker_stopped" if by_us else "worker_killed",
                 level="info" if by_us else "warning", file=w.job.rel if w.job else None,
                 reason=reason, uss_mb=round(w.uss_mb, 1),
                 predicted_mb=round(predicted, 1) if predicted is not None else None, **context,
                 **{k: v for k, v in (figures or {}).items() if k not in ("uss_mb",) and k not in context})
        self.backend.signal(w.id, "kill")

    def stop(self, w: WorkerRecord, exit_reason: str, event: str | None = None, **fields: Any) -> None:
        if w.state in (WorkerState.STOPPING, WorkerState.KILLED, WorkerState.EXITED):
            return
        w.exit_reason, w.by_us = exit_reason, True
        self._to(w, WorkerState.STOPPING, event, **fields)
        self.backend.signal(w.id, "stop")

    def holder(self, worker_id: str, job_id: str | None, what: str) -> WorkerRecord | None:
        """The worker, if it holds the job it reports on; one that reports on another broke the
        protocol and is killed."""
        w = self.records.get(worker_id)
        if w is None:
            return None
        if w.job is None or (job_id is not None and job_id != w.job_id):
            self.kill(w, f"protocol error: {what} for a job it does not hold")
            return None
        return w

    def broken(self, worker_id: str, error: str) -> None:
        w = self.records.get(worker_id)
        if w is not None and w.live:
            self.emit("worker_protocol_error", level="error", worker=w.id, pid=w.pid, error=error)
            self.kill(w, f"protocol error: {error}")

    def file_started(self, worker_id: str) -> None:
        w = self.records.get(worker_id)
        if w is not None and w.job is not None:
            self.emit("file_started", worker=w.id, pid=w.pid, file=w.job.rel)

    def drain(self) -> None:
        """Stop what a drain no longer needs: workers still loading and idle ones."""
        for w in self.live():
            if w.state is WorkerState.STARTING:
                self.kill(w, "drain: not ready yet", by_us=True)
            elif w.job is None:
                self.stop(w, "draining")

    def end(self, reason: str, *, at_once: bool) -> None:
        """The run is over: idle workers are stopped, the rest (all of them ``at_once``) killed."""
        for w in self.live():
            if at_once or w.job is not None or w.state is WorkerState.STARTING:
                self.kill(w, reason, by_us=True)
            else:
                self.stop(w, "run finished")

    def kill_stragglers(self) -> None:
        for w in self.live():  # stopping ones included
            self.kill(w, "did not exit after shutdown", by_us=True)

    def halt_reason(self, engine: str, model: str) -> str | None:
        """Why the run must halt: workers that cannot start (None while fewer than the limit failed)."""
        if self.boot_failures < MAX_BOOT_FAILURES:
            return None
        return f"workers cannot start: engine {engine}, model {model}: {self.last_boot_failure}"

    # -- health --------------------------------------------------------------------------------
    def check_health(self, now: float, *, boot_timeout: float, heartbeat_timeout: float,
                     file_timeout: Callable[[Any], float]) -> None:
        """Kill the overdue workers and count the spawns that never produced one."""
        for w, reason in self.overdue(now, boot_timeout=boot_timeout, heartbeat_timeout=heartbeat_timeout,
                                      file_timeout=file_timeout):
            self.kill(w, reason)
        self.stale_spawns(now, boot_timeout)

    def overdue(self, now: float, *, boot_timeout: float, heartbeat_timeout: float,
                file_timeout: Callable[[Any], float]) -> list[tuple[WorkerRecord, str]]:
        """Workers to kill: not ready in time, silent too long, or past their file's timeout."""
        out = []
        for w in self.live():
            if w.state is WorkerState.STARTING and now - w.spawned_at > boot_timeout:
                out.append((w, f"not ready after {boot_timeout:.0f} s"))
            elif w.state in (WorkerState.READY, WorkerState.BUSY) and now - w.last_heartbeat > heartbeat_timeout:
                out.append((w, f"no heartbeat for {now - w.last_heartbeat:.0f} s"))
            elif w.state is WorkerState.BUSY and w.job is not None and w.file_started_at is not None:
                limit = file_timeout(w.job)
                if now - w.file_started_at > limit:
                    out.append((w, f"file timeout after {limit:.0f} s"))
        return out

    def stale_spawns(self, now: float, boot_timeout: float) -> int:
        """Spawns that never produced a worker within the boot timeout count as boot failures."""
        stale = [t for t in self.spawning if now - t > boot_timeout]
        for t in stale:
            self.spawning.remove(t)
            self._boot_failed(f"no worker process after {boot_timeout:.0f} s")
        return len(stale)
