"""The supervisor loop: wait for an event or the next tick -> sample -> decide -> act.

Modelled on gunicorn's arbiter: signal handlers only enqueue; one loop hands every event to the
part that owns what it changes; workers that cannot boot halt the run instead of being respawned
forever. The parts (see docs/DESIGN.md): intake (planning, watch mode, manifests), the worker
table, outcomes, the estimator (predictor, lower bounds), the telemetry sink and the publisher
(log, ledger, watchdog, status). The loop itself only senses (the sampler), asks the pure
``MemoryPolicy`` and routes its decisions; nothing on it blocks: the backend starts workers and
writes to them in tasks, and files, hashes, scans, the store and the ledger are side jobs.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import anyio

from supervisor.backend import (Backend, FileError, FileProgress, FileResult, FileStarted, JobSpec, LocalBackend,
                                SpawnFailed, WorkerBroken, WorkerExited, WorkerHeartbeat, WorkerLog, WorkerReady,
                                WorkerSpawned)
from supervisor.corpus import Candidate
from supervisor.estimates import Estimator
from supervisor.identity import output_identity
from supervisor.intake import Intake
from supervisor.outcomes import Outcomes
from supervisor.policy import Act, Bands, Decision, MemoryPolicy, PendingView, Snapshot, committed_mb, used_mb
from supervisor.pool import ZygoteLauncher, resolve_start_method, worker_command
from supervisor.publish import Publisher, memory_figures, status_header, status_of
from supervisor.queue import FileState, WorkQueue, is_uncertain
from supervisor.sampler import Limits, ProcSampler, Sampler, detect_limits
from supervisor.sd_notify import Notifier
from supervisor.settings import Settings, SettingsError, reload_settings
from supervisor.sidejobs import SideJobs
from supervisor.sink import TelemetrySink
from supervisor.workers import MAX_BOOT_FAILURES, WorkerRecord, WorkerState, WorkerTable
from telemetry.model import Defaults, FileFeatures, MemoryModel, Predictor
from telemetry.store import TelemetryStore
from worker.align import plan_features
from worker.engines.base import JobError

MiB = 2**20
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_HALTED, EXIT_INTERRUPTED = 0, 1, 2, 3, 4
# The policy fits files first-fit in queue order; the head of a large queue is enough to find one.
POLICY_WINDOW = 256
# What a SIGHUP may not change: the running engine's identity and what was set up at start.
RESTART_ONLY = ("run.engine", "run.model", "run.device", "run.dtype", "run.start_method", "run.state_dir",
                "run.telemetry", "run.log_json", "run.media_dir", "memory.ledger", "service.watch",
                "service.control_socket", "service.metrics_port", "service.metrics_host", "engine.")
SHUTDOWN_WAIT_S = 10.0
SIDE_JOBS_WAIT_S = 30.0


@dataclass
class RunSummary:
    exit_code: int
    counts: dict[str, int]
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # (file, state, reason)
    halted: str | None = None


def engine_options(s: Settings, workers: int) -> dict[str, Any]:
    """What the worker's engine needs at start; each file then gets the threads it can use now."""
    eng = s.engine_settings
    opts: dict[str, Any] = {k: v for k, v in vars(eng).items() if not k.startswith("cold_")}
    threads = eng.threads or max(1, (os.cpu_count() or 1) // max(1, workers))
    opts.update(model=s.model_location, device=s.run.device, dtype=s.run.dtype, threads=threads,
                cache_dir=str(s.state_dir / "cache"))
    return opts


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


def file_planner(s: Settings) -> Callable[[Any], FileFeatures]:
    """What the engine will hold for a file, from its plan (blocking: intake calls it off the loop)."""
    options = engine_options(s, 1)

    def plan(info: Any) -> FileFeatures:
        try:
            return plan_features(info.path, info.media, s.engine_name, options)
        except (JobError, OSError, ValueError):
            # The worker reports bad input with its line; until then, size alone.
            return FileFeatures(audio_s=info.audio_seconds, media_mb=info.media_mb)

    return plan


def make_predictor(s: Settings, store: TelemetryStore | None) -> Predictor:
    eng = s.engine_settings
    kw = dict(quantile=s.memory.quantile, margin=s.memory.margin, min_samples=s.memory.min_samples)
    params = store.load_model(s.engine_name, model_key(s), s.run.device) if store else None
    model = MemoryModel.from_params(params, cold_defaults(s), **kw) if params else MemoryModel(cold_defaults(s), **kw)
    # PSS at READY: what a worker is charged, and close to its whole cost when it runs alone.
    learned = store.baseline(s.engine_name, s.model_id, s.run.device, measure="pss") if store else None
    return Predictor(model, learned if learned is not None else eng.cold_baseline_mb,
                     baseline_measured=learned is not None)


def bands_from(s: Settings) -> Bands:
    m = s.memory
    return Bands(admit_below=m.admit_below, pause_above=m.pause_above, resume_below=m.resume_below,
                 kill_above=m.kill_above, psi_admit_below=m.psi_admit_below, psi_pause_above=m.psi_pause_above,
                 max_pause_s=m.max_pause, kill_settle_s=m.kill_settle, pause_cooldown_s=m.pause_cooldown)


def settings_diff(old: Settings, new: Settings) -> dict[str, list]:
    changed: dict[str, list] = {}
    for section in ("memory", "run", "service"):
        old_d, new_d = vars(getattr(old, section)), vars(getattr(new, section))
        changed.update({f"{section}.{k}": [old_d[k], new_d[k]] for k in old_d if old_d[k] != new_d[k]})
    for name in old.engine:
        old_d, new_d = vars(old.engine[name]), vars(new.engine.get(name, old.engine[name]))
        changed.update({f"engine.{name}.{k}": [old_d[k], new_d[k]] for k in old_d if old_d[k] != new_d.get(k)})
    return changed


def live_reload(current: Settings, new: Settings) -> tuple[Settings, dict[str, list], dict[str, list]]:
    """``new`` with every restart-only key kept at its running value, so that nothing is filed under
    a key that is not the running one; returns (settings, applied changes, refused changes)."""
    changed = settings_diff(current, new)
    refused = {k: v for k, v in changed.items() if k.startswith(RESTART_ONLY)}
    for key in refused:
        section, _, name = key.partition(".")
        if section == "engine":
            new.engine = current.engine
        else:
            setattr(getattr(new, section), name, getattr(getattr(current, section), name))
    return new, {k: v for k, v in changed.items() if k not in refused}, refused


class Supervisor:
    def __init__(self, settings: Settings, *, log: Any, sampler: Sampler | None = None,
                 clock: Callable[[], float] = time.monotonic, notifier: Notifier | None = None,
                 store: TelemetryStore | None = None, limits: Limits | None = None,
                 display: Any = None, reload_cli: dict | None = None, watcher: Any = None,
                 backend: Backend | None = None, listing: Any = None) -> None:
        self.s = settings
        self.log = log
        # Exact smaps reads walk page tables (~11 ms per GiB): ration them; status-based estimates
        # track anonymous growth in between.
        self.sampler = sampler or ProcSampler(exact_share=0.002, min_exact_interval=5.0)
        self.clock = clock
        self.notifier = notifier or Notifier()
        self.reload_cli = reload_cli or {}
        self.backend = backend
        self.run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
        self.limits = limits or detect_limits(budget=settings.memory.budget, reserve=settings.memory.reserve)
        self.key = (settings.engine_name, settings.model_id, settings.run.device)
        self.t0 = clock()
        self.wall0 = time.time()
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.draining = False
        self.drain_deadline: float | None = None
        self.stop_now = False
        self.halted: str | None = None
        self.host: Any = None
        self.host_error: str | None = None
        self.overhead_mb = 0.0
        self._overhead_at = -1e9
        self._capacity_changed = False

        self.queue = WorkQueue(settings.run.max_attempts)
        self.policy = MemoryPolicy(bands_from(settings))
        self.jobs = SideJobs(self.emit)
        self.estimator = Estimator(make_predictor(settings, store), self.queue,
                                   stored_bounds=store.lower_bounds(*self.key) if store else None, clock=clock)
        self.sink = TelemetrySink(store, self.jobs, self.emit, self.key, model_key(settings))
        self.intake = Intake(queue=self.queue, estimator=self.estimator, jobs=self.jobs, emit=self.emit,
                             forget=self.policy.forget, force=settings.force,
                             media_dir=Path(settings.run.media_dir) if settings.run.media_dir else None,
                             out_root=settings.out, in_place=settings.in_place, watcher=watcher, clock=clock,
                             listing=listing, identity=output_identity(settings), plan=file_planner(settings))
        self.outcomes = Outcomes(queue=self.queue, estimator=self.estimator, intake=self.intake, sink=self.sink,
                                 emit=self.emit, run_id=self.run_id, forget=self.policy.forget)
        self.publisher = Publisher(notifier=self.notifier, jobs=self.jobs, emit=self.emit, display=display)
        self.workers: WorkerTable | None = None

    # -- helpers -----------------------------------------------------------------------------------
    @property
    def budget_mb(self) -> float:
        return self.limits.budget / MiB

    @property
    def realigned(self) -> list[tuple[str, str]]:
        return self.intake.realigned

    @property
    def kills(self) -> int:
        return self.workers.kills if self.workers else 0

    @property
    def pauses(self) -> int:
        return self.workers.pauses if self.workers else 0

    def now(self) -> float:
        return self.clock()

    def emit(self, event: str, level: str = "info", **fields: Any) -> None:
        fields.setdefault("t", round(self.now() - self.t0, 3))
        getattr(self.log, level)(event, **fields)

    def plan(self, candidates: list[Candidate]) -> None:
        """Plan the whole corpus now (``--dry-run``)."""
        self.intake.plan_now(candidates)

    def add_status_hook(self, hook: Callable[[dict], None]) -> None:
        self.publisher.hooks = [*self.publisher.hooks, hook]

    # -- the run -------------------------------------------------------------------------------------
    async def run(self, candidates: list[Candidate]) -> RunSummary:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, self.inbox.put_nowait, ("signal", sig))
        self.emit("run_started", corpus=[str(p) for p in self.s.corpus], out=str(self.s.out) if self.s.out else None,
                  engine=self.key[0], model=self.key[1], device=self.key[2],
                  limit_mb=round(self.limits.limit / MiB, 1), budget_mb=round(self.budget_mb, 1),
                  reserve_mb=round(self.limits.reserve / MiB, 1), limit_source=self.limits.source,
                  files=len(candidates), max_workers=self.s.max_workers(), pid=os.getpid(),
                  supervisor_cpu_s=round(time.process_time(), 3))
        self.sink.start_run(self.run_id, ",".join(str(p) for p in self.s.corpus), self.s.to_dict())
        await anyio.to_thread.run_sync(self.publisher.open_ledger, self.s.memory.ledger,
                                       f"{os.getpid()}-{self.run_id}")
        if self.backend is None:
            self.backend = self._local_backend()
        self.workers = WorkerTable(self.backend, emit=self.emit, clock=self.clock)
        await self.backend.start()
        pump = asyncio.create_task(self._pump(), name="backend-events")
        self.intake.start_planning(candidates)
        try:
            await self._loop()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            await self._shutdown()
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)
        result, summary = self._finish()
        self.sink.finish(self.run_id, self.estimator.params(), summary)
        if not await self.jobs.drain(SIDE_JOBS_WAIT_S):
            self.emit("side_jobs_abandoned", level="warning", after_s=SIDE_JOBS_WAIT_S)
        await anyio.to_thread.run_sync(self.publisher.close_ledger)
        return result

    def _local_backend(self) -> LocalBackend:
        cmd = worker_command(self.key[0], engine_options(self.s, self.s.max_workers()))
        method = resolve_start_method(self.s.run.start_method, self.key[0])
        launcher = ZygoteLauncher(self.key[0]) if method == "zygote" else None
        return LocalBackend(cmd, launcher=launcher, clock=self.clock)

    async def _pump(self) -> None:
        async for ev in self.backend.events():
            self.inbox.put_nowait(ev)

    async def _loop(self) -> None:
        next_tick = self.now()
        while True:
            timeout = max(0.0, next_tick - self.now())
            try:
                ev = await asyncio.wait_for(self.inbox.get(), timeout)
            except asyncio.TimeoutError:
                ev = None
            if ev is not None:
                self._handle(ev)
                while not self.inbox.empty():
                    self._handle(self.inbox.get_nowait())
            if self.stop_now or self.halted:
                return
            now = self.now()
            if now >= next_tick:
                self._guarded("tick", self._tick, now)
                next_tick = now + self.s.memory.poll_interval
            elif self._capacity_changed:
                # A file finished or a worker became ready: decide now on the last readings rather
                # than leave a worker idle until the next tick. Stale readings only overstate use.
                self._guarded("decide", self._decide, now)
            if self._done():
                return

    def _guarded(self, what: str, fn: Callable[..., None], *args: Any, **context: Any) -> None:
        """One failing handler is logged with its context; the loop goes on."""
        try:
            fn(*args)
        except Exception as exc:
            self.emit("handler_failed", level="error", handler=what, error=f"{type(exc).__name__}: {exc}",
                      exc_info=True, **context)

    def _done(self) -> bool:
        if self.workers.running():
            return False
        if self.draining:
            return True
        if self.intake.watcher is not None or self.intake.planning:
            return False
        return not self.queue.in_state(FileState.PENDING, FileState.RUNNING)

    # -- events --------------------------------------------------------------------------------------
    def _handle(self, ev: Any) -> None:
        if isinstance(ev, tuple) and ev[0] == "signal":
            self._guarded("signal", self._on_signal, ev[1], signal=signal.Signals(ev[1]).name)
            return
        handler = self._HANDLERS.get(type(ev))
        if handler is None:
            self.emit("handler_failed", level="error", handler="dispatch", error=f"unknown event {ev!r}")
            return
        self._guarded(type(ev).__name__, handler, self, ev, worker=getattr(ev, "worker_id", None))

    def _on_spawned(self, ev: WorkerSpawned) -> None:
        self.workers.spawned(ev.worker_id, ev.pid)

    def _on_spawn_failed(self, ev: SpawnFailed) -> None:
        self.workers.spawn_failed(ev.reason)
        self._check_boot()

    def _on_ready(self, ev: WorkerReady) -> None:
        self._capacity_changed = True
        mem = self.sampler.tree(ev.pid, exact=True)  # a real smaps read, not an estimate
        w = self.workers.ready(ev, mem)
        if w is None:
            return
        self.estimator.learn_baseline(w.baseline_pss_mb, w.calibration)
        self.sink.baseline(w.baseline_uss_mb, w.baseline_rss_mb, w.baseline_pss_mb)
        if not self.workers.ready_once:
            self.workers.ready_once = True
            self.notifier.ready()
        if self.draining:
            self.workers.stop(w, "draining")

    def _on_heartbeat(self, ev: WorkerHeartbeat) -> None:
        self.workers.heartbeat(ev.worker_id, ev.progress)

    def _on_progress(self, ev: FileProgress) -> None:
        self.workers.file_progress(ev.worker_id, ev.progress)

    def _on_started(self, ev: FileStarted) -> None:
        w = self.workers.get(ev.worker_id)
        if w is not None and w.job is not None:
            self.emit("file_started", worker=w.id, pid=w.pid, file=w.job.rel)

    def _holder(self, worker_id: str, job_id: str | None, what: str) -> WorkerRecord | None:
        """The worker, if it holds the job it reports on; otherwise it broke the protocol."""
        w = self.workers.get(worker_id)
        if w is None:
            return None
        if w.job is None or (job_id is not None and job_id != w.job_id):
            self.workers.kill(w, f"protocol error: {what} for a job it does not hold")
            return None
        return w

    def _on_result(self, ev: FileResult) -> None:
        self._file_over(ev, "result", self.outcomes.from_result)

    def _on_error(self, ev: FileError) -> None:
        self._file_over(ev, "error", self.outcomes.from_error)

    def _file_over(self, ev: FileResult | FileError, what: str, outcome_of: Callable[..., Any]) -> None:
        """A worker's file ended (result or error): release the worker, then apply the outcome."""
        self._capacity_changed = True
        w = self._holder(ev.worker_id, ev.job_id, what)
        if w is None:
            return
        outcome = outcome_of(w, w.job, ev)
        self.workers.release(w, getattr(ev, "rss_after_mb", None))
        self.outcomes.apply(outcome)
        out_of_memory = isinstance(ev, FileError) and ev.kind == "memory"
        if self.draining or out_of_memory:
            # After an out-of-memory error a fresh process is the only clean state.
            self.workers.stop(w, "draining" if self.draining else "out of memory")

    def _on_exited(self, ev: WorkerExited) -> None:
        self._capacity_changed = True
        w = self.workers.get(ev.worker_id)
        ex = self.workers.exited(ev)
        if ex is None:
            return
        if ex.job is not None:
            self.outcomes.apply(self.outcomes.from_exit(w, ex.job, ev, stopping=self.stop_now))
        if ex.boot_failure:
            self._check_boot()

    def _on_broken(self, ev: WorkerBroken) -> None:
        w = self.workers.get(ev.worker_id)
        if w is not None and w.live:
            self.emit("worker_protocol_error", level="error", worker=w.id, pid=w.pid, error=ev.error)
            self.workers.kill(w, f"protocol error: {ev.error}")

    def _on_log(self, ev: WorkerLog) -> None:
        line = ev.line
        if not line:
            return
        w = self.workers.get(ev.worker_id)
        wf = {"worker": ev.worker_id, "pid": w.pid if w else None}
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError
        except ValueError:
            self.emit("worker_output", level="debug", **wf, line=line[:2000])
            return
        level = rec.pop("level", "info")
        event = rec.pop("event", "log")
        rec.pop("timestamp", None), rec.pop("ts", None)
        loud = level in ("warning", "error", "critical")
        self.emit("worker_log", level="warning" if loud else "debug", **wf, worker_event=event, worker_level=level,
                  **{k: v for k, v in rec.items() if k not in ("worker", "pid", "t")})

    _HANDLERS: dict[type, Callable[..., None]] = {
        WorkerSpawned: _on_spawned, SpawnFailed: _on_spawn_failed, WorkerReady: _on_ready,
        WorkerHeartbeat: _on_heartbeat, FileProgress: _on_progress, FileStarted: _on_started,
        FileResult: _on_result, FileError: _on_error, WorkerExited: _on_exited, WorkerBroken: _on_broken,
        WorkerLog: _on_log,
    }

    def _check_boot(self) -> None:
        t = self.workers
        if t.boot_failures >= MAX_BOOT_FAILURES and not self.halted:
            self.halted = (f"workers cannot start: engine {self.key[0]}, model {self.key[1]}: "
                           f"{t.last_boot_failure}")
            self.emit("run_halted", level="error", reason=self.halted, boot_failures=t.boot_failures)

    # -- signals -------------------------------------------------------------------------------------
    def _on_signal(self, sig: int) -> None:
        if sig == signal.SIGHUP:
            self._reload()
        elif sig == signal.SIGTERM and not self.draining:
            self.draining = True
            self.drain_deadline = self.now() + self.s.run.drain_grace
            self.notifier.stopping()
            self.emit("drain_started", reason="SIGTERM", grace_s=self.s.run.drain_grace)
            self._drain_workers()
        else:
            self.emit("stop_requested", level="warning", signal=signal.Signals(sig).name)
            self.notifier.stopping()
            self.stop_now = True

    def _drain_workers(self) -> None:
        """Stop what a drain no longer needs: workers still loading and idle ones."""
        for w in self.workers.live():
            if w.state is WorkerState.STARTING:
                self.workers.kill(w, "drain: not ready yet", by_us=True)
            elif w.job is None:
                self.workers.stop(w, "draining")

    def _reload(self) -> None:
        try:
            new = reload_settings(self.s, cli=self.reload_cli)
        except SettingsError as exc:
            self.emit("config_reload_failed", level="error", error=str(exc))
            return
        new, applied, refused = live_reload(self.s, new)
        if refused:
            self.emit("config_reload_refused", level="warning",
                      changed={k: [str(a), str(b)] for k, (a, b) in refused.items()},
                      reason="a restart is needed to change these; the running values stay")
        self.s = new
        self.policy.bands = bands_from(new)
        self.queue.max_attempts = new.run.max_attempts
        if "memory.budget" in applied or "memory.reserve" in applied:
            self.limits = detect_limits(budget=new.memory.budget, reserve=new.memory.reserve)
        self.emit("config_reloaded", changed={k: [str(a), str(b)] for k, (a, b) in applied.items()},
                  budget_mb=round(self.budget_mb, 1))

    # -- the tick ------------------------------------------------------------------------------------
    def _tick(self, now: float) -> None:
        self._sample(now)
        self._health(now)
        if not self.draining:
            self.intake.scan(now)
        if self.draining and self.drain_deadline is not None and now > self.drain_deadline:
            for w in self.workers.running():
                self.workers.kill(w, "drain grace period over", by_us=True)
        self._decide(now)
        self._publish(now)

    def _sample(self, now: float) -> None:
        try:
            self.host = self.sampler.host()
        except (OSError, KeyError, ValueError) as exc:
            self.host = None
            if self.host_error is None:
                self.host_error = f"{type(exc).__name__}: {exc}"
                self.emit("host_memory_unreadable", level="error", error=self.host_error,
                          effect="admitting nothing new until host memory can be read again")
        else:
            if self.host_error is not None:
                self.emit("host_memory_readable", after_error=self.host_error)
                self.host_error = None
        for w in self.workers.present():
            mem = self.sampler.tree(w.pid) if w.pid else None
            if mem is not None:
                self.workers.observe(w, mem)
        if now - self._overhead_at >= 10.0:  # static memory: an exact read now and then is enough
            self._overhead_at = now
            self.overhead_mb = self._overhead()

    def _overhead(self) -> float:
        """The supervisor's own PSS and the zygote's (its workers are counted on their own)."""
        read = getattr(self.sampler, "process_pss", None)
        if read is None:
            return 0.0
        extra = getattr(self.backend, "extra_pids", lambda: [])()
        return sum(read(pid) or 0 for pid in (os.getpid(), *extra)) / MiB

    def _health(self, now: float) -> None:
        r = self.s.run
        overdue = self.workers.overdue(
            now, boot_timeout=r.boot_timeout, heartbeat_timeout=r.heartbeat_timeout,
            file_timeout=lambda job: r.file_timeout + r.file_timeout_per_audio_second * (job.info.audio_seconds or 0))
        for w, reason in overdue:
            self.workers.kill(w, reason)
        self.workers.stale_spawns(now, r.boot_timeout)
        self._check_boot()

    def _decide(self, now: float) -> None:
        if self.halted:
            return
        self.estimator.refresh(now)
        self._capacity_changed = False
        for d in self.policy.decide(self.snapshot(now)):
            self._guarded("act", self._act, d, now, decision=d.act.value, file=d.file)

    def _remaining(self, w: WorkerRecord) -> float:
        """A running file's remaining growth, corrected from its progress (the one place)."""
        seen = max(0.0, w.uss_mb - (w.baseline_uss_mb or w.uss_mb))
        return self.estimator.remaining(w.job, w.progress, seen)

    def others_mb(self) -> float:
        if self.publisher.ledger_blind():
            return self.publisher.conservative_others_mb(self.limits.reserve / MiB)
        return self.publisher.others_mb

    def snapshot(self, now: float) -> Snapshot:
        pending = tuple(PendingView(file=j.rel, peak_mb=j.estimate.peak_mb, growth_mb=j.estimate.growth_mb,
                                    central_peak_mb=j.estimate.central_mb if j.estimate.source != "cold" else 0.0,
                                    uncertain=is_uncertain(j.estimate))
                        for j in self.queue.pending()[:POLICY_WINDOW] if j.estimate is not None)
        h = self.host
        return Snapshot(now=now, budget_mb=self.budget_mb, reserve_mb=self.limits.reserve / MiB,
                        available_mb=h.available / MiB if h else None, workers=self.workers.views(self._remaining),
                        pending=pending, predicted_baseline_mb=self.estimator.baseline_mb,
                        max_workers=self.s.max_workers(), psi_some10=h.psi_some_avg10 if h else None,
                        psi_full10=h.psi_full_avg10 if h else None, draining=self.draining or self.stop_now,
                        others_reserved_mb=self.others_mb(), overhead_mb=self.overhead_mb,
                        idle_retire_s=self.s.service.idle_retire if self.intake.watcher is not None else None)

    def _threads(self) -> int:
        """Torch threads for a file starting now: the cores shared by the files that will run."""
        fixed = self.s.engine_settings.threads
        return fixed or max(1, (os.cpu_count() or 1) // (len(self.workers.running()) + 1))

    def _act(self, d: Decision, now: float) -> None:
        w = self.workers.get(d.worker) if isinstance(d.worker, str) else None
        if d.act is Act.SPAWN:
            self.workers.spawn(d.reason, d.figures)
        elif d.act is Act.ADMIT and w is not None and w.state is WorkerState.READY:
            job = self.queue.get(d.file)
            if job is None or job.state is not FileState.PENDING:
                return
            self.queue.start(job, w.id)
            info, est = job.info, job.estimate
            spec = JobSpec(file=job.rel, cha=str(info.path), media=str(info.media) if info.media else None,
                           out=str(info.out), options={"threads": self._threads()}, attempt=job.attempts,
                           predicted_peak_mb=est.peak_mb, predicted_growth_mb=est.growth_mb,
                           job_id=f"{job.rel}#{job.attempts}")
            self.outcomes.started(job)
            self.workers.assign(w, job, spec, predicted_mb=round(est.peak_mb, 1),
                                predicted_growth_mb=round(est.growth_mb, 1), estimate_source=est.source,
                                estimate_uncertain=is_uncertain(est), audio_seconds=info.audio_seconds, attempt=job.attempts,
                                reason=d.reason, committed_mb=d.figures.get("committed_mb"),
                                budget_mb=round(self.budget_mb, 1))
        elif d.act is Act.PAUSE and w is not None and w.state is WorkerState.BUSY:
            self.workers.pause(w, d.reason, d.figures)
        elif d.act is Act.RESUME and w is not None and w.state is WorkerState.PAUSED:
            self.workers.resume(w, d.reason, d.figures)
        elif d.act is Act.KILL and w is not None and w.live:
            self.workers.kill(w, d.reason, d.figures, budget_mb=round(self.budget_mb, 1))
        elif d.act is Act.RETIRE and w is not None and w.state is WorkerState.READY:
            self.workers.stop(w, f"retired: {d.reason}", "worker_retired", uss_mb=round(w.uss_mb, 1), reason=d.reason)
        elif d.act is Act.REJECT:
            job = self.queue.get(d.file)
            if job is not None and job.state is FileState.PENDING:
                self.outcomes.reject(job, d.reason)

    # -- publishing ------------------------------------------------------------------------------------
    def _publish(self, now: float) -> None:
        snap = self.snapshot(now)
        used, committed = used_mb(snap), committed_mb(snap)
        self.publisher.exchange(committed - used, self.host)
        self.publisher.tick(now, status=self.status, sample=lambda: self._memory(used, committed),
                            interval=self.s.memory.sample_log_interval, busy=bool(self.workers.live()),
                            counts=self.queue.counts())

    def _memory(self, used: float, committed: float) -> dict[str, Any]:
        return memory_figures(used=used, committed=committed, budget_mb=self.budget_mb,
                              limit_mb=self.limits.limit / MiB, host=self.host, others_mb=self.others_mb(),
                              workers=self.workers.live())

    def status(self) -> dict[str, Any]:
        """What ``status --json`` prints and the metrics are drawn from (see docs/DESIGN.md)."""
        now = self.now()
        memory = None
        if self.workers is not None:
            snap = self.snapshot(now)
            memory = self._memory(used_mb(snap), committed_mb(snap))
        return status_of(header=status_header(self.run_id, self.wall0, now - self.t0, self.draining), now=now,
                         memory=memory, budget_mb=self.budget_mb, limit_mb=self.limits.limit / MiB,
                         queue=self.queue, intake=self.intake, audio_done_s=self.outcomes.audio_done_s,
                         kills=self.kills, pauses=self.pauses,
                         workers=self.workers.live() if self.workers is not None else [])

    # -- ending ----------------------------------------------------------------------------------------
    async def _shutdown(self) -> None:
        if self.workers is None:
            return
        ending = "drain: supervisor stopping" if self.draining else "supervisor stopping"
        for w in self.workers.live():
            if w.job is not None or self.stop_now or self.halted or w.state is WorkerState.STARTING:
                self.workers.kill(w, ending, by_us=True)
            else:
                self.workers.stop(w, "run finished")
        if not await self._await_exits(SHUTDOWN_WAIT_S):
            for w in self.workers.live() + [w for w in self.workers.present() if w.state is WorkerState.STOPPING]:
                self.workers.kill(w, "did not exit after shutdown", by_us=True)
            await self._await_exits(SHUTDOWN_WAIT_S)
        await self.backend.close()
        while not self.inbox.empty():
            ev = self.inbox.get_nowait()
            if isinstance(ev, (WorkerExited, FileResult, FileError)):
                self._handle(ev)
        for job in self.queue.in_state(FileState.RUNNING):
            self.queue.requeue(job, "supervisor stopping")

    async def _await_exits(self, timeout: float) -> bool:
        """Handle events until every worker has exited (pending spawns included)."""
        deadline = self.now() + timeout
        while self.workers.present() or self.workers.spawning:
            left = deadline - self.now()
            if left <= 0:
                return False
            try:
                ev = await asyncio.wait_for(self.inbox.get(), left)
            except asyncio.TimeoutError:
                return False
            if isinstance(ev, WorkerSpawned):  # a spawn that landed while stopping: end it too
                self._handle(ev)
                self.workers.kill(self.workers.get(ev.worker_id), "supervisor stopping", by_us=True)
            elif not (isinstance(ev, tuple) and ev[0] == "signal"):
                self._handle(ev)
            self.publisher.watchdog(self.now())
        return True

    def _finish(self) -> tuple[RunSummary, dict[str, Any]]:
        c = self.queue.counts()
        failures = [(j.rel, j.state.value, j.reason or "")
                    for j in self.queue.in_state(FileState.FAILED, FileState.QUARANTINED)]
        if self.halted:
            code = EXIT_HALTED
        elif (self.draining or self.stop_now) and (c["pending"] or c["running"]):
            code = EXIT_INTERRUPTED  # asked to stop with files left: re-running finishes them
        elif self.draining:
            code = EXIT_OK  # a drain that left nothing undone (watch mode's stop): a success
        elif failures or c["pending"] or c["running"]:
            code = EXIT_FAILED
        else:
            code = EXIT_OK
        summary = {"done": c["done"], "failed": c["failed"], "quarantined": c["quarantined"], "skipped": c["skipped"],
                   "pending": c["pending"], "kills": self.kills, "pauses": self.pauses,
                   "wall_s": round(time.time() - self.wall0, 2), "audio_seconds": round(self.outcomes.audio_done_s, 1),
                   "exit_code": code, "halted": self.halted, "drained": self.draining,
                   "telemetry": "unavailable" if self.sink.failed else "ok",
                   "supervisor_cpu_s": round(time.process_time(), 3)}
        self.emit("run_finished", level="info" if code == 0 else "warning", **summary)
        self.notifier.stopping()
        return RunSummary(exit_code=code, counts=c, failures=failures, halted=self.halted), summary
